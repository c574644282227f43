"""Metrics of attribution accuracy: LDS with a bootstrap over subsets, and ReTrac's distinctness.

LDS (linear datamodeling score, TRAK section 2; D-TRAK eq. 9): for query q, the Spearman rank
correlation over subsets j between the true output f_j(q) and the prediction
g_j(q) = -sum_{i in S_j} tau(q, i). The 95% interval comes from resampling the subsets with
replacement (the same resamples for every method, so differences between methods get intervals too).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata

from explorer.errors import ExplorerError


def predictions(masks: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """g (M, Q) = -masks (M, N) @ tau^T (N, Q): positive tau = including i lowers the loss."""
    return -(masks.astype(np.float64) @ scores.astype(np.float64).T)


def spearman_columns(truth: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """Spearman correlation of each column of two (M, Q) arrays -> (Q,); NaN where a column is constant."""
    a = rankdata(truth, axis=0)
    b = rankdata(predicted, axis=0)
    a -= a.mean(0)
    b -= b.mean(0)
    denominator = np.sqrt((a**2).sum(0) * (b**2).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (a * b).sum(0) / denominator, np.nan)


@dataclass
class Interval:
    mean: float
    low: float
    high: float

    def to_dict(self) -> dict:
        return {"mean": self.mean, "ci95": [self.low, self.high]}

    def __str__(self) -> str:
        return f"{self.mean:.3f} [{self.low:.3f}, {self.high:.3f}]"


class LDSBootstrap:
    """Per-query LDS of every method, and the bootstrap distribution of group means over subsets."""

    def __init__(
        self,
        truth: np.ndarray,
        predicted: dict[str, np.ndarray],
        groups: dict[str, np.ndarray],
        resamples: int = 1000,
        seed: int = 0,
    ):
        m = truth.shape[0]
        if m < 3:
            raise ExplorerError(f"{m} subsets are too few for a rank correlation: use --subsets 4 or more")
        self.groups = groups
        self.per_query = {name: spearman_columns(truth, g) for name, g in predicted.items()}
        rng = np.random.default_rng(seed)
        draws = [rng.integers(0, m, m) for _ in range(resamples)]
        self.samples: dict[str, dict[str, np.ndarray]] = {}  # method -> group -> (resamples,)
        for name, g in predicted.items():
            per_draw = np.stack([spearman_columns(truth[d], g[d]) for d in draws])  # (resamples, Q)
            self.samples[name] = {
                group: np.nanmean(per_draw[:, rows], axis=1) for group, rows in groups.items()
            }

    def interval(self, method: str, group: str) -> Interval:
        mean = float(np.nanmean(self.per_query[method][self.groups[group]]))
        low, high = np.nanpercentile(self.samples[method][group], [2.5, 97.5])
        return Interval(mean, float(low), float(high))

    def difference(self, first: str, second: str, group: str) -> Interval:
        """LDS(first) - LDS(second) with a paired bootstrap interval."""
        rows = self.groups[group]
        mean = float(np.nanmean(self.per_query[first][rows]) - np.nanmean(self.per_query[second][rows]))
        low, high = np.nanpercentile(self.samples[first][group] - self.samples[second][group], [2.5, 97.5])
        return Interval(mean, float(low), float(high))


def distinctness(scores: np.ndarray, top: int = 10) -> float:
    """Share of distinct training rows among all queries' top-`top` positive lists (Diffusion-ReTrac).

    1.0: every query has its own influencers; low: a few "generally influential" rows dominate.
    """
    if scores.ndim != 2 or scores.shape[1] < top:
        raise ExplorerError(f"scores of shape {scores.shape} cannot give top-{top} lists")
    best = np.argpartition(-scores, top - 1, axis=1)[:, :top]  # (Q, top)
    return float(len(np.unique(best)) / best.size)


@dataclass
class FairSplit:
    """Validation without peeking: a setting is picked on the `pick` queries scored with the `pick_models`
    subset models, and reported on the other queries (`test_groups`) with the other models."""

    pick_models: np.ndarray  # (M,) bool: even j
    pick: np.ndarray  # (Q,) bool: half of each query kind
    test_groups: dict[str, np.ndarray]  # group -> query rows not in `pick`


def fair_split(
    subsets: int, groups: dict[str, np.ndarray], seed: int, kinds=("heldout", "generated", "journey")
) -> FairSplit:
    """Even subset models pick, odd ones test; a seeded random half of every query kind picks."""
    rng = np.random.default_rng(seed)
    pick = np.zeros(len(groups["all"]), dtype=bool)  # groups["all"] is every query
    for kind in kinds:
        rows = groups[kind]
        pick[rng.permutation(rows)[: len(rows) // 2]] = True
    test_groups = {g: np.intersect1d(rows, np.flatnonzero(~pick)) for g, rows in groups.items()}
    return FairSplit(pick_models=np.arange(subsets) % 2 == 0, pick=pick, test_groups=test_groups)


BOOTSTRAP = 1000  # resamples of every LDS interval


def lds_interval(
    truth: np.ndarray, predicted: np.ndarray, clusters: np.ndarray, seed: int = 0, resamples: int = BOOTSTRAP
) -> dict:
    """Mean per-query LDS of (M, Q) truth and predictions, with a 95% bootstrap over models and over query
    clusters (clusters (Q,): queries of one trajectory share a cluster)."""
    per_query = spearman_columns(truth, predicted)
    m = len(truth)
    labels = np.unique(clusters)
    members = [np.flatnonzero(clusters == c) for c in labels]
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(resamples):
        models = rng.integers(0, m, m)
        rows = np.concatenate([members[c] for c in rng.integers(0, len(labels), len(labels))])
        values = spearman_columns(truth[models][:, rows], predicted[models][:, rows])
        draws.append(np.nanmean(values))
    low, high = np.nanpercentile(draws, [2.5, 97.5])
    return {
        "mean": float(np.nanmean(per_query)),
        "ci95": [float(low), float(high)],
        "queries": int(len(per_query)),
        "models": int(m),
    }


def paired_interval(
    truth: np.ndarray, first: np.ndarray, second: np.ndarray, clusters: np.ndarray, seed: int = 0
) -> dict:
    """Mean per-query LDS of `first` minus that of `second` (both (M, Q) against the same truth), with a
    95% bootstrap over models and query clusters (lds_interval's draws, shared by both)."""
    difference = np.nanmean(spearman_columns(truth, first)) - np.nanmean(spearman_columns(truth, second))
    labels = np.unique(clusters)
    members = [np.flatnonzero(clusters == c) for c in labels]
    rng, m, draws = np.random.default_rng(seed), len(truth), []
    for _ in range(BOOTSTRAP):
        models = rng.integers(0, m, m)
        rows = np.concatenate([members[c] for c in rng.integers(0, len(labels), len(labels))])
        t = truth[models][:, rows]
        draws.append(
            np.nanmean(spearman_columns(t, first[models][:, rows]))
            - np.nanmean(spearman_columns(t, second[models][:, rows]))
        )
    low, high = np.nanpercentile(draws, [2.5, 97.5])
    return {"mean": float(difference), "ci95": [float(low), float(high)]}


def mean_interval(values: np.ndarray, resamples: int, seed: int = 0) -> dict:
    """The mean of `values` (n,) with a 95% bootstrap interval over its entries (resampled with
    replacement)."""
    rng = np.random.default_rng(seed)
    means = [values[rng.integers(0, len(values), len(values))].mean() for _ in range(resamples)]
    return Interval(float(values.mean()), *map(float, np.percentile(means, [2.5, 97.5]))).to_dict()
