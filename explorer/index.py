"""The index directory: the one on-disk format between precompute (writer) and explorer (reader).

    meta.json            format version, model-weights hash, dataset, feature spec, projector,
                         lambda, normalization, DAS, counts, and a sha256 per file below
    bucket_BB.faiss      one FAISS inner-product index per timestep bucket (rows = training items):
                         exact (flat) or, for large training sets, IVF (index_type "ivf": inverted
                         lists, nlist and nprobe recorded in meta.json)
    whiten_BB.npy        the Cholesky factor L of bucket BB, to whiten queries (psi_q = L^-1 (phi_q - c))
    center_BB.npy        the mean training feature c of bucket BB (only when meta.json says center: true)
    train_images.npy     uint8 (N, H, W) training images at model resolution
    train_labels.npy     int64 (N,)
    train_ids.npy        int64 (N,) stable dataset ids of the rows

meta.json is written last, so a directory without it is an unfinished featurize and is never
loaded. Inner products of stored rows and whitened queries are exact attribution scores.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from explorer.atomic import save_npy_atomic, write_bytes_atomic, write_json_atomic
from explorer.errors import ExplorerError
from explorer.ivf import IVFParams, add_rows, build_ivf, calibrate_nprobe, check_ivf_request, rule_text
from explorer.projector import PROJECTORS
from explorer.scoring import BucketScorer

logger = logging.getLogger(__name__)

# Version 2 added IVF buckets, version 3 centered features (explorer.scoring). An index is written with the
# lowest version that holds it, so an older explorer refuses what it would score wrongly (IVF with nprobe 1,
# centered features without their centers) and still reads the rest.
CENTER_FORMAT_VERSION = 3
FORMAT_VERSION = 2
FLAT_FORMAT_VERSION = 1
READABLE_VERSIONS = (1, 2, 3)
META_NAME = "meta.json"
STORAGES = ("float32", "float16", "int8")
# The whitening factor is kept at the precision of the stored vectors: exact with float32, and
# float32 (error ~1e-6, far below the quantization's) with the lossy storages, which halves its size.
FACTOR_DTYPES = {"float32": np.float64, "float16": np.float32, "int8": np.float32}
INDEX_TYPES = ("flat", "ivf")


def bucket_file(bucket: int) -> str:
    return f"bucket_{bucket:02d}.faiss"


def factor_file(bucket: int) -> str:
    return f"whiten_{bucket:02d}.npy"


def center_file(bucket: int) -> str:
    return f"center_{bucket:02d}.npy"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _build_faiss(vectors: np.ndarray, storage: str, ivf: IVFParams | None = None, nprobe: int | None = None) -> faiss.Index:
    """A flat index of the rows, or with `ivf` an IVF index trained on them (nprobe calibrated unless
    given; the choice is appended to `ivf`)."""
    dim = vectors.shape[1]
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if storage not in STORAGES:
        raise ExplorerError(f"unknown storage {storage!r}: use one of {', '.join(STORAGES)}")
    if ivf is not None:
        index = build_ivf(vectors, storage, ivf.nlist)
        add_rows(index, vectors)
        ivf.add_bucket(calibrate_nprobe(index, vectors, nprobe))
        return index
    if storage == "float32":
        index = faiss.IndexFlatIP(dim)
    elif storage == "float16":
        index = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
    else:  # int8: 8 bits per dimension with a per-dimension range learned from the vectors themselves
        index = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
    index.add(vectors)
    return index


def write_index(
    directory: str | Path,
    meta: dict,
    bucket_vectors: list[np.ndarray],
    factors: list[np.ndarray],
    train_images: np.ndarray,
    train_labels: np.ndarray,
    train_ids: np.ndarray,
    centers: list[np.ndarray] | None = None,
    storage: str = "float32",
    index_type: str = "flat",
    ivf_nlist: int | None = None,
    ivf_nprobe: int | None = None,
) -> Path:
    """Write every file atomically, then meta.json (with their sha256) last.

    index_type "ivf" builds IVF buckets: nlist by the rule of explorer.ivf unless given, nprobe
    calibrated per bucket unless given; both recorded in meta.json["ivf"].
    """
    directory = Path(directory)
    if index_type not in INDEX_TYPES:
        raise ExplorerError(f"unknown index type {index_type!r}: use one of {', '.join(INDEX_TYPES)}")
    ivf = None
    if index_type == "ivf":
        nlist = check_ivf_request(len(train_ids), ivf_nlist, ivf_nprobe)
        ivf = IVFParams(nlist, rule=rule_text(ivf_nlist is not None, ivf_nprobe is not None))
    directory.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}

    def record(name: str) -> None:
        files[name] = sha256_file(directory / name)

    for bucket, (vectors, factor) in enumerate(zip(bucket_vectors, factors)):
        index = _build_faiss(vectors, storage, ivf, ivf_nprobe)
        # serialize in memory, then write bytes: FAISS's own writer reports a full disk as RuntimeError
        write_bytes_atomic(directory / bucket_file(bucket), faiss.serialize_index(index).tobytes())
        record(bucket_file(bucket))
        save_npy_atomic(directory / factor_file(bucket), factor.astype(FACTOR_DTYPES[storage]))
        record(factor_file(bucket))
        if centers is not None:
            save_npy_atomic(directory / center_file(bucket), np.asarray(centers[bucket], dtype=np.float64))
            record(center_file(bucket))
    for name, array in (("train_images.npy", train_images.astype(np.uint8)), ("train_labels.npy", train_labels.astype(np.int64)),
                        ("train_ids.npy", train_ids.astype(np.int64))):
        save_npy_atomic(directory / name, array)
        record(name)
    version = CENTER_FORMAT_VERSION if centers is not None else FLAT_FORMAT_VERSION if ivf is None else FORMAT_VERSION
    meta = dict(meta, format_version=version, storage=storage, index_type=index_type, files=files,
                count=int(len(train_ids)), center=centers is not None)
    if ivf is not None:
        meta["ivf"] = ivf.to_meta()
    write_json_atomic(directory / META_NAME, meta)
    return directory


@dataclass
class SearchResult:
    """Top-k of one query: positions are rows of the index, ids are dataset ids."""

    ids: np.ndarray
    positions: np.ndarray
    scores: np.ndarray


class AttributionIndex:
    """A loaded, validated index directory."""

    def __init__(self, directory: Path, meta: dict, indexes: list[faiss.Index], factors: list[np.ndarray],
                 train_images: np.ndarray, train_labels: np.ndarray, train_ids: np.ndarray,
                 centers: list[np.ndarray] | None = None):
        self.directory, self.meta = directory, meta
        self.indexes, self.factors = indexes, factors
        self.scorers = [BucketScorer(factor, None if centers is None else centers[b], self.normalize)
                        for b, factor in enumerate(factors)]
        self.train_images, self.train_labels, self.train_ids = train_images, train_labels, train_ids
        self._vectors: dict[int, np.ndarray] = {}

    @property
    def buckets(self) -> int:
        return len(self.indexes)

    @property
    def normalize(self) -> bool:
        return bool(self.meta["normalize"])

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["dataset"]["class_names"])

    @property
    def label(self) -> str:
        """A short human name of the method, e.g. 'square, normalized' or 'mean, normalized, kronecker, calibrated'."""
        spec = self.meta["spec"]
        parts = [spec["output"], *(["centered"] if self.meta.get("center") else []), "normalized" if self.normalize else "raw"]
        if self.meta.get("das"):
            parts.append("DAS")
        if spec["projector"] != "countsketch":
            parts.append(spec["projector"])
        if spec.get("exact_params") or spec.get("exact_layers"):
            parts.append("calibrated")
        if spec.get("precision", "fp32") != "fp32":
            parts.append(f"bf16 below t = {spec['bf16_below']}" if spec["precision"] == "mixed" else spec["precision"])
        if spec.get("params"):
            parts.append("params " + " ".join(spec["params"]))
        return ", ".join(parts)

    @classmethod
    def load(cls, directory: str | Path, model_hash: str | None = None) -> "AttributionIndex":
        directory = Path(directory)
        meta = read_meta(directory)
        if model_hash is not None and meta["model_hash"] != model_hash:
            raise ExplorerError(
                f"index {str(directory)!r} was built for the model with weights hash {meta['model_hash']} "
                f"({meta.get('model_path', '?')}), but the loaded model has hash {model_hash}: pass the matching "
                "--model, or rebuild the index with `python -m precompute featurize --model YOUR_MODEL ...`"
            )
        for name, digest in meta["files"].items():
            path = directory / name
            if not path.is_file():
                raise ExplorerError(f"index file {str(path)!r} is missing: rebuild the index with `python -m precompute featurize`")
            if sha256_file(path) != digest:
                raise ExplorerError(f"index file {str(path)!r} is corrupt or truncated (checksum mismatch): rebuild the index with `python -m precompute featurize`")
        count, buckets = int(meta["count"]), int(meta["spec"]["buckets"])
        indexes, factors, centers = [], [], []
        for bucket in range(buckets):
            try:
                index = faiss.read_index(str(directory / bucket_file(bucket)))
            except RuntimeError as error:
                raise ExplorerError(f"FAISS could not read {bucket_file(bucket)} in {str(directory)!r}: rebuild the index") from error
            if index.ntotal != count or index.d != int(meta["spec"]["proj_dim"]):
                raise ExplorerError(f"{bucket_file(bucket)} holds {index.ntotal} x {index.d} vectors, meta.json says {count} x {meta['spec']['proj_dim']}: rebuild the index")
            _check_kind(index, meta, bucket, directory)
            factor = np.load(directory / factor_file(bucket), allow_pickle=False)
            if factor.shape != (index.d, index.d) or not np.isfinite(factor).all():
                raise ExplorerError(f"{factor_file(bucket)} in {str(directory)!r} is not a finite {index.d}x{index.d} matrix: rebuild the index")
            indexes.append(index)
            factors.append(factor)
            if meta.get("center"):
                center = np.load(directory / center_file(bucket), allow_pickle=False)
                if center.shape != (index.d,) or not np.isfinite(center).all():
                    raise ExplorerError(f"{center_file(bucket)} in {str(directory)!r} is not a finite vector of {index.d}: rebuild the index")
                centers.append(center)
        images = np.load(directory / "train_images.npy", allow_pickle=False)
        labels = np.load(directory / "train_labels.npy", allow_pickle=False)
        ids = np.load(directory / "train_ids.npy", allow_pickle=False)
        if images.ndim != 3 or images.dtype != np.uint8 or not (len(images) == len(labels) == len(ids) == count):
            raise ExplorerError(f"index {str(directory)!r} has {len(images)} images, {len(labels)} labels, {len(ids)} ids for {count} rows: rebuild it")
        loaded = cls(directory, meta, indexes, factors, images, labels, ids, centers if meta.get("center") else None)
        for bucket in range(buckets):
            if not np.isfinite(loaded.vectors(bucket)).all():
                raise ExplorerError(f"{bucket_file(bucket)} in {str(directory)!r} holds NaN or infinite vectors: rebuild the index")
        return loaded

    @property
    def index_type(self) -> str:
        """"flat" (exact search) or "ivf" (inverted lists; indexes older than IVF are flat)."""
        return self.meta.get("index_type", "flat")

    def nprobe(self, bucket: int) -> tuple[int, int]:
        """IVF lists scanned for q and for -q in a bucket (from meta.json)."""
        params = self.meta["ivf"]
        return int(params["nprobe"][bucket]), int(params["nprobe_negative"][bucket])

    def vectors(self, bucket: int) -> np.ndarray:
        """All stored rows of a bucket in row order, (N, k) float32 (decoded once, then cached).

        IVF indexes decode them from their inverted lists (reconstruct_n needs no direct map)."""
        if bucket not in self._vectors:
            self._vectors[bucket] = self.indexes[bucket].reconstruct_n(0, self.indexes[bucket].ntotal)
        return self._vectors[bucket]

    def query_vectors(self, features: np.ndarray, buckets: np.ndarray) -> np.ndarray:
        """Raw projected query features phi (P, k) at buckets (P,) -> search vectors (P, k)."""
        features = np.asarray(features, dtype=np.float64)
        out = np.empty(features.shape, dtype=np.float32)
        for bucket in np.unique(buckets):
            rows = np.flatnonzero(buckets == bucket)
            out[rows] = self.scorers[int(bucket)].vectors(features[rows])
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
            answers = [self.indexes[bucket].search(queries[row : row + 1], top_k, params=faiss.SearchParametersIVF(nprobe=nprobe))
                       for row, nprobe in enumerate(self.nprobe(bucket))]
            scores, positions = np.concatenate([a[0] for a in answers]), np.concatenate([a[1] for a in answers])  # (2, top_k)
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


def _check_kind(index: faiss.Index, meta: dict, bucket: int, directory: Path) -> None:
    """The FAISS file must be the kind meta.json says (flat or IVF with its nlist); sets an IVF's nprobe."""
    name, where = bucket_file(bucket), repr(str(directory))
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise ExplorerError(f"{name} in {where} is not an inner-product index: rebuild the index")
    ivf = faiss.try_extract_index_ivf(index)
    if meta.get("index_type", "flat") == "flat":
        if ivf is not None:
            raise ExplorerError(f"{name} in {where} is an IVF index but meta.json says index_type flat: rebuild the index")
        return
    if ivf is None:
        raise ExplorerError(f"{name} in {where} is not an IVF index but meta.json says index_type ivf: rebuild the index")
    if ivf.nlist != meta["ivf"]["nlist"]:
        raise ExplorerError(f"{name} in {where} has {ivf.nlist} IVF lists, meta.json says ivf.nlist {meta['ivf']['nlist']}: rebuild the index")
    ivf.nprobe = int(meta["ivf"]["nprobe"][bucket])  # what a plain FAISS search uses; search() passes it per call


