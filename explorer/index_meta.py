"""meta.json of an index directory as typed, frozen records: FeatureSource (what was featurized: model,
dataset, feature spec, timesteps) and IndexMeta (that, plus how it was scored and stored). IndexMeta.from_json
checks every field before anything in it is trusted and names the bad field and its value; explorer.index
writes it, last, in one place (write_index)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from explorer.errors import ExplorerError
from explorer.features import FeatureSpec
from explorer.index_checks import is_int, meta_problem
from explorer.index_files import (  # noqa: F401  (re-exported: the index's names live in one place)
    CENTER_FORMAT_VERSION,
    FLAT_FORMAT_VERSION,
    FORMAT_VERSION,
    INDEX_TYPES,
    META_NAME,
    NORM_COLUMNS,
    READABLE_VERSIONS,
    STORAGES,
    bucket_file,
    center_file,
    factor_file,
    ivfdata_file,
    norms_file,
)
from explorer.index_methods import IndexMethod
from explorer.ivf import IVFParams
from explorer.lora import LoraRecord


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
    # the LoRA adapter the model was loaded with (its files are in model_hash too); None: none
    lora: LoraRecord | None = field(default=None, kw_only=True)


@dataclass(frozen=True)
class IndexMeta(FeatureSource):
    """meta.json: the feature source plus the scoring (lambda, centering, normalization, residual weights,
    method) and storage."""

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
    method: IndexMethod = IndexMethod()  # what the rows and queries are (explorer.index_methods)

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
            if f.name not in ("spec", "dataset", "lambdas", "ivf", "files", "method", "lora")
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
        if self.method != IndexMethod():
            out["method"] = self.method.to_json()
        if self.lora is not None:
            out["lora"] = asdict(self.lora)
        return dict(sorted(out.items()))

    @classmethod
    def from_json(cls, meta: dict, where: str) -> IndexMeta:
        """A typed IndexMeta from meta.json's dict, or an ExplorerError naming `where`, the field and its
        value."""
        problem = meta_problem(meta)
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
            method=IndexMethod.from_json(meta.get("method")),
            lora=None if meta.get("lora") is None else LoraRecord(**meta["lora"]),
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
    if not is_int(meta["format_version"]) or meta["format_version"] not in READABLE_VERSIONS:
        raise ExplorerError(
            f"index {str(directory)!r} has format version {meta['format_version']!r}, this explorer "
            "reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}: rebuild it with this version's `python -m "
            "precompute featurize`"
        )
    return IndexMeta.from_json(meta, repr(str(meta_path)))
