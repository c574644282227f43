"""The structure checks of an index's meta.json: every field's type and range, the spec, the IVF
parameters and the exact file list, each problem named with the field and its value (explorer.index_meta
reads meta.json through meta_problem before trusting anything in it)."""

from __future__ import annotations

import json

from explorer.features import NAME_LIST_FIELDS, PRECISIONS, FeatureSpec
from explorer.index_files import (
    CENTER_FORMAT_VERSION,
    FORMAT_VERSION,
    INDEX_TYPES,
    STORAGES,
    bucket_file,
    center_file,
    factor_file,
    ivfdata_file,
    norms_file,
)
from explorer.index_methods import IndexMethod, method_problem
from explorer.outputs import OUTPUT_FUNCTIONS
from explorer.projector import PROJECTORS


def is_int(value, minimum: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _show(value) -> str:
    """A value for an error message, cut short."""
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def meta_problem(meta: dict) -> str | None:
    """What is wrong with a meta.json's structure (the field and its value), or None."""
    problem = _scalar_problem(meta) or _spec_problem(meta.get("spec"), meta["num_train_timesteps"])
    if problem:
        return problem  # the checks below read spec.buckets
    buckets = meta["spec"]["buckets"]
    return (
        _timesteps_problem(meta.get("timesteps"), buckets, meta["num_train_timesteps"])
        or _dataset_problem(meta.get("dataset"))
        or _lambda_problem(meta.get("lambda"), buckets)
        or _ivf_problem(meta)
        or method_problem(meta)
        or _lora_problem(meta.get("lora"))
        or _files_problem(meta, buckets)
    )


def _scalar_problem(meta: dict) -> str | None:
    missing = object()
    for key, test, what in (
        ("model_hash", lambda v: isinstance(v, str), "a string"),
        ("model_path", lambda v: isinstance(v, str), "a string"),
        ("count", is_int, "a non-negative integer"),
        ("num_train_timesteps", lambda v: is_int(v, 1), "a positive integer"),
        ("num_params", lambda v: is_int(v, 1), "a positive integer"),
        ("normalize", lambda v: isinstance(v, bool), "true or false"),
        ("das", lambda v: isinstance(v, bool), "true or false"),
        ("center", lambda v: isinstance(v, bool), "true or false"),
        ("norms", lambda v: isinstance(v, bool), "true or false"),
        ("storage", lambda v: v in STORAGES, f"one of {', '.join(STORAGES)}"),
        ("index_type", lambda v: v in INDEX_TYPES, f"one of {', '.join(INDEX_TYPES)}"),
    ):
        value = meta.get(key, False if key == "norms" else missing)  # norms: absent before they were stored
        if value is missing:
            return f"{key} is missing, must be {what}"
        if not test(value):
            return f"{key} is {_show(value)}, must be {what}"
    if meta["center"] and meta["format_version"] < CENTER_FORMAT_VERSION:
        return f"center needs format_version {CENTER_FORMAT_VERSION}, not {meta['format_version']}"
    return None


def _timesteps_problem(timesteps, buckets: int, num_train_timesteps: int) -> str | None:
    if (
        not isinstance(timesteps, list)
        or len(timesteps) != buckets
        or not all(
            isinstance(bucket, list) and bucket and all(is_int(t) and t < num_train_timesteps for t in bucket)
            for bucket in timesteps
        )
    ):
        return (
            f"timesteps is {_show(timesteps)}, must list the train timesteps of each of the {buckets} buckets"
        )
    return None


def _dataset_problem(dataset) -> str | None:
    if (
        not isinstance(dataset, dict)
        or not isinstance(dataset.get("class_names"), list)
        or not all(isinstance(name, str) for name in dataset["class_names"])
        or not dataset["class_names"]
    ):
        return f"dataset.class_names is {_show(dataset)}, must be a non-empty list of strings"
    if not (
        isinstance(dataset.get("name"), str)
        and isinstance(dataset.get("fingerprint"), str)
        and is_int(dataset.get("size"))
        and is_int(dataset.get("resolution"), 1)
    ):
        return f"dataset is {_show(dataset)}, must give name, size, fingerprint and resolution"
    return None


def _lambda_problem(lambdas, buckets: int) -> str | None:
    if (
        not isinstance(lambdas, list)
        or len(lambdas) != buckets
        or not all(
            isinstance(item, dict)
            and _is_number(item.get("value"))
            and _is_number(item.get("relative"))
            and isinstance(item.get("method"), str)
            and isinstance(item.get("gcv_curve"), list)
            for item in lambdas
        )
    ):
        return f"lambda is {_show(lambdas)}, must list one {{value, relative, method, gcv_curve}} per bucket"
    return None


def _files_problem(meta: dict, buckets: int) -> str | None:
    files, method = meta.get("files"), IndexMethod.from_json(meta.get("method"))
    every = range(buckets)
    expected = (
        {bucket_file(b) for b in every}
        | ({factor_file(b) for b in every} if method.whitened else set())
        | {"train_images.npy", "train_labels.npy", "train_ids.npy"}
        | ({center_file(b) for b in every} if meta["center"] else set())
        | ({norms_file(b) for b in every} if meta.get("norms") else set())
        | ({ivfdata_file(b) for b in every} if _on_disk(meta) else set())
        | method.files()
    )
    if (
        not isinstance(files, dict)
        or set(files) - {"train_captions.json"} != expected  # the captions: a text model's index only
        or not all(isinstance(v, str) for v in files.values())
    ):
        # Only these plain names: a crafted meta.json cannot make the loader read other paths.
        return (
            f"files is {_show(files)}, must list exactly the bucket, whitening and training-data "
            "files with their sha256"
        )
    return None


def _spec_problem(spec, num_train_timesteps: int) -> str | None:
    fields_ = set(FeatureSpec().to_dict())
    if not isinstance(spec, dict) or set(spec) != fields_:
        names = sorted(set(spec) ^ fields_) if isinstance(spec, dict) else None
        return f"spec is {_show(spec)}, must hold exactly the FeatureSpec fields" + (
            f" (differs in {', '.join(names)})" if names else ""
        )
    if spec["precision"] not in PRECISIONS:
        return f"spec.precision is {_show(spec['precision'])}, must be one of {', '.join(PRECISIONS)}"
    for key in NAME_LIST_FIELDS:
        if not isinstance(spec[key], list) or not all(isinstance(name, str) for name in spec[key]):
            return f"spec.{key} is {_show(spec[key])}, must be a list of names"
    for key, minimum in (
        ("buckets", 1),
        ("timesteps_per_bucket", 1),
        ("noise_draws", 1),
        ("proj_dim", 1),
        ("noise_seed", 0),
        ("proj_seed", 0),
        ("bf16_below", 0),
    ):
        if not is_int(spec[key], minimum):
            return f"spec.{key} is {_show(spec[key])}, must be an integer >= {minimum}"
    if spec["buckets"] > num_train_timesteps:
        return f"spec.buckets {spec['buckets']} exceeds num_train_timesteps {num_train_timesteps}"
    if spec["output"] not in OUTPUT_FUNCTIONS:
        return f"spec.output is {_show(spec['output'])}, must be one of {', '.join(OUTPUT_FUNCTIONS)}"
    if spec["projector"] not in PROJECTORS:
        return f"spec.projector is {_show(spec['projector'])}, must be one of {', '.join(PROJECTORS)}"
    return None


def _lora_problem(lora) -> str | None:
    """meta.json's lora: absent (no adapter) or {path, scale} (explorer.lora.LoraRecord)."""
    if lora is None:
        return None
    if (
        not isinstance(lora, dict)
        or set(lora) != {"path", "scale"}
        or not isinstance(lora["path"], str)
        or not _is_number(lora["scale"])
    ):
        return f"lora is {_show(lora)}, must be {{path: the adapter as given, scale: a number}}"
    return None


def _on_disk(meta: dict) -> bool:
    ivf = meta.get("ivf")
    return meta.get("index_type") == "ivf" and isinstance(ivf, dict) and ivf.get("on_disk") is True


def _ivf_problem(meta: dict) -> str | None:
    """What is wrong with the IVF parameters of an ivf index, or None."""
    if meta["index_type"] == "flat":
        return None
    if meta["format_version"] < FORMAT_VERSION:
        return f"index_type ivf needs format_version {FORMAT_VERSION}, not {meta['format_version']}"
    ivf, buckets = meta.get("ivf"), meta["spec"]["buckets"]
    if not isinstance(ivf, dict) or not is_int(ivf.get("nlist"), 1):
        return (
            f"ivf.nlist is {_show(ivf.get('nlist') if isinstance(ivf, dict) else ivf)}, must be a "
            "positive integer"
        )
    if ivf["nlist"] > meta["count"]:
        return f"ivf.nlist {ivf['nlist']} exceeds the {meta['count']} rows"
    if not isinstance(ivf.get("on_disk", False), bool):
        return f"ivf.on_disk is {_show(ivf['on_disk'])}, must be true or false"
    for key in ("nprobe", "nprobe_negative"):
        nprobe = ivf.get(key)
        if (
            not isinstance(nprobe, list)
            or len(nprobe) != buckets
            or not all(is_int(n, 1) and n <= ivf["nlist"] for n in nprobe)
        ):
            return (
                f"ivf.{key} is {_show(nprobe)}, must list one integer between 1 and nlist "
                f"{ivf['nlist']} per bucket"
            )
    return None