def read_meta(directory: Path) -> dict:
    if not directory.is_dir():
        raise ExplorerError(f"index directory {str(directory)!r} does not exist: build one with `python -m precompute featurize --out {directory}` or pass --index DIR")
    meta_path = directory / META_NAME
    if not meta_path.is_file():
        partial = " (an unfinished featurize: run the same command again to resume)" if (directory / ".partial").exists() else ""
        raise ExplorerError(f"{str(directory)!r} is not a complete index directory: it has no {META_NAME}{partial}")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ExplorerError(f"{str(meta_path)!r} is not valid JSON ({error}): rebuild the index") from error
    if not isinstance(meta, dict) or "format_version" not in meta:
        raise ExplorerError(f"{str(meta_path)!r} has no format_version: it is not an index written by precompute")
    if not _is_int(meta["format_version"]) or meta["format_version"] not in READABLE_VERSIONS:
        raise ExplorerError(f"index {str(directory)!r} has format version {meta['format_version']!r}, this explorer reads versions "
                            f"{', '.join(map(str, READABLE_VERSIONS))}: rebuild it with this version's `python -m precompute featurize`")
    problem = _meta_problem(meta)
    if problem:
        raise ExplorerError(f"{str(meta_path)!r} is malformed ({problem}): rebuild the index with `python -m precompute featurize`")
    return meta


