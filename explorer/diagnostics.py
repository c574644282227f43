"""Index-wide diagnostics: the timestep bias of raw scores, self-influence, near copies of training images.

- Timestep bias (Diffusion-ReTrac section 3): unnormalized scores favour training images whose gradients are
  large at a timestep, so the same few images top every query's list. Per bucket: the distribution of the
  gradient norms (|phi_i|, |phi_i - c|, whitened |psi_i|, stored as norms_BB.npy) and how concentrated the
  top-k lists of many queries are, with raw TRAK scores psi_q . psi_i against the normalized cosines.
- Self-influence (TRAK's leverage): |psi_i|^2 = phi_i^T (Phi^T Phi + lambda I)^-1 phi_i, the score of a
  training image on itself; the highest are outliers, mislabelled or memorized candidates.
- Near copies: a generated image's nearest training images in pixels, flagged as a near copy when the nearest
  is much closer than the next ones: l2 to the nearest over the mean l2 to the NEIGHBOURS nearest, a relative
  distance in the spirit of Carlini et al. 2023 ("Extracting training data from diffusion models"), since
  an absolute l2 threshold means little across datasets. NEIGHBOURS and COPY_RATIO are this project's
  choices; the same ratio of every training image against the rest of the training set is the reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from explorer.errors import ExplorerError
from explorer.index import AttributionIndex
from explorer.index_meta import NORM_COLUMNS

QUANTILES = (5, 25, 50, 75, 95)
BIAS_QUERIES = 256  # training rows used as queries for the concentration of top-k lists
NEIGHBOURS = 50  # training images the nearest one is compared with
COPY_RATIO = 0.5  # nearest / mean of the NEIGHBOURS nearest below this: a near copy


@dataclass(frozen=True)
class TimestepBias:
    timesteps: list[int]  # the first timestep of each bucket
    norm_quantiles: dict[str, np.ndarray]  # NORM_COLUMNS name -> (B, len(QUANTILES))
    top_share: dict[
        str, np.ndarray
    ]  # "raw" / "normalized" -> (B,) share of all top-k slots held by the top_k
    distinct: dict[str, np.ndarray]  # "raw" / "normalized" -> (B,) distinct images over all top-k slots
    queries: int
    top_k: int


def _row_norms(vectors: np.ndarray) -> np.ndarray:
    return np.maximum(np.linalg.norm(vectors, axis=1), 1e-12)


def _top_lists(scores: np.ndarray, query_rows: np.ndarray, top_k: int) -> np.ndarray:
    """(Q, top_k) rows with the highest scores per query, the query's own row left out."""
    scores = scores.copy()
    scores[np.arange(len(query_rows)), query_rows] = -np.inf
    return np.argpartition(-scores, top_k, axis=1)[:, :top_k]


def concentration(lists: np.ndarray, count: int) -> tuple[float, float]:
    """(share of all slots held by the len(row) most frequent images, distinct images / slots) of top-k
    lists (Q, k) over `count` training rows: 1/Q and 1 when every query has its own list."""
    frequency = np.bincount(lists.ravel(), minlength=count)
    k = lists.shape[1]
    return float(np.sort(frequency)[-k:].sum() / lists.size), float((frequency > 0).sum() / lists.size)


def timestep_bias(
    index: AttributionIndex, queries: int = BIAS_QUERIES, top_k: int = 10, seed: int = 0
) -> TimestepBias:
    """Norm distributions and top-k concentration per bucket; training rows (seeded) serve as the queries."""
    count = index.meta.count
    rows = np.sort(np.random.default_rng(seed).choice(count, min(queries, count - 1), replace=False))
    quantiles = {name: [] for name in NORM_COLUMNS}
    share, distinct = {"raw": [], "normalized": []}, {"raw": [], "normalized": []}
    for bucket in range(index.buckets):
        norms = index.norms(bucket)
        for column, name in enumerate(NORM_COLUMNS):
            quantiles[name].append(np.percentile(norms[:, column], QUANTILES))
        stored = index.vectors(bucket)
        # raw TRAK scores are |psi_q| |psi_i| u_q . u_i: per query, ranked by |psi_i| cos
        units = stored / _row_norms(stored)[:, None]
        cosines = units[rows] @ units.T
        for kind, scores in (("normalized", cosines), ("raw", cosines * norms[:, 2][None, :])):
            top_share, spread = concentration(_top_lists(scores, rows, top_k), count)
            share[kind].append(top_share)
            distinct[kind].append(spread)
    return TimestepBias(
        [int(t[0]) for t in index.meta.timesteps],
        {name: np.array(values) for name, values in quantiles.items()},
        {kind: np.array(values) for kind, values in share.items()},
        {kind: np.array(values) for kind, values in distinct.items()},
        len(rows),
        top_k,
    )


