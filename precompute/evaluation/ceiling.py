"""How much of a retraining ground truth is signal, and the LDS a perfect method could reach against it.

A truth value y[s, m, q] is the output of the model trained on subset s with recipe seed m, for query q.
Every subset is trained with the same seeds, so y splits into a subset effect (the data: what an
attribution method predicts), a seed offset shared by all subsets (the same init and draws: invisible to
a rank correlation over subsets) and a residual (seed noise that differs between subsets):

    y[s, m] = mu + a[s] + b[m] + e[s, m]

The share of signal is the consistency intra-class correlation ICC = var(a) / (var(a) + var(e))
(two-way ANOVA without replication, McGraw & Wong's ICC(C,1)). A truth that averages m seeds has
reliability m ICC / (1 + (m - 1) ICC) (Spearman-Brown), and a method that knew a[s] exactly would reach a
correlation of sqrt(reliability) with it (a little less as a Spearman): the ceiling of the LDS. The EK-FAC
diffusion paper (arXiv 2410.13850) shows the empirical twin of that number beside every method: one seed's
truth against the mean of the others; `leave_one_seed_out` computes it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from precompute.evaluation.metrics import spearman_columns


@dataclass(frozen=True)
class SignalShare:
    """Variance components of a (S subsets, m seeds, Q queries) truth, per query and pooled."""

    subset_mean_square: np.ndarray  # (Q,) MS of the subset effect, (S - 1) degrees of freedom
    residual_mean_square: np.ndarray  # (Q,) MS of the residual, (S - 1)(m - 1) degrees of freedom
    subsets: int
    seeds: int

    @property
    def per_query(self) -> np.ndarray:
        """(Q,) ICC of every query, var(a) = (MS_subset - MS_residual) / m clipped at 0."""
        signal = np.clip((self.subset_mean_square - self.residual_mean_square) / self.seeds, 0, None)
        total = signal + self.residual_mean_square
        return np.divide(signal, total, out=np.zeros_like(total), where=total > 0)

    @property
    def median(self) -> float:
        return float(np.median(self.per_query))

    @property
    def pooled(self) -> float:
        """One ICC for all queries, free of each query's scale: theta = var(a) / var(e) from each query's
        F = MS_subset / MS_residual, E[F] = (1 + m theta) df / (df - 2) for normal residuals with df
        degrees of freedom, averaged unclipped over queries and turned into theta / (1 + theta). A mean of
        clipped per-query ratios drifts upwards with few subsets; this does not. With df <= 2 (too few
        subsets or seeds for F to have a mean) it falls back to that mean."""
        df = (self.subsets - 1) * (self.seeds - 1)
        if df <= 2:
            return float(np.mean(self.per_query))
        defined = self.residual_mean_square > 0
        f = self.subset_mean_square[defined] / self.residual_mean_square[defined]
        theta = float(np.mean((f * (df - 2) / df - 1) / self.seeds))
        return max(theta, 0.0) / (1 + max(theta, 0.0))


def signal_share(truth: np.ndarray) -> SignalShare:
    """Two-way decomposition of truth (S, m, Q) with S >= 2 subsets and m >= 2 seeds shared across them."""
    if truth.ndim != 3 or truth.shape[0] < 2 or truth.shape[1] < 2:
        raise ValueError(f"truth must be (subsets >= 2, seeds >= 2, queries), got shape {truth.shape}")
    y = truth.astype(np.float64)
    subsets, seeds = y.shape[:2]
    subset_means = y.mean(1, keepdims=True)  # (S, 1, Q)
    seed_means = y.mean(0, keepdims=True)  # (1, m, Q)
    grand = y.mean((0, 1), keepdims=True)
    residual = y - subset_means - seed_means + grand
    ms_subset = seeds * ((subset_means - grand) ** 2).sum((0, 1)) / (subsets - 1)
    ms_residual = (residual**2).sum((0, 1)) / ((subsets - 1) * (seeds - 1))
    return SignalShare(ms_subset, ms_residual, subsets, seeds)


def reliability(icc: float | np.ndarray, seeds: int) -> float | np.ndarray:
    """Spearman-Brown: the share of signal in the mean of `seeds` models."""
    return seeds * icc / (1 + (seeds - 1) * icc)


def ceiling(icc: float | np.ndarray, seeds: int) -> float | np.ndarray:
    """Spearman correlation of a perfect prediction of the subset effect with a truth averaging `seeds`
    models: Pearson sqrt(reliability), turned into Spearman's rho for normal variables (6 / pi) arcsin(r / 2)
    (the LDS is a Spearman)."""
    return 6 / np.pi * np.arcsin(np.sqrt(reliability(icc, seeds)) / 2)


def leave_one_seed_out(truth: np.ndarray) -> np.ndarray:
    """(Q,) Spearman over subsets between one seed's truth and the mean of the other seeds, averaged over
    which seed is left out: the "exact retraining" bar of arXiv 2410.13850 (a ceiling of a single-seed
    truth predicted by a (m - 1)-seed mean, so it understates the ceiling of the m-seed mean)."""
    seeds = truth.shape[1]
    if seeds < 2:
        raise ValueError(f"leave-one-seed-out needs >= 2 seeds per subset, got {seeds}")
    rows = []
    for m in range(seeds):
        others = np.delete(truth, m, axis=1).mean(1)  # (S, Q)
        rows.append(spearman_columns(truth[:, m], others))
    return np.mean(rows, axis=0)


def complete_subsets(subsets: np.ndarray, seeds: np.ndarray) -> tuple[list[int], list[int]]:
    """The subsets that have a model for every seed any subset has, and those seeds (both sorted)."""
    all_seeds = sorted(set(seeds.tolist()))
    have = set(zip(subsets.tolist(), seeds.tolist()))
    return sorted(j for j in set(subsets.tolist()) if all((j, s) in have for s in all_seeds)), all_seeds


def seed_grid(values: np.ndarray, subsets: np.ndarray, seeds: np.ndarray, keep: list[int]) -> np.ndarray:
    """(M, Q) rows of models -> (S, m, Q) for the subsets in `keep`, seeds sorted."""
    all_seeds = sorted(set(seeds.tolist()))
    row = {(int(j), int(s)): i for i, (j, s) in enumerate(zip(subsets, seeds))}
    return np.stack([np.stack([values[row[j, s]] for s in all_seeds]) for j in keep])


def column_ceiling(grid: np.ndarray, seeds_used: int) -> dict:
    """The ceiling block of one LDS column from its (S, m, Q) per-seed truth: ICC, the LDS ceiling of a truth
    averaging `seeds_used` seeds, and the leave-one-seed-out Spearman (needs >= 3 subsets)."""
    share = signal_share(grid)
    out = {
        "subsets": int(grid.shape[0]),
        "seeds": int(grid.shape[1]),
        "seeds_used": int(seeds_used),
        "icc": share.pooled,
        "icc_median": share.median,
        "ceiling": float(ceiling(share.pooled, seeds_used)),
    }
    if grid.shape[0] >= 3:
        out["leave_one_seed_out"] = float(np.nanmean(leave_one_seed_out(grid)))
    return out