def _is_int(value, minimum: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _meta_problem(meta: dict) -> str | None:
    """What is wrong with a meta.json's structure, or None. Checked before anything is trusted."""
    from explorer.features import LATER_FIELDS, NAME_LIST_FIELDS, PRECISIONS, FeatureSpec
    from explorer.outputs import OUTPUT_FUNCTIONS

    if not isinstance(meta.get("model_hash"), str):
        return "model_hash must be a string"
    if not _is_int(meta.get("count")):
        return "count must be a non-negative integer"
    if not _is_int(meta.get("num_train_timesteps"), 1):
        return "num_train_timesteps must be a positive integer"
    if not all(isinstance(meta.get(key, False), bool) for key in ("normalize", "das", "center")) or "normalize" not in meta:
        return "normalize, das and center must be true or false"
    if meta.get("center") and meta["format_version"] < CENTER_FORMAT_VERSION:
        return f"center needs format_version {CENTER_FORMAT_VERSION}, not {meta['format_version']}"
    if meta.get("storage") not in STORAGES:
        return f"storage must be one of {', '.join(STORAGES)}"
    spec = meta.get("spec")
    fields, optional = set(FeatureSpec().to_dict()), set(LATER_FIELDS)
    if not isinstance(spec, dict) or not fields - optional <= set(spec) <= fields:
        return "spec must hold exactly the FeatureSpec fields"
    if spec.get("precision", "fp32") not in PRECISIONS:
        return f"spec.precision must be one of {', '.join(PRECISIONS)}"
    if not _is_int(spec.get("bf16_below", 0)):
        return "spec.bf16_below must be a non-negative integer"
    for key in set(NAME_LIST_FIELDS) & set(spec):
        if not isinstance(spec[key], list) or not all(isinstance(name, str) for name in spec[key]):
            return f"spec.{key} must be a list of names"
    for key in ("buckets", "timesteps_per_bucket", "noise_draws", "proj_dim"):
        if not _is_int(spec[key], 1):
            return f"spec.{key} must be a positive integer"
    if spec["buckets"] > meta["num_train_timesteps"]:
        return "spec.buckets exceeds num_train_timesteps"
    for key in ("noise_seed", "proj_seed"):
        if not _is_int(spec[key]):
            return f"spec.{key} must be a non-negative integer"
    if spec["output"] not in OUTPUT_FUNCTIONS or spec["projector"] not in PROJECTORS:
        return "spec.output or spec.projector is unknown"
    dataset = meta.get("dataset")
    if not isinstance(dataset, dict) or not isinstance(dataset.get("class_names"), list) \
            or not all(isinstance(name, str) for name in dataset["class_names"]) or not dataset["class_names"]:
        return "dataset.class_names must be a non-empty list of strings"
    lambdas = meta.get("lambda")
    if not isinstance(lambdas, list) or len(lambdas) != spec["buckets"] or not all(
            isinstance(item, dict) and isinstance(item.get("value"), (int, float)) and not isinstance(item.get("value"), bool)
            for item in lambdas):
        return "lambda must list one {value: number} per bucket"
    problem = _ivf_problem(meta)
    if problem:
        return problem
    files = meta.get("files")
    expected = {bucket_file(b) for b in range(spec["buckets"])} | {factor_file(b) for b in range(spec["buckets"])} \
        | {"train_images.npy", "train_labels.npy", "train_ids.npy"} \
        | ({center_file(b) for b in range(spec["buckets"])} if meta.get("center") else set())
    if not isinstance(files, dict) or set(files) != expected or not all(isinstance(v, str) for v in files.values()):
        # Only these plain names: a crafted meta.json cannot make the loader read other paths.
        return "files must list exactly the bucket, whitening and training-data files with their sha256"
    return None


def _ivf_problem(meta: dict) -> str | None:
    """What is wrong with index_type and the IVF parameters, or None (no index_type: flat, as before IVF)."""
    index_type = meta.get("index_type", "flat")
    if index_type not in INDEX_TYPES:
        return f"index_type {index_type!r} must be one of {', '.join(INDEX_TYPES)}"
    if index_type == "flat":
        return None
    if meta["format_version"] < FORMAT_VERSION:
        return f"index_type ivf needs format_version {FORMAT_VERSION}, not {meta['format_version']}"
    ivf, buckets = meta.get("ivf"), meta["spec"]["buckets"]
    if not isinstance(ivf, dict) or not _is_int(ivf.get("nlist"), 1):
        return "ivf.nlist must be a positive integer"
    if ivf["nlist"] > meta["count"]:
        return f"ivf.nlist {ivf['nlist']} exceeds the {meta['count']} rows"
    for key in ("nprobe", "nprobe_negative"):
        nprobe = ivf.get(key)
        if not isinstance(nprobe, list) or len(nprobe) != buckets or not all(_is_int(n, 1) and n <= ivf["nlist"] for n in nprobe):
            return f"ivf.{key} must list one integer between 1 and nlist {ivf['nlist']} per bucket"
    return None
