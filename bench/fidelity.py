"""Agreement of projected scores with exact ones, shared by the featurization benches (no traker needed)."""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import spearmanr

from explorer.features import FeatureComputer


def exact_gradients(
    computer: FeatureComputer, images: torch.Tensor, buckets: torch.Tensor | None = None, chunk: int = 32
) -> np.ndarray:
    """Full per-example gradients (P, d) float32, in computer.names order; buckets default to 0."""
    if buckets is None:
        buckets = torch.zeros(len(images), dtype=torch.long)
    rows = []
    for start in range(0, len(images), chunk):
        grads = computer.exact_gradients(images[start : start + chunk], buckets[start : start + chunk])
        rows.append(torch.cat([grads[name].flatten(1) for name in computer.names], dim=1).numpy())
    return np.concatenate(rows)


def agreement(
    train: np.ndarray, queries: np.ndarray, exact_train: np.ndarray, exact_queries: np.ndarray
) -> dict:
    """Mean (and min) over queries of Spearman(projected scores, exact scores) over the training images."""

    def cosine(a, b):
        return (a / np.linalg.norm(a, axis=1, keepdims=True)) @ (
            b / np.linalg.norm(b, axis=1, keepdims=True)
        ).T

    out = {}
    for name, projected, exact in (
        ("inner", queries @ train.T, exact_queries @ exact_train.T),
        ("cosine", cosine(queries, train), cosine(exact_queries, exact_train)),
    ):
        rho = [spearmanr(p, e).statistic for p, e in zip(projected.astype(np.float64), exact)]
        out[name] = {"mean": float(np.mean(rho)), "min": float(np.min(rho))}
    return out


def over_seeds(per_seed: list[dict]) -> dict:
    """Agreement over projection seeds: the mean of the per-seed means, the worst query of any seed, and
    each seed's mean."""
    return {
        kind: {
            "mean": float(np.mean([a[kind]["mean"] for a in per_seed])),
            "min": min(a[kind]["min"] for a in per_seed),
            "per_seed": [a[kind]["mean"] for a in per_seed],
        }
        for kind in ("inner", "cosine")
    }
