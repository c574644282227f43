"""The shipped default, settled on the LDS benchmark: projection size k, lambda rule, output function.

Part of `python -m precompute evaluate lds` (results["defaults"]). Every variant is re-scored from the
cached k = 2048 features: a smaller k is the same count sketch folded (`fold_features`), so no gradient
is recomputed.

1. score every (output, normalization, k, lambda): the shipped output raw and ReTrac-normalized at every
   k, the other outputs normalized at the shippable k's; lambda by GCV or a fixed relative lambda;
2. LDS on the whole benchmark (95% bootstrap CI over subset models), each lambda paired with the
   reference lambda (the sensitivity to a factor of 10);
3. the fair protocol per (output, normalization, k): lambda (GCV included) picked on half of the
   queries with the even subset models, LDS reported on the other queries with the odd models;
4. paired differences at the fairly chosen lambdas: k against k, output against output, fixed lambda
   against GCV, and the stored-vector precision (FAISS fp16 / int8 scalar quantizers) against float32.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from explorer.errors import ExplorerError
from explorer.features import FeatureSpec
from explorer.whitening import normalize_rows
from precompute.evaluation.digits.scores import (
    FeatureSet,
    fold_features,
    inner_product_scores,
    load_feature_set,
    spec_key,
    trak_scores,
    variant,
    whiten_features,
)
from precompute.evaluation.metrics import FairSplit, LDSBootstrap, predictions, spearman_columns

logger = logging.getLogger(__name__)

STORAGES = {"float16": faiss.ScalarQuantizer.QT_fp16, "int8": faiss.ScalarQuantizer.QT_8bit}


@dataclass
class DefaultsConfig:
    output: str = "mean"  # the output function to ship: raw and ReTrac-normalized at every k of `dims`
    dims: tuple[int, ...] = (256, 512, 2048)  # k studied for `output` (each divides the cached k)
    shippable: tuple[int, ...] = (
        256,
        512,
    )  # k's whose index fits the size budget: `compare` and storage run here
    compare: tuple[str, ...] = (
        "square",
        "loss",
    )  # the other outputs, ReTrac-normalized, at the shippable k's
    lambdas: tuple[float, ...] = (
        1e-3,
        3e-3,
        1e-2,
        1e-1,
        1.0,
    )  # fixed lambdas relative to the mean eigenvalue of Phi^T Phi
    reference: float = 1e-2  # every lambda is also reported minus this one (paired)
    storages: tuple[str, ...] = (
        "float16",
        "int8",
    )  # stored-vector precisions, `output` normalized at the reference


def row_key(output: str, normalize: bool, k: int, label: str) -> str:
    family = "trak" if output == "loss" else "dtrak"
    return f"{family}-{output}{'-norm' if normalize else ''}@k={k},lambda={label}"


def quantized(vectors: np.ndarray, storage: str) -> np.ndarray:
    """What a FAISS scalar-quantizer index gives back for `vectors` (N, k): fp16, or int8 with a
    per-dimension range."""
    if storage not in STORAGES:
        raise ExplorerError(f"unknown storage {storage!r}: use one of {', '.join(STORAGES)}")
    index = faiss.IndexScalarQuantizer(vectors.shape[1], STORAGES[storage], faiss.METRIC_INNER_PRODUCT)
    data = np.ascontiguousarray(vectors, dtype=np.float32)
    index.train(data)
    index.add(data)
    return index.reconstruct_n(0, len(data))


def _variants(config: DefaultsConfig) -> dict[tuple[str, int], tuple[bool, ...]]:
    """(output, k) -> the normalizations studied there."""
    out = {(config.output, k): (False, True) for k in config.dims}
    for output in config.compare:
        for k in config.shippable:
            out[(output, k)] = (True,)
    return out


def _score_all(
    config: DefaultsConfig, base: FeatureSpec, features_dir: Path, masks: np.ndarray
) -> tuple[dict, dict]:
    """Step 1: predictions g (M, Q) and a description of every row."""
    rows, predicted = {}, {}
    labels = [("gcv", None)] + [(f"{value:g}", value) for value in config.lambdas]
    loaded: dict[str, FeatureSet] = {}
    for (output, k), normalizations in _variants(config).items():
        if output not in loaded:
            spec = variant(base, output=output)
            loaded = {
                output: load_feature_set(features_dir / f"full_{spec_key(spec)}.npz", spec)
            }  # one output in memory
        full = loaded[output]
        features = full if k == full.spec.proj_dim else fold_features(full, k)
        for label, value in labels:
            gcv_cache = features_dir / f"full_{spec_key(features.spec)}.gcv.json" if value is None else None
            whitened = whiten_features(features, relative_lambda=value, gcv_cache=gcv_cache)
            for normalize in normalizations:
                key = row_key(output, normalize, k, label)
                predicted[key] = predictions(masks, trak_scores(whitened, features.query_bucket, normalize))
                rows[key] = {
                    "output": output,
                    "normalize": normalize,
                    "k": k,
                    "lambda": label,
                    "relative_lambda": {str(b): v for b, v in whitened.relative_lambda.items()},
                }
            if output == config.output and k in config.shippable and value == config.reference:
                query = normalize_rows(whitened.query)
                for storage in config.storages:
                    train = {b: quantized(normalize_rows(psi), storage) for b, psi in whitened.train.items()}
                    key = row_key(output, True, k, label) + f",{storage}"
                    predicted[key] = predictions(
                        masks, inner_product_scores(train, query, features.query_bucket, False)
                    )
                    rows[key] = dict(rows[row_key(output, True, k, label)], storage=storage)
            logger.info("defaults: %s k=%d lambda=%s scored", output, k, label)
    return rows, predicted


def _fair(
    rows: dict, predicted: dict, truth: np.ndarray, groups: dict, fair: FairSplit, resamples: int, seed: int
) -> dict:
    """Step 3: per (output, normalization, k), the lambda with the best mean LDS on the pick half, and every
    lambda's LDS on the test half (CI over the test models)."""
    test_rows = np.flatnonzero(~fair.pick)
    local = {
        g: np.searchsorted(test_rows, rows) for g, rows in fair.test_groups.items()
    }  # rows of the test columns
    pick_models, test_models = fair.pick_models, ~fair.pick_models
    plain = [key for key, row in rows.items() if "storage" not in row]
    boot = LDSBootstrap(
        truth[test_models][:, test_rows],
        {key: predicted[key][test_models][:, test_rows] for key in plain},
        local,
        resamples,
        seed,
    )
    out = {}
    for key in plain:
        row = rows[key]
        family = key.split("@")[0] + f"@k={row['k']}"
        pick_lds = float(
            np.nanmean(
                spearman_columns(truth[pick_models][:, fair.pick], predicted[key][pick_models][:, fair.pick])
            )
        )
        entry = out.setdefault(
            family,
            {
                "output": row["output"],
                "normalize": row["normalize"],
                "k": row["k"],
                "pick_lds": {},
                "test": {},
            },
        )
        entry["pick_lds"][row["lambda"]] = pick_lds
        entry["test"][row["lambda"]] = {g: boot.interval(key, g).to_dict() for g in local}
    for entry in out.values():
        entry["chosen"] = max(entry["pick_lds"], key=entry["pick_lds"].get)
    return out