def self_influence(index: AttributionIndex, bucket: int | None = None) -> np.ndarray:
    """(N,) |psi_i|^2 at one bucket, or averaged over buckets (None)."""
    if bucket is not None and not 0 <= bucket < index.buckets:
        raise ExplorerError(f"bucket {bucket} is out of range: this index has buckets 0..{index.buckets - 1}")
    buckets = range(index.buckets) if bucket is None else [bucket]
    return np.mean([index.norms(b)[:, 2] ** 2 for b in buckets], axis=0)


@dataclass(frozen=True)
class NearestTraining:
    positions: np.ndarray  # (k,) training rows, nearest first
    distances: np.ndarray  # (k,) RMS pixel distance in [0, 1] units
    ratio: float  # nearest / mean of the NEIGHBOURS nearest
    percentile: float  # share (%) of training images whose own nearest neighbour is farther than this one
    ratio_percentile: float  # share (%) of training images whose own ratio (to the rest) is below this one

    @property
    def near_copy(self) -> bool:
        return self.ratio < COPY_RATIO


def _flat(images: np.ndarray) -> np.ndarray:
    return images.reshape(len(images), -1).astype(np.float64) / 255.0  # float64: |a|^2 + |b|^2 - 2ab cancels


def _pixel_distances(queries: np.ndarray, train: np.ndarray) -> np.ndarray:
    """(Q, N) RMS distances of flattened [0, 1] images."""
    squared = (queries**2).sum(1)[:, None] + (train**2).sum(1)[None, :] - 2 * queries @ train.T
    return np.sqrt(np.maximum(squared, 0) / train.shape[1])


class NearCopies:
    """Nearest training images in pixels, with the training set's own leave-one-out nearest distances and
    ratios as the reference (computed once per index)."""

    def __init__(self, index: AttributionIndex):
        self.index = index
        self.train = _flat(index.train_images)
        neighbours = min(NEIGHBOURS, len(self.train) - 2)
        self.own_nearest = np.empty(len(self.train), np.float32)
        self.own_ratio = np.empty(len(self.train), np.float32)
        for start in range(0, len(self.train), 1024):  # blocks bound the (block, N) distance matrix
            block = _pixel_distances(self.train[start : start + 1024], self.train)
            block[np.arange(len(block)), np.arange(start, start + len(block))] = np.inf
            closest = np.sort(np.partition(block, neighbours + 1, axis=1)[:, : neighbours + 1], axis=1)
            rows = slice(start, start + len(block))
            self.own_nearest[rows] = closest[:, 0]
            self.own_ratio[rows] = closest[:, 0] / np.maximum(closest[:, 1:].mean(1), 1e-12)

    def nearest(self, image: np.ndarray, top_k: int = 8) -> NearestTraining:
        """image: uint8 at the index's training resolution ((H, W) or (H, W, 3))."""
        expected = self.index.train_images.shape[1:]
        if image.shape != expected or image.dtype != np.uint8:
            raise ExplorerError(f"image of shape {image.shape} {image.dtype} must be uint8 {expected}")
        distances = _pixel_distances(_flat(image[None]), self.train)[0]
        order = np.argsort(distances, kind="stable")
        neighbours = distances[order[1 : NEIGHBOURS + 1]].mean()
        ratio = float(distances[order[0]] / max(neighbours, 1e-12))
        return NearestTraining(
            order[:top_k],
            distances[order[:top_k]],
            ratio,
            float((self.own_nearest > distances[order[0]]).mean() * 100.0),
            float((self.own_ratio < ratio).mean() * 100.0),
        )
