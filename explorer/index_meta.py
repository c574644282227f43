"""meta.json of an index directory: the format versions, the file names, and the checks of a meta.json's
structure that run before anything in it is trusted (explorer.index reads and writes the directory)."""

from __future__ import annotations

import json
from pathlib import Path

from explorer.errors import ExplorerError
from explorer.projector import PROJECTORS

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


def factor_file(bucket: int) -> str:
    return f"whiten_{bucket:02d}.npy"


def center_file(bucket: int) -> str:
    return f"center_{bucket:02d}.npy"


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