def shipped_defaults(
    config: DefaultsConfig,
    base: FeatureSpec,
    features_dir: Path,
    masks: np.ndarray,
    truth: np.ndarray,
    groups: dict[str, np.ndarray],
    fair: FairSplit,
    resamples: int,
    seed: int = 0,
) -> dict:
    """Every number of the "shipped default" section (see the module docstring)."""
    rows, predicted = _score_all(config, base, features_dir, masks)

    # 2. LDS on the whole benchmark, and each lambda minus the reference lambda
    boot = LDSBootstrap(truth, predicted, groups, resamples, seed)
    reference = f"{config.reference:g}"
    for key, row in rows.items():
        row["lds"] = {g: boot.interval(key, g).to_dict() for g in groups}
        same = row_key(row["output"], row["normalize"], row["k"], reference)
        if "storage" in row:
            row["minus_float32"] = {g: boot.difference(key, same, g).to_dict() for g in groups}
        elif row["lambda"] != reference and same in rows:
            row["minus_reference"] = {g: boot.difference(key, same, g).to_dict() for g in groups}

    # 3. the fair protocol
    chosen = _fair(rows, predicted, truth, groups, fair, resamples, seed)

    # 4. paired differences at the fairly chosen lambdas (whole benchmark)
    def at_chosen(output: str, normalize: bool, k: int) -> str:
        family = row_key(output, normalize, k, "x").split("@")[0] + f"@k={k}"
        return row_key(output, normalize, k, chosen[family]["chosen"])

    pairs = {}
    for normalize in (True, False):
        suffix = "-norm" if normalize else ""
        for k in config.dims:
            first = at_chosen(config.output, normalize, k)
            pairs[f"{config.output}{suffix}@k={k}: chosen lambda minus GCV"] = (
                first,
                row_key(config.output, normalize, k, "gcv"),
            )
            for other in config.dims:
                if other > k:
                    pairs[f"{config.output}{suffix}: k={k} minus k={other} (chosen lambdas)"] = (
                        first,
                        at_chosen(config.output, normalize, other),
                    )
    for k in config.shippable:
        for output in config.compare:
            pairs[f"@k={k}: {config.output}-norm minus {output}-norm (chosen lambdas)"] = (
                at_chosen(config.output, True, k),
                at_chosen(output, True, k),
            )
    differences = {
        name: {g: boot.difference(first, second, g).to_dict() for g in groups}
        for name, (first, second) in pairs.items()
    }
    return {
        "config": {
            "output": config.output,
            "dims": list(config.dims),
            "shippable": list(config.shippable),
            "compare": list(config.compare),
            "lambdas": list(config.lambdas),
            "reference": config.reference,
            "storages": list(config.storages),
            "folded_from_k": base.proj_dim,
        },
        "rows": rows,
        "fair": chosen,
        "differences": differences,
    }
