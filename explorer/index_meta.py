"""meta.json of an index directory as typed, frozen records: FeatureSource (what was featurized: model,
dataset, feature spec, timesteps) and IndexMeta (that, plus how it was scored and stored). IndexMeta.from_json
checks every field before anything in it is trusted and names the bad field and its value; explorer.index
writes it, last, in one place (write_index)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from explorer.errors import ExplorerError
from explorer.features import NAME_LIST_FIELDS, PRECISIONS, FeatureSpec
from explorer.ivf import IVFParams
from explorer.outputs import OUTPUT_FUNCTIONS
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


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    size: int
    fingerprint: str
    class_names: tuple[str, ...]
    resolution: int


@dataclass(frozen=True)
class LambdaRecord:
    """The whitening lambda of one bucket (explorer.whitening.LambdaChoice as stored)."""

    value: float  # absolute lambda added to Phi^T Phi
    relative: float  # lambda / (trace(Phi^T Phi) / k)
    method: str  # "gcv" or "given"
    gcv_curve: tuple[tuple[float, float], ...] = ()


@dataclass(frozen=True)
class FeatureSource:
    """What a featurize computed: the raw features' model, data, spec and timesteps (no scoring choices)."""

    model_hash: str
    model_path: str
    dataset: DatasetInfo
    spec: FeatureSpec
    timesteps: tuple[tuple[int, ...], ...]  # per bucket
    num_train_timesteps: int
    num_params: int


@dataclass(frozen=True)
class IndexMeta(FeatureSource):
    """meta.json: the feature source plus the scoring (lambda, centering, normalization, DAS) and storage."""

    lambdas: tuple[LambdaRecord, ...]  # "lambda" in meta.json, one per bucket
    normalize: bool
    das: bool
    center: bool
    storage: str
    index_type: str
    count: int
    files: tuple[tuple[str, str], ...]  # (file name, sha256), sorted
    format_version: int
    ivf: IVFParams | None = None
    norms: bool = False  # norms_BB.npy stored (bias, self-influence views)

    @property
    def source(self) -> FeatureSource:
        return FeatureSource(**{f.name: getattr(self, f.name) for f in fields(FeatureSource)})

    @property
    def file_hashes(self) -> dict[str, str]:
        return dict(self.files)

    def to_json(self) -> dict:
        out = {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name not in ("spec", "dataset", "lambdas", "ivf", "files")
        }
        out.update(
            spec=self.spec.to_dict(),
            dataset=_plain(asdict(self.dataset)),
            files=dict(self.files),
            timesteps=_plain(self.timesteps),
            **{"lambda": [_plain(asdict(record)) for record in self.lambdas]},
        )
        if self.ivf is not None:
            out["ivf"] = self.ivf.to_meta()
        return dict(sorted(out.items()))

    @classmethod
    def from_json(cls, meta: dict, where: str) -> IndexMeta:
        """A typed IndexMeta from meta.json's dict, or an ExplorerError naming `where`, the field and its
        value."""
        problem = _meta_problem(meta)
        if problem:
            raise ExplorerError(
                f"{where} is malformed ({problem}): rebuild the index with `python -m precompute featurize`"
            )
        dataset, ivf = meta["dataset"], meta.get("ivf")
        return cls(
            model_hash=meta["model_hash"],
            model_path=str(meta["model_path"]),
            dataset=DatasetInfo(
                str(dataset["name"]),
                int(dataset["size"]),
                str(dataset["fingerprint"]),
                tuple(dataset["class_names"]),
                int(dataset["resolution"]),
            ),
            spec=FeatureSpec(**meta["spec"]),
            timesteps=tuple(tuple(bucket) for bucket in meta["timesteps"]),
            num_train_timesteps=meta["num_train_timesteps"],
            num_params=meta["num_params"],
            lambdas=tuple(
                LambdaRecord(
                    float(item["value"]),
                    float(item["relative"]),
                    str(item["method"]),
                    tuple(tuple(point) for point in item["gcv_curve"]),
                )
                for item in meta["lambda"]
            ),
            normalize=meta["normalize"],
            das=meta["das"],
            center=meta["center"],
            storage=meta["storage"],
            index_type=meta["index_type"],
            count=meta["count"],
            files=tuple(sorted(meta["files"].items())),
            format_version=meta["format_version"],
            norms=meta.get("norms", False),
            ivf=None
            if meta["index_type"] == "flat"
            else IVFParams(
                ivf["nlist"],
                list(ivf["nprobe"]),
                list(ivf["nprobe_negative"]),
                list(ivf.get("recall_at_10", [])),
                list(ivf.get("recall_at_10_negative", [])),
                str(ivf.get("rule", "")),
                bool(ivf.get("on_disk", False)),
            ),
        )


