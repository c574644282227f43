"""The index directory: the one on-disk format between precompute (writer) and explorer (reader).

    meta.json            format version, model-weights hash, dataset, feature spec, projector,
                         lambda, normalization, DAS, counts, and a sha256 per file below
    bucket_BB.faiss      one FAISS inner-product index per timestep bucket (rows = training items):
                         exact (flat) or, for large training sets, IVF (index_type "ivf": inverted
                         lists, nlist and nprobe recorded in meta.json)
    bucket_BB.ivfdata    the inverted lists of an IVF bucket kept on disk (ivf.on_disk), memory-mapped
    whiten_BB.npy        the Cholesky factor L of bucket BB, to whiten queries (psi_q = L^-1 (phi_q - c))
    center_BB.npy        the mean training feature c of bucket BB (only when meta.json says center: true)
    norms_BB.npy         float32 (N, 3): each row's |phi_i|, |phi_i - c| and whitened |psi_i| (meta norms)
    train_images.npy     uint8 (N, H, W) or (N, H, W, 3) training images at model resolution
    train_labels.npy     int64 (N,)
    train_ids.npy        int64 (N,) stable dataset ids of the rows

meta.json is written last, so a directory without it is an unfinished featurize and is never
loaded. Inner products of stored rows and whitened queries are exact attribution scores.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import faiss
import numpy as np

from explorer.errors import ExplorerError
from explorer.index_meta import (
    CENTER_FORMAT_VERSION,
    FLAT_FORMAT_VERSION,
    FORMAT_VERSION,
    INDEX_TYPES,
    META_NAME,
    NORM_COLUMNS,
    READABLE_VERSIONS,
    STORAGES,
    FeatureSource,
    IndexMeta,
    LambdaRecord,
    bucket_file,
    center_file,
    factor_file,
    norms_file,
    read_meta,
)
from explorer.index_write import CAPTIONS_NAME, sha256_file, write_index
from explorer.ivf import check_kind
from explorer.lora import describe_model, mismatch_fix
from explorer.scoring import BucketScorer

if TYPE_CHECKING:
    from explorer.model import DiffusionModel

__all__ = [
    "CENTER_FORMAT_VERSION",
    "FLAT_FORMAT_VERSION",
    "FORMAT_VERSION",
    "INDEX_TYPES",
    "META_NAME",
    "READABLE_VERSIONS",
    "STORAGES",
    "AttributionIndex",
    "FeatureSource",
    "IndexMeta",
    "LambdaRecord",
    "SearchResult",
    "bucket_file",
    "center_file",
    "factor_file",
    "read_meta",
    "sha256_file",
    "write_index",
]

logger = logging.getLogger(__name__)


@dataclass
class SearchResult:
    """Top-k of one query: positions are rows of the index, ids are dataset ids."""

    ids: np.ndarray
    positions: np.ndarray
    scores: np.ndarray


def _check_model(
    directory: Path, meta: IndexMeta, model_hash: str | None, model: DiffusionModel | None
) -> None:
    """Refuse an index built for other weights, naming the model and LoRA adapter of each side and the fix."""
    if model_hash is None or meta.model_hash == model_hash:
        return
    loaded = "" if model is None else f"{model.description} "
    raise ExplorerError(
        f"index {str(directory)!r} was built for the model with weights hash {meta.model_hash} "
        f"({describe_model(meta.model_path, meta.lora)}), but the loaded model {loaded}has hash "
        f"{model_hash}: {mismatch_fix(meta.lora, None if model is None else model.lora)}"
    )


def _check_files(directory: Path, meta: IndexMeta) -> None:
    """Every file meta.json lists is there with its sha256."""
    for name, digest in meta.files:
        path = directory / name
        if not path.is_file():
            raise ExplorerError(
                f"index file {str(path)!r} is missing: rebuild the index with `python -m precompute "
                "featurize`"
            )
        if sha256_file(path) != digest:
            raise ExplorerError(
                f"index file {str(path)!r} is corrupt or truncated (checksum mismatch): rebuild the "
                "index with `python -m precompute featurize`"
            )


class AttributionIndex:
    """A loaded, validated index directory."""

    def __init__(
        self,
        directory: Path,
        meta: IndexMeta,
        indexes: list[faiss.Index],
        factors: list[np.ndarray],
        train_images: np.ndarray,
        train_labels: np.ndarray,
        train_ids: np.ndarray,
        centers: list[np.ndarray] | None = None,
        train_captions: list[str] | None = None,
    ):
        self.directory, self.meta = directory, meta
        self.train_captions = train_captions  # a text model's training prompts (None: a pixel model's index)
        self.indexes, self.factors = indexes, factors
        self.scorers = [
            BucketScorer(factor, None if centers is None else centers[b], self.normalize)
            for b, factor in enumerate(factors)
        ]
        self.train_images, self.train_labels, self.train_ids = train_images, train_labels, train_ids
        self._vectors: dict[int, np.ndarray] = {}

    @property
    def buckets(self) -> int:
        return len(self.indexes)

    @property
    def normalize(self) -> bool:
        return self.meta.normalize

    @property
    def class_names(self) -> list[str]:
        return list(self.meta.dataset.class_names)

    @property
    def score_name(self) -> str:
        """What a score is: the cosine of whitened vectors (normalized indexes) or the raw TRAK score."""
        return "cos" if self.normalize else "TRAK score"

    @property
    def label(self) -> str:
        """A short human name of the method, e.g. 'square, normalized' or 'mean, normalized, kronecker,
        calibrated'."""
        spec, method = self.meta.spec, self.meta.method
        parts = [
            *([method.label] if method.label else []),
            spec.output,
            *(["centered"] if self.meta.center else []),
            "normalized" if self.normalize else "raw",
        ]
        if self.meta.das:
            parts.append("residual-weighted")
        if spec.projector != "countsketch":
            parts.append(spec.projector)
        if spec.exact_params or spec.exact_layers:
            parts.append("calibrated")
        if spec.precision != "fp32":
            parts.append(f"bf16 below t = {spec.bf16_below}" if spec.precision == "mixed" else spec.precision)
        if spec.params:
            parts.append("params " + " ".join(spec.params))
        return ", ".join(parts)

    @classmethod
    def load(
        cls, directory: str | Path, model_hash: str | None = None, model: DiffusionModel | None = None
    ) -> AttributionIndex:
        """model_hash: refuse an index built for other weights; model: the loaded model, whose hash is checked
        and whose path and LoRA adapter the refusal names."""
        directory = Path(directory)
        meta = read_meta(directory)
        _check_model(directory, meta, model.weights_hash if model is not None else model_hash, model)
        _check_files(directory, meta)
        count, buckets, dim = meta.count, meta.spec.buckets, meta.spec.proj_dim
        indexes, factors, centers = [], [], []
        for bucket in range(buckets):
            try:
                # on-disk lists (ivf.on_disk) are found next to the bucket file wherever the index moved
                index = faiss.read_index(str(directory / bucket_file(bucket)), faiss.IO_FLAG_ONDISK_SAME_DIR)
            except RuntimeError as error:
                raise ExplorerError(
                    f"FAISS could not read {bucket_file(bucket)} in {str(directory)!r}: rebuild the index"
                ) from error
            if index.ntotal != count or index.d != dim:
                raise ExplorerError(
                    f"{bucket_file(bucket)} holds {index.ntotal} x {index.d} vectors, meta.json says "
                    f"{count} x {dim}: rebuild the index"
                )
            check_kind(
                index, meta.index_type, meta.ivf, bucket, f"{bucket_file(bucket)} in {str(directory)!r}"
            )
            factor = (
                np.load(directory / factor_file(bucket), allow_pickle=False) if meta.method.whitened else None
            )
            if factor is not None and (factor.shape != (index.d, index.d) or not np.isfinite(factor).all()):
                raise ExplorerError(
                    f"{factor_file(bucket)} in {str(directory)!r} is not a finite {index.d}x{index.d} "
                    "matrix: rebuild the index"
                )
            indexes.append(index)
            factors.append(factor)
            if meta.center:
                center = np.load(directory / center_file(bucket), allow_pickle=False)
                if center.shape != (index.d,) or not np.isfinite(center).all():
                    raise ExplorerError(
                        f"{center_file(bucket)} in {str(directory)!r} is not a finite vector of "
                        f"{index.d}: rebuild the index"
                    )
                centers.append(center)
        images = np.load(directory / "train_images.npy", allow_pickle=False)
        labels = np.load(directory / "train_labels.npy", allow_pickle=False)
        ids = np.load(directory / "train_ids.npy", allow_pickle=False)
        if not (images.ndim == 3 or images.ndim == 4 and images.shape[-1] == 3) or images.dtype != np.uint8:
            raise ExplorerError(
                f"train_images.npy in {str(directory)!r} holds {images.shape} {images.dtype}, not uint8 "
                "(N, H, W) or (N, H, W, 3) images: rebuild the index"
            )
        if not len(images) == len(labels) == len(ids) == count:
            raise ExplorerError(
                f"index {str(directory)!r} has {len(images)} images, {len(labels)} labels, {len(ids)} "
                f"ids for {count} rows: rebuild it"
            )
        captions = None
        if CAPTIONS_NAME in dict(meta.files):
            captions = json.loads((directory / CAPTIONS_NAME).read_text())
            if not isinstance(captions, list) or len(captions) != count:
                raise ExplorerError(
                    f"{CAPTIONS_NAME} in {str(directory)!r} has no caption per row: rebuild it"
                )
        centers = centers if meta.center else None
        loaded = cls(directory, meta, indexes, factors, images, labels, ids, centers, captions)
        for bucket in range(buckets):
            if not np.isfinite(loaded.vectors(bucket)).all():
                raise ExplorerError(
                    f"{bucket_file(bucket)} in {str(directory)!r} holds NaN or infinite vectors: "
                    "rebuild the index"
                )
        return loaded

    @property
    def index_type(self) -> str:
        """ "flat" (exact search) or "ivf" (inverted lists)."""
        return self.meta.index_type

    def nprobe(self, bucket: int) -> tuple[int, int]:
        """IVF lists scanned for q and for -q in a bucket (from meta.json)."""
        return self.meta.ivf.nprobe[bucket], self.meta.ivf.nprobe_negative[bucket]

    def vectors(self, bucket: int) -> np.ndarray:
        """All stored rows of a bucket in row order, (N, k) float32 (decoded once, then cached).

        IVF indexes decode them from their inverted lists (reconstruct_n needs no direct map)."""
        if bucket not in self._vectors:
            self._vectors[bucket] = self.indexes[bucket].reconstruct_n(0, self.indexes[bucket].ntotal)
        return self._vectors[bucket]

    def norms(self, bucket: int) -> np.ndarray:
        """(N, 3) |phi_i|, |phi_i - c| and whitened |psi_i| of every training row (NORM_COLUMNS)."""
        if not self.meta.norms:
            raise ExplorerError(
                f"index {str(self.directory)!r} stores no gradient norms (built before they were kept): "
                "rebuild it with `python -m precompute featurize` or `reindex`"
            )
        norms = np.load(self.directory / norms_file(bucket), allow_pickle=False)
        if norms.shape != (self.meta.count, len(NORM_COLUMNS)) or not np.isfinite(norms).all():
            raise ExplorerError(
                f"{norms_file(bucket)} in {str(self.directory)!r} is not finite ({self.meta.count}, 3): "
                "rebuild the index"
            )
        return norms

    def query_vectors(
        self, features: np.ndarray, buckets: np.ndarray, scorers: dict | None = None
    ) -> np.ndarray:
        """Raw projected query features phi (P, k) at buckets (P,) -> search vectors (P, k); scorers:
        bucket -> BucketScorer replacing the index's (a region's own centers, explorer.region)."""
        features = np.asarray(features, dtype=np.float64)
        out = np.empty(features.shape, dtype=np.float32)
        for bucket in np.unique(buckets):
            rows = np.flatnonzero(buckets == bucket)
            scorer = (scorers or {}).get(int(bucket), self.scorers[int(bucket)])
            out[rows] = scorer.vectors(features[rows])
        return out

    def scores(self, query: np.ndarray, bucket: int) -> np.ndarray:
        """Attribution scores of every training row for one search vector: (N,)."""
        return self.vectors(bucket) @ np.asarray(query, dtype=np.float32)

    def search(self, query: np.ndarray, bucket: int, top_k: int) -> tuple[SearchResult, SearchResult]:
        """Top-k positive and top-k negative influencers of one search vector (k,).

        Flat buckets are exact. IVF buckets scan the best lists for q (nprobe of them) and for -q
        (nprobe_negative); if those hold fewer than top_k rows, that answer falls back to exact scores."""
        top_k = min(top_k, self.indexes[bucket].ntotal)
        queries = np.stack([query, -query]).astype(np.float32)  # negatives: search with -query
        if self.index_type == "ivf":
            answers = [
                self.indexes[bucket].search(
                    queries[row : row + 1], top_k, params=faiss.SearchParametersIVF(nprobe=nprobe)
                )
                for row, nprobe in enumerate(self.nprobe(bucket))
            ]
            scores, positions = (
                np.concatenate([a[0] for a in answers]),
                np.concatenate([a[1] for a in answers]),
            )  # (2, top_k)
        else:
            scores, positions = self.indexes[bucket].search(queries, top_k)
        for row, sign in enumerate((1, -1)):
            if (positions[row] < 0).any():  # IVF: the probed lists ran out of rows
                every = sign * self.scores(query, bucket)  # (N,) scores of +-query
                positions[row] = np.argsort(-every, kind="stable")[:top_k]
                scores[row] = every[positions[row]]
        positive = SearchResult(self.train_ids[positions[0]], positions[0], scores[0])
        negative = SearchResult(self.train_ids[positions[1]], positions[1], -scores[1])
        return positive, negative
