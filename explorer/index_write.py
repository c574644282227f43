"""Writing an index directory (its format: explorer.index): every file atomically, meta.json last."""

from __future__ import annotations

import hashlib
from pathlib import Path

import faiss
import numpy as np

from explorer.atomic import save_npy_atomic, write_bytes_atomic, write_json_atomic
from explorer.errors import ExplorerError
from explorer.index_meta import (
    CENTER_FORMAT_VERSION,
    FLAT_FORMAT_VERSION,
    FORMAT_VERSION,
    INDEX_TYPES,
    META_NAME,
    STORAGES,
    FeatureSource,
    IndexMeta,
    LambdaRecord,
    bucket_file,
    center_file,
    factor_file,
    ivfdata_file,
    norms_file,
)
from explorer.index_methods import IndexMethod
from explorer.ivf import IVFParams, build_bucket_index, check_ivf_request, rule_text

# The whitening factor is kept at the precision of the stored vectors: exact with float32, and
# float32 (error ~1e-6, far below the quantization's) with the lossy storages, which halves its size.
FACTOR_DTYPES = {"float32": np.float64, "float16": np.float32, "int8": np.float32}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


CAPTIONS_NAME = "train_captions.json"


class HashedFiles:
    """The files of an index directory as they are written, with their sha256 for meta.json."""

    def __init__(self, directory: Path):
        self.directory, self.hashes = directory, {}

    def record(self, name: str) -> None:
        self.hashes[name] = sha256_file(self.directory / name)

    def save_npy(self, name: str, array: np.ndarray) -> None:
        save_npy_atomic(self.directory / name, array)
        self.record(name)


def ivf_params(
    index_type: str, count: int, nlist: int | None, nprobe: int | None, on_disk: bool
) -> IVFParams | None:
    """The IVF settings of an index_type "ivf" build (nlist by explorer.ivf's rule unless given), None for
    a flat one."""
    if index_type not in INDEX_TYPES:
        raise ExplorerError(f"unknown index type {index_type!r}: use one of {', '.join(INDEX_TYPES)}")
    if index_type != "ivf":
        if on_disk:
            raise ExplorerError("ivf_on_disk applies to index_type ivf only", ("ivf_on_disk",))
        return None
    return IVFParams(
        check_ivf_request(count, nlist, nprobe),
        rule=rule_text(nlist is not None, nprobe is not None),
        on_disk=on_disk,
    )


def write_buckets(
    files: HashedFiles,
    bucket_vectors: list[np.ndarray],
    factors: list[np.ndarray | None],
    centers: list[np.ndarray] | None,
    storage: str,
    ivf: IVFParams | None,
    nprobe: int | None,
) -> None:
    """Each bucket's FAISS index (serialized in memory, then written: FAISS's own writer reports a full disk
    as RuntimeError), its whitening factor and its center."""
    directory = files.directory
    for bucket, (vectors, factor) in enumerate(zip(bucket_vectors, factors)):
        ivfdata = directory / ivfdata_file(bucket) if ivf is not None and ivf.on_disk else None
        index = build_bucket_index(vectors, storage, ivf, nprobe, ivfdata)
        if ivfdata is not None:
            files.record(ivfdata_file(bucket))
        write_bytes_atomic(directory / bucket_file(bucket), faiss.serialize_index(index).tobytes())
        files.record(bucket_file(bucket))
        if factor is not None:  # methods without a kernel (explorer.index_methods) store none
            files.save_npy(factor_file(bucket), factor.astype(FACTOR_DTYPES[storage]))
        if centers is not None:
            files.save_npy(center_file(bucket), np.asarray(centers[bucket], dtype=np.float64))


def write_index(
    directory: str | Path,
    source: FeatureSource,
    lambdas: list[LambdaRecord],
    normalize: bool,
    das: bool,
    bucket_vectors: list[np.ndarray],
    factors: list[np.ndarray | None],
    train_images: np.ndarray,
    train_labels: np.ndarray,
    train_ids: np.ndarray,
    centers: list[np.ndarray] | None = None,
    norms: list[np.ndarray] | None = None,
    storage: str = "float32",
    index_type: str = "flat",
    ivf_nlist: int | None = None,
    ivf_nprobe: int | None = None,
    ivf_on_disk: bool = False,
    train_captions: list[str] | None = None,
    method: IndexMethod | None = None,
) -> Path:
    """Write every file atomically, then meta.json (with their sha256) last.

    index_type "ivf" builds IVF buckets: nlist by the rule of explorer.ivf unless given, nprobe
    calibrated per bucket unless given; both recorded in meta.json["ivf"]; with ivf_on_disk the lists go to
    bucket_BB.ivfdata (memory-mapped when served). The method's own files (checkpoints, EK-FAC factors) are
    already in `directory`; they are hashed here. meta.json is written here only.
    """
    directory = Path(directory)
    if storage not in STORAGES:
        raise ExplorerError(f"unknown storage {storage!r}: use one of {', '.join(STORAGES)}")
    ivf = ivf_params(index_type, len(train_ids), ivf_nlist, ivf_nprobe, ivf_on_disk)
    directory.mkdir(parents=True, exist_ok=True)
    files = HashedFiles(directory)
    write_buckets(files, bucket_vectors, factors, centers, storage, ivf, ivf_nprobe)
    for bucket, array in enumerate(norms or []):  # filled while the bucket vectors were consumed
        files.save_npy(norms_file(bucket), np.asarray(array, dtype=np.float32))
    for name, array in (
        ("train_images.npy", train_images.astype(np.uint8)),
        ("train_labels.npy", train_labels.astype(np.int64)),
        ("train_ids.npy", train_ids.astype(np.int64)),
    ):
        files.save_npy(name, array)
    method = method or IndexMethod()
    for name in sorted(method.files()):
        if not (directory / name).is_file():
            raise ExplorerError(f"method {method.name} needs {name} in {str(directory)!r} before the index")
        files.record(name)
    if train_captions is not None:  # a text model's training prompts, shown with the influencers
        write_json_atomic(directory / CAPTIONS_NAME, list(train_captions))
        files.record(CAPTIONS_NAME)
    version = (
        CENTER_FORMAT_VERSION
        if centers is not None
        else FLAT_FORMAT_VERSION
        if ivf is None
        else FORMAT_VERSION
    )
    meta = IndexMeta(
        **vars(source),
        lambdas=tuple(lambdas),
        normalize=normalize,
        das=das,
        center=centers is not None,
        storage=storage,
        index_type=index_type,
        count=int(len(train_ids)),
        files=tuple(sorted(files.hashes.items())),
        format_version=version,
        ivf=ivf,
        norms=norms is not None,
        method=method,
    )
    write_json_atomic(directory / META_NAME, meta.to_json())
    return directory
