import numpy as np
import pytest
from PIL import Image

from explorer.data import (
    image_to_array,
    load_builtin,
    load_dataset,
    load_folder,
    load_image_file,
    to_model_range,
    to_uint8,
    train_heldout_split,
)
from explorer.errors import ExplorerError


def test_mnist5k_is_shuffled_resized_balanced_and_stable():
    first, second = load_builtin("mnist5k"), load_builtin("mnist5k")
    assert first.images.shape == (5000, 16, 16) and first.images.dtype == np.uint8
    assert np.bincount(first.labels).tolist() == [500] * 10
    assert first.fingerprint() == second.fingerprint()
    assert len(set(first.labels[:20].tolist())) > 3, "the source is sorted by class; the loader must shuffle"
    train, heldout = train_heldout_split(first)
    assert (len(train), len(heldout)) == (4500, 500)
    assert not set(train.ids.tolist()) & set(heldout.ids.tolist())


def test_digits_scaled_to_uint8():
    digits = load_builtin("digits")
    assert digits.images.shape == (1797, 8, 8) and digits.images.max() == 255
    assert load_builtin("digits", size=16).images.shape == (1797, 16, 16)


def test_image_folder_labels_from_subfolders_any_mode_and_size(tmp_path):
    rng = np.random.default_rng(0)
    for cls, mode in (("cat", "RGB"), ("dog", "RGBA"), ("eel", "L")):
        (tmp_path / cls).mkdir()
        for i in range(3):
            array = rng.integers(0, 255, (20 + i, 30, 4 if mode == "RGBA" else 3), dtype=np.uint8)
            image = Image.fromarray(array[..., : {"RGB": 3, "RGBA": 4, "L": 3}[mode]])
            (image.convert("L") if mode == "L" else image).save(tmp_path / cls / f"{i}.png")
    dataset = load_folder(tmp_path, 8)
    assert dataset.images.shape == (9, 8, 8)
    assert dataset.class_names == ["cat", "dog", "eel"]
    assert sorted(np.bincount(dataset.labels).tolist()) == [3, 3, 3]
    assert load_folder(tmp_path, 8).fingerprint() == dataset.fingerprint()


def test_bad_data_names_the_value_and_the_fix(tmp_path):
    with pytest.raises(ExplorerError, match="nosuch"):
        load_dataset("nosuch", 8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExplorerError, match="holds no images"):
        load_folder(tmp_path / "empty", 8)
    corrupt = tmp_path / "bad.png"
    corrupt.write_bytes(b"not a png at all")
    with pytest.raises(ExplorerError, match="could not be read"):
        load_image_file(corrupt, 8)
    with pytest.raises(ExplorerError, match="does not exist"):
        load_image_file(tmp_path / "missing.png", 8)


def test_range_conversions_round_trip():
    images = np.arange(256, dtype=np.uint8).reshape(4, 8, 8)
    assert np.array_equal(to_uint8(to_model_range(images)), images)
    rgba = Image.new("RGBA", (5, 7), (255, 255, 255, 0))
    assert image_to_array(rgba, 8).max() == 0, "transparent pixels become the black background"
