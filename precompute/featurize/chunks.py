"""Raw projected features, chunk by chunk: what featurize writes as it goes and whitening reads back.

A chunk is `chunk_size` consecutive rows of the dataset (the dataset's order is fixed by its fingerprint,
which the partial config records). Each finished chunk is one file, OUT/.partial/chunks/chunk_CCCCCC.npy,
(B, rows, k) float32, written atomically, so a chunk is done exactly when its file exists: ranks of a
torchrun featurize write disjoint files with no shared state, a killed process leaves no half chunk, and a
rerun with any number of processes computes only the missing chunks. DAS residuals of the chunk,
(B, rows), go to residuals_CCCCCC.npy, written first.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from explorer.atomic import save_npy_atomic
from explorer.errors import ExplorerError


class ChunkRows:
    """How N rows split into chunks of `chunk_size`."""

    def __init__(self, count: int, chunk_size: int):
        self.count, self.chunk_size = count, chunk_size

    @property
    def n_chunks(self) -> int:
        return -(-self.count // self.chunk_size)

    def rows(self, chunk: int) -> slice:
        return slice(chunk * self.chunk_size, min(self.count, (chunk + 1) * self.chunk_size))


class ChunkFiles(ChunkRows):
    """The chunk files of one featurize in progress."""

    def __init__(self, directory: Path, count: int, chunk_size: int, buckets: int, dim: int, das: bool):
        super().__init__(count, chunk_size)
        self.directory, self.buckets, self.dim, self.das = Path(directory), buckets, dim, das

    def _path(self, kind: str, chunk: int) -> Path:
        return self.directory / f"{kind}_{chunk:06d}.npy"

    def done(self) -> np.ndarray:
        """(n_chunks,) bool: which chunks have their file."""
        return np.array([self._path("chunk", c).is_file() for c in range(self.n_chunks)], dtype=bool)

    def write(self, chunk: int, features: np.ndarray, residuals: np.ndarray | None) -> None:
        """features (B, rows, k), residuals (B, rows); the features file last: it marks the chunk done."""
        if residuals is not None:
            save_npy_atomic(self._path("residuals", chunk), np.asarray(residuals, dtype=np.float32))
        save_npy_atomic(self._path("chunk", chunk), np.asarray(features, dtype=np.float32))

    def _read(self, kind: str, chunk: int, shape: tuple[int, ...]) -> np.ndarray:
        path = self._path(kind, chunk)
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as error:
            raise ExplorerError(
                f"{str(path)!r} cannot be read ({error}): delete it and run the same command again to "
                "recompute that chunk"
            ) from error
        if array.shape != shape or array.dtype != np.float32:
            raise ExplorerError(
                f"{str(path)!r} holds {array.shape} {array.dtype}, this featurize expects {shape} float32: "
                "delete it and run the same command again to recompute that chunk"
            )
        return array

    def features(self, chunk: int, bucket: int) -> np.ndarray:
        """(rows, k) raw features of one bucket."""
        rows = self.rows(chunk)
        return self._read("chunk", chunk, (self.buckets, rows.stop - rows.start, self.dim))[bucket]

    def residuals(self, chunk: int, bucket: int) -> np.ndarray:
        rows = self.rows(chunk)
        return self._read("residuals", chunk, (self.buckets, rows.stop - rows.start))[bucket]


class ArrayChunks(ChunkRows):
    """The same reads over whole arrays (B, N, k) [+ (B, N)]: the raw features `--keep-features` kept."""

    def __init__(self, features: np.ndarray, residuals: np.ndarray | None, chunk_size: int = 4096):
        super().__init__(features.shape[1], chunk_size)
        self.buckets, self.dim = features.shape[0], features.shape[2]
        self._features, self._residuals = features, residuals
        self.das = residuals is not None

    def features(self, chunk: int, bucket: int) -> np.ndarray:
        return np.asarray(self._features[bucket, self.rows(chunk)])

    def residuals(self, chunk: int, bucket: int) -> np.ndarray:
        return np.asarray(self._residuals[bucket, self.rows(chunk)])


def stack(chunks: ChunkFiles | ArrayChunks, path: Path, residuals: bool = False) -> None:
    """All chunks as one (B, N, k) [or (B, N) residual] float32 .npy, written through a memmap."""
    shape = (chunks.buckets, chunks.count) if residuals else (chunks.buckets, chunks.count, chunks.dim)
    scratch = path.with_name(path.name + ".tmp")
    out = np.lib.format.open_memmap(scratch, mode="w+", dtype=np.float32, shape=shape)
    read = chunks.residuals if residuals else chunks.features
    for chunk in range(chunks.n_chunks):
        for bucket in range(chunks.buckets):
            out[bucket, chunks.rows(chunk)] = read(chunk, bucket)
    out.flush()
    del out
    scratch.replace(path)
