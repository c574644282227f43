"""Property-based tests: malformed inputs at the engine's boundaries give an ExplorerError, never a crash."""

import io
import json
import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from explorer.errors import ExplorerError
from explorer.index import META_NAME, AttributionIndex
from precompute.featurize import FEATURES_NAME

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)
META_KEYS = ["format_version", "model_hash", "spec", "files", "count", "normalize", "dataset", "lambda", "num_train_timesteps"]


@pytest.fixture(scope="module")
def index_copy(tiny_index_dir, tmp_path_factory):
    target = tmp_path_factory.mktemp("robust") / "index"
    shutil.copytree(tiny_index_dir, target, ignore=shutil.ignore_patterns(FEATURES_NAME))
    return target


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(META_KEYS), value=json_values, drop=st.booleans())
def test_malformed_meta_is_refused_clearly(index_copy, key, value, drop):
    original = (index_copy / META_NAME).read_text()
    meta = json.loads(original)
    if drop:
        meta.pop(key, None)
    else:
        meta[key] = value
    try:
        (index_copy / META_NAME).write_text(json.dumps(meta))
        try:
            AttributionIndex.load(index_copy)
        except ExplorerError as error:
            assert str(error) and "Traceback" not in str(error)
    finally:
        (index_copy / META_NAME).write_text(original)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=2048))
def test_garbage_index_files_are_refused_clearly(index_copy, data):
    path = index_copy / "bucket_01.faiss"
    original = path.read_bytes()
    try:
        path.write_bytes(data)
        with pytest.raises(ExplorerError):
            AttributionIndex.load(index_copy)
    finally:
        path.write_bytes(original)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(width=st.integers(1, 64), height=st.integers(1, 64), mode=st.sampled_from(["L", "RGB", "RGBA", "P", "1", "I", "F", "LA"]),
       timestep=st.integers(-5, 1005), top_k=st.integers(-2, 120), seed=st.integers(0, 2**16))
def test_any_query_image_gets_an_answer_or_a_clear_error(tiny_explorer, width, height, mode, timestep, top_k, seed):
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).convert(mode)
    try:
        result = tiny_explorer.attribute_image(image, timestep, top_k=top_k)
    except ExplorerError as error:
        assert any(word in str(error) for word in ("timestep", "top-k"))
        assert not (0 <= timestep < 1000 and 1 <= top_k <= 100)
    else:
        assert len(result.positive.ids) == min(top_k, 200)


@settings(max_examples=30, deadline=None)
@given(data=st.binary(max_size=512))
def test_corrupt_image_bytes_are_refused_clearly(tmp_path_factory, data):
    from explorer.data import load_image_file

    path = tmp_path_factory.mktemp("img") / "upload.png"
    path.write_bytes(data)
    try:
        array = load_image_file(path, 8)
    except ExplorerError as error:
        assert "upload.png" in str(error)
    else:
        assert array.shape == (8, 8)
