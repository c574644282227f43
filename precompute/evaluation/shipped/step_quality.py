"""Per-step quality of attributions without retraining: held-out digits as queries at every bucket's timestep.

    python -m precompute evaluate step-quality --index assets/index [runs/other ...] [--split test]

For each bucket b and each held-out digit q queried at b's timestep, from every training row's score:
- label agreement: share of the top-10 positive influencers whose label is q's (chance ~0.1);
- spread: (max - min) / |max| of the top-10 positive scores; ~0 means the top list is a tie set by rounding;
- positive negatives: whether any of the top-10 "negative" influencers (the lowest scores) has a score > 0.

Candidates are scored from kept raw features through explorer.scoring (the path the index build uses), and the
served index through its own files, so both read the same. The held-out digits are split in two halves by a
seed (precompute.evaluation.shipped.truth.TruthConfig.query_split_seed): settings are chosen on "dev",
reported on "test".
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from explorer.data import to_model_range
from explorer.features import FeatureComputer, FeatureSpec
from explorer.index import AttributionIndex
from explorer.model import DiffusionModel
from explorer.scoring import all_scores, fit_bucket

logger = logging.getLogger(__name__)

TOP = 10


def heldout_split(count: int, seed: int = 0) -> np.ndarray:
    """(count,) bool, True for the dev half: the same split as the LDS benchmark's held-out queries."""
    dev = np.zeros(count, dtype=bool)
    dev[np.random.default_rng(seed).permutation(count)[: count // 2]] = True
    return dev


def query_features(
    model: DiffusionModel, spec: FeatureSpec, images: np.ndarray, cache: Path | None = None
) -> np.ndarray:
    """Raw features of uint8 images (P, H, W) at every bucket: (B, P, k), cached in `cache` (.npy) if
    given."""
    if cache is not None and cache.is_file():
        return np.load(cache)
    computer = FeatureComputer(model, spec)
    phi = computer.all_bucket_features(torch.from_numpy(to_model_range(images))).numpy().transpose(1, 0, 2)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.save(cache, phi)
    return phi


@dataclass
class StepQuality:
    """Per-query measures at one bucket: (P,) each."""

    agreement: np.ndarray
    spread: np.ndarray
    positive_negative: np.ndarray

    def summary(self, rows: np.ndarray) -> dict:
        return {
            "label_agreement": float(self.agreement[rows].mean()),
            "spread_median": float(np.median(self.spread[rows])),
            "spread_min": float(self.spread[rows].min()),
            "positive_negative_share": float(self.positive_negative[rows].mean()),
        }


def step_quality(
    scores: np.ndarray, query_labels: np.ndarray, train_labels: np.ndarray, top: int = TOP
) -> StepQuality:
    """scores (P, N) of every training row for P queries -> the three measures."""
    order = np.argsort(-scores, axis=1, kind="stable")
    best, worst = order[:, :top], order[:, ::-1][:, :top]
    top_scores = np.take_along_axis(scores, best, axis=1)  # (P, top), descending
    spread = (top_scores[:, 0] - top_scores[:, -1]) / np.maximum(np.abs(top_scores[:, 0]), 1e-12)
    agreement = (train_labels[best] == query_labels[:, None]).mean(axis=1)
    positive_negative = (np.take_along_axis(scores, worst, axis=1) > 0).any(axis=1)
    return StepQuality(agreement, spread, positive_negative)


def candidate_scores(
    train_phi: np.ndarray, query_phi: np.ndarray, center: bool, relative_lambda: float, normalize: bool = True
) -> np.ndarray:
    """(P, N) scores of one bucket's candidate setting, through explorer.scoring."""
    scorer, _ = fit_bucket(train_phi, relative_lambda, center, normalize)
    return all_scores(scorer.vectors(train_phi), scorer.vectors(query_phi))


def served_scores(index: AttributionIndex, query_phi: np.ndarray, bucket: int) -> np.ndarray:
    """(P, N) scores of the stored rows of a served index (its own storage, centers and factors)."""
    vectors = index.query_vectors(query_phi, np.full(len(query_phi), bucket))
    return all_scores(index.vectors(bucket), vectors)


def served_table(
    index: AttributionIndex, query_phi: np.ndarray, query_labels: np.ndarray, groups: dict[str, np.ndarray]
) -> dict:
    """{bucket timestep: {group: summary}} of a served index."""
    out = {}
    for bucket in range(index.buckets):
        quality = step_quality(
            served_scores(index, query_phi[bucket], bucket), query_labels, index.train_labels
        )
        out[str(index.meta.timesteps[bucket][0])] = {
            group: quality.summary(rows) for group, rows in groups.items()
        }
    return out


def served_quality(
    model: DiffusionModel,
    index_dirs: list[str],
    heldout_images: np.ndarray,
    heldout_labels: np.ndarray,
    cache: Path | None = None,
) -> dict:
    """{index directory: {label, per_bucket: {timestep: {dev, test, all: summary}}}} of served indexes."""
    dev = heldout_split(len(heldout_images))
    groups = {"dev": np.flatnonzero(dev), "test": np.flatnonzero(~dev), "all": np.arange(len(dev))}
    out = {}
    for directory in index_dirs:
        index = AttributionIndex.load(directory, model_hash=model.weights_hash)
        spec = index.meta.spec
        path = (
            None
            if cache is None
            else cache / f"heldout_{spec.output}_{spec.projector}_{spec.proj_dim}_{spec.proj_seed}.npy"
        )
        phi = query_features(model, spec, heldout_images, path)
        out[str(directory)] = {
            "label": index.label,
            "storage": index.meta.storage,
            "per_bucket": served_table(index, phi, heldout_labels, groups),
        }
    return out
