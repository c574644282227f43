"""The digits LDS's side studies (precompute.evaluation.digits.lds runs them): ablations of the default method
(one setting changed at a time) and the lambda sweep with a fair (dev-chosen) relative lambda per method.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from explorer.model import load_model
from precompute.evaluation.digits.ground_truth import QuerySet
from precompute.evaluation.digits.scores import (
    cached_features,
    inner_product_scores,
    load_feature_set,
    spec_key,
    trak_scores,
    variant,
    whiten_features,
)
from precompute.evaluation.metrics import LDSBootstrap, fair_split, predictions, spearman_columns

if TYPE_CHECKING:
    from precompute.evaluation.digits.config import LDSConfig


def ablate(
    config: LDSConfig,
    cache: Path,
    full_dir: Path,
    train_images: np.ndarray,
    queries: QuerySet,
    masks: np.ndarray,
    truth: np.ndarray,
    groups: dict,
    best_name: str,
    best: dict,
    scores: dict,
    predicted: dict,
) -> dict:
    """LDS of the best method with one feature-spec setting changed at a time, and its difference from the
    base setting (paired bootstrap). Adds the ablations' scores and predictions to `scores`/`predicted`."""
    model = load_model(full_dir)
    base = variant(config.spec, output=best["output"])
    out = {}
    for name, value in config.ablations:
        spec = variant(base, **{name: value})
        path = cache / "features" / f"full_{spec_key(spec)}.npz"
        features = cached_features(path, model, spec, train_images, queries)
        whitened = whiten_features(features, gcv_cache=path.with_suffix(".gcv.json"))
        key = f"{best['output']}{'-norm' if best['normalize'] else ''}@{name}={value}"
        scores[key] = trak_scores(whitened, features.query_bucket, best["normalize"])
        predicted[key] = predictions(masks, scores[key])
    keys = [k for k in predicted if "@" in k]
    boot = LDSBootstrap(
        truth,
        {best_name: predicted[best_name], **{k: predicted[k] for k in keys}},
        groups,
        config.bootstrap,
        seed=0,
    )
    for key in keys:
        out[key] = {
            "base": best_name,
            "lds": {g: boot.interval(key, g).to_dict() for g in groups},
            "minus_base": {g: boot.difference(key, best_name, g).to_dict() for g in groups},
        }
    return out


def lambda_sweep(
    config: LDSConfig,
    cache: Path,
    masks: np.ndarray,
    truth: np.ndarray,
    groups: dict,
    methods: dict,
    scores: dict[str, np.ndarray],
) -> dict:
    """Mean LDS over a grid of relative lambdas, and without whitening ("inf": gradient dot / cosine).

    A diagnostic, not a method: picking lambda on these numbers would tune it on the benchmark,
    which is what D-TRAK and DAS did and what the GCV choice avoids. It shows how much that tuning
    is worth. "validated" is the fair version of it: lambda picked on half of the queries scored
    with half of the subset models, and reported on the other queries with the other models.
    """
    out = {}
    fair = fair_split(len(masks), groups, config.mask_seed)
    half, pick, test_groups = (
        fair.pick_models,
        fair.pick,
        fair.test_groups,
    )  # even j / half of each kind pick lambda
    for output in config.sweep_outputs:
        spec = variant(config.spec, output=output)
        features = load_feature_set(cache / "features" / f"full_{spec_key(spec)}.npz", spec)
        family = "trak" if output == "loss" else "dtrak"
        entry = {
            "gcv": {
                "relative_lambda": methods[f"{family}-{output}"]["lambda"],
                "raw": {g: methods[f"{family}-{output}"]["lds"][g]["mean"] for g in groups},
                "norm": {g: methods[f"{family}-{output}-norm"]["lds"][g]["mean"] for g in groups},
            }
        }
        split = {
            "gcv": {
                name: _split_lds(masks, truth, half, scores[f"{family}-{output}{suffix}"])
                for name, suffix in (("raw", ""), ("norm", "-norm"))
            }
        }
        grid = [(f"{value:g}", value) for value in config.sweep_lambdas] + [("inf", None)]
        for label, value in grid:
            if value is None:
                train, query = features.train, features.query
            else:
                whitened = whiten_features(features, relative_lambda=value)
                train, query = whitened.train, whitened.query
            entry[label], split[label] = {}, {}
            for normalize, name in ((False, "raw"), (True, "norm")):
                tau = inner_product_scores(train, query, features.query_bucket, normalize)
                per_query = spearman_columns(truth, predictions(masks, tau))
                entry[label][name] = {g: float(np.nanmean(per_query[rows])) for g, rows in groups.items()}
                split[label][name] = _split_lds(masks, truth, half, tau)
        validated = {}
        for name in ("raw", "norm"):
            candidates = [label for label in split if label != "gcv"]
            chosen = max(candidates, key=lambda label: np.nanmean(split[label][name][0][pick]))
            validated[name] = {
                "chosen": chosen,
                "test": {g: _mean(split[chosen][name][1][rows]) for g, rows in test_groups.items()},
                "gcv_test": {g: _mean(split["gcv"][name][1][rows]) for g, rows in test_groups.items()},
            }
        entry["validated"] = validated
        out[output] = entry
    return out


def _mean(values: np.ndarray) -> float:
    """nanmean that gives NaN for an empty or all-NaN group without a warning."""
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if len(finite) else float("nan")


def _split_lds(
    masks: np.ndarray, truth: np.ndarray, half: np.ndarray, tau: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per-query LDS on the subset models of `half`, and on the others."""
    g = predictions(masks, tau)
    return spearman_columns(truth[half], g[half]), spearman_columns(truth[~half], g[~half])
