"""The names in an index directory and the format versions that hold them (one place: the writer, the
loader and the meta.json checks all take them from here)."""

from __future__ import annotations

# Version 2 added IVF buckets, version 3 centered features (explorer.scoring). An index is written with the
# lowest version that holds it, so an older explorer refuses what it would score wrongly (IVF with nprobe 1,
# centered features without their centers) and still reads the rest.
CENTER_FORMAT_VERSION = 3
FORMAT_VERSION = 2
FLAT_FORMAT_VERSION = 1
READABLE_VERSIONS = (1, 2, 3)
META_NAME = "meta.json"
STORAGES = ("float32", "float16", "int8")
INDEX_TYPES = ("flat", "ivf")


def bucket_file(bucket: int) -> str:
    return f"bucket_{bucket:02d}.faiss"


def ivfdata_file(bucket: int) -> str:
    """The on-disk inverted lists of an IVF bucket built with ivf_on_disk."""
    return f"bucket_{bucket:02d}.ivfdata"


def factor_file(bucket: int) -> str:
    return f"whiten_{bucket:02d}.npy"


def center_file(bucket: int) -> str:
    return f"center_{bucket:02d}.npy"


NORM_COLUMNS = ("raw", "centered", "whitened")  # |phi_i|, |phi_i - c|, |psi_i| before normalization


def norms_file(bucket: int) -> str:  # (N, 3) float32, the NORM_COLUMNS of each training row
    return f"norms_{bucket:02d}.npy"