def _plain(value):
    """Tuples -> lists, for JSON."""
    if isinstance(value, (tuple, list)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


def read_meta(directory: Path) -> IndexMeta:
    if not directory.is_dir():
        raise ExplorerError(
            f"index directory {str(directory)!r} does not exist: build one with `python -m precompute "
            f"featurize --out {directory}` or pass --index DIR"
        )
    meta_path = directory / META_NAME
    if not meta_path.is_file():
        partial = (
            " (an unfinished featurize: run the same command again to resume)"
            if (directory / ".partial").exists()
            else ""
        )
        raise ExplorerError(
            f"{str(directory)!r} is not a complete index directory: it has no {META_NAME}{partial}"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ExplorerError(f"{str(meta_path)!r} is not valid JSON ({error}): rebuild the index") from error
    if not isinstance(meta, dict) or "format_version" not in meta:
        raise ExplorerError(
            f"{str(meta_path)!r} has no format_version: it is not an index written by precompute"
        )
    if not _is_int(meta["format_version"]) or meta["format_version"] not in READABLE_VERSIONS:
        raise ExplorerError(
            f"index {str(directory)!r} has format version {meta['format_version']!r}, this explorer "
            "reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}: rebuild it with this version's `python -m "
            "precompute featurize`"
        )
    return IndexMeta.from_json(meta, repr(str(meta_path)))


def _is_int(value, minimum: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _show(value) -> str:
    """A value for an error message, cut short."""
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _meta_problem(meta: dict) -> str | None:
    """What is wrong with a meta.json's structure (the field and its value), or None."""
    missing = object()
    for key, test, what in (
        ("model_hash", lambda v: isinstance(v, str), "a string"),
        ("model_path", lambda v: isinstance(v, str), "a string"),
        ("count", _is_int, "a non-negative integer"),
        ("num_train_timesteps", lambda v: _is_int(v, 1), "a positive integer"),
        ("num_params", lambda v: _is_int(v, 1), "a positive integer"),
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
    problem = _spec_problem(meta.get("spec"), meta["num_train_timesteps"])
    if problem:
        return problem
    spec = meta["spec"]
    timesteps = meta.get("timesteps")
    if (
        not isinstance(timesteps, list)
        or len(timesteps) != spec["buckets"]
        or not all(
            isinstance(bucket, list)
            and bucket
            and all(_is_int(t) and t < meta["num_train_timesteps"] for t in bucket)
            for bucket in timesteps
        )
    ):
        return (
            f"timesteps is {_show(timesteps)}, must list the train timesteps of each of the "
            f"{spec['buckets']} buckets"
        )
    dataset = meta.get("dataset")
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
        and _is_int(dataset.get("size"))
        and _is_int(dataset.get("resolution"), 1)
    ):
        return f"dataset is {_show(dataset)}, must give name, size, fingerprint and resolution"
    lambdas = meta.get("lambda")
    if (
        not isinstance(lambdas, list)
        or len(lambdas) != spec["buckets"]
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
    problem = _ivf_problem(meta)
    if problem:
        return problem
    files = meta.get("files")
    expected = (
        {bucket_file(b) for b in range(spec["buckets"])}
        | {factor_file(b) for b in range(spec["buckets"])}
        | {"train_images.npy", "train_labels.npy", "train_ids.npy"}
        | ({center_file(b) for b in range(spec["buckets"])} if meta["center"] else set())
        | ({norms_file(b) for b in range(spec["buckets"])} if meta.get("norms") else set())
        | ({ivfdata_file(b) for b in range(spec["buckets"])} if _on_disk(meta) else set())
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
        if not _is_int(spec[key], minimum):
            return f"spec.{key} is {_show(spec[key])}, must be an integer >= {minimum}"
    if spec["buckets"] > num_train_timesteps:
        return f"spec.buckets {spec['buckets']} exceeds num_train_timesteps {num_train_timesteps}"
    if spec["output"] not in OUTPUT_FUNCTIONS:
        return f"spec.output is {_show(spec['output'])}, must be one of {', '.join(OUTPUT_FUNCTIONS)}"
    if spec["projector"] not in PROJECTORS:
        return f"spec.projector is {_show(spec['projector'])}, must be one of {', '.join(PROJECTORS)}"
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
    if not isinstance(ivf, dict) or not _is_int(ivf.get("nlist"), 1):
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
            or not all(_is_int(n, 1) and n <= ivf["nlist"] for n in nprobe)
        ):
            return (
                f"ivf.{key} is {_show(nprobe)}, must list one integer between 1 and nlist "
                f"{ivf['nlist']} per bucket"
            )
    return None
