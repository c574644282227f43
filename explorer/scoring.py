"""The one scoring path: raw projected features phi -> search vectors whose inner products are the scores.

Index build, explorer queries and the benchmarks all go through `BucketScorer`, so what is measured is what
the explorer serves. For one timestep bucket with training features Phi (N, k):

1. centering (optional, on by default): subtract the mean training feature c = mean_i phi_i from every
   training and query feature. With one shared noise draw per timestep (D-TRAK), x_t is nearly the same input
   for every image once abar_t is small, so every gradient shares one dominant direction; on the shipped model
   the mean pairwise cosine of raw features is 0.99 at t = 100 and 1.000 at t >= 500 (DESIGN, "Measured
   pitfall"). Whitening with a relative lambda keeps that common part, and after normalization every score
   ties near 1. Centering removes it: the kernel becomes the feature covariance;
2. whitening (TRAK eq. 3): with L = chol(Phi_c^T Phi_c + lambda I), psi = L^-1 phi_c, so that
   <psi_q, psi_i> = phi_q^T (Phi_c^T Phi_c + lambda I)^-1 phi_i, the TRAK score;
3. normalization (Diffusion-ReTrac section 4): psi / |psi| on both sides, the cosine of whitened features,
   which removes the timestep-induced norm bias.

A training row may then be scaled by its DAS residual weight (explorer.index writes it that way).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from explorer.whitening import (
    LambdaChoice,
    cholesky_factor,
    choose_lambda_gcv,
    given_lambda,
    normalize_rows,
    whiten,
)


@dataclass(frozen=True)
class BucketScorer:
    """How one bucket turns raw features (P, k) into search vectors (P, k)."""

    factor: np.ndarray | None  # (k, k) lower-triangular L; None: no kernel (TracIn, EK-FAC: identity)
    center: np.ndarray | None  # (k,) the mean training feature, or None when not centered
    normalize: bool

    def whitened(self, features: np.ndarray) -> np.ndarray:
        """phi (P, k) -> L^-1 (phi - c) (P, k), steps 1-2: before normalization (its norm is the leverage's
        square root: |psi_i|^2 = phi_i^T (Phi^T Phi + lambda I)^-1 phi_i, TRAK's self-influence)."""
        phi = np.asarray(features, dtype=np.float64)
        if self.center is not None:
            phi = phi - self.center
        return whiten(phi, self.factor) if self.factor is not None else phi.astype(np.float32)

    def vectors(self, features: np.ndarray) -> np.ndarray:
        """phi (P, k) -> psi (P, k) float32; the same map for training rows and queries."""
        psi = self.whitened(features)
        return normalize_rows(psi) if self.normalize else psi


def fit_bucket(
    features: np.ndarray, relative_lambda: float | None, center: bool, normalize: bool, seed: int = 0
) -> tuple[BucketScorer, LambdaChoice]:
    """The scorer of one bucket from its training features (N, k); relative_lambda None chooses lambda by
    GCV."""
    phi = np.asarray(features, dtype=np.float64)
    mean = phi.mean(axis=0) if center else None
    centered = phi - mean if center else phi
    choice = (
        choose_lambda_gcv(centered, seed=seed)
        if relative_lambda is None
        else given_lambda(centered, relative_lambda)
    )
    return BucketScorer(cholesky_factor(centered, choice.value), mean, normalize), choice


def das_weighted(train_vectors: np.ndarray, residuals: np.ndarray) -> np.ndarray:
    """Training rows (N, k) scaled by their DAS residual weights r_i / mean(r) (DAS's Newton step: removing
    example i moves the output by J_q H^-1 J_i^T r_i; the RMS of r_i per bucket stands in for r_i)."""
    weights = np.asarray(residuals, dtype=np.float64)
    return (np.asarray(train_vectors) * (weights / weights.mean())[:, None]).astype(np.float32)


def all_scores(train_vectors: np.ndarray, query_vectors: np.ndarray) -> np.ndarray:
    """(N, k) stored rows and (P, k) search vectors -> (P, N) scores."""
    return np.asarray(query_vectors, dtype=np.float32) @ np.asarray(train_vectors, dtype=np.float32).T


BLOCK_BYTES = 256 << 20  # one block of scores held at a time: 256 MB


def score_blocks(train_vectors: np.ndarray, query_vectors: np.ndarray, max_bytes: int = BLOCK_BYTES):
    """all_scores in blocks: yields (query rows, training rows, (q, n) float32 scores), q n 4 <= max_bytes.

    train_vectors may be a memmap: one block of rows is read at a time. 50k queries against 1M rows is 200
    GB of scores as one matrix (traker's single matmul); in blocks it is max_bytes plus the two inputs."""
    n, p = len(train_vectors), len(query_vectors)
    rows_per_block = max(1, min(n, max_bytes // (4 * max(1, min(p, 1024)))))
    queries_per_block = max(1, min(p, max_bytes // (4 * rows_per_block)))
    for r0 in range(0, n, rows_per_block):
        rows = slice(r0, min(n, r0 + rows_per_block))
        block = np.asarray(train_vectors[rows], dtype=np.float32)
        for q0 in range(0, p, queries_per_block):
            queries = slice(q0, min(p, q0 + queries_per_block))
            yield queries, rows, np.asarray(query_vectors[queries], dtype=np.float32) @ block.T


def blocked_predictions(
    masks: np.ndarray, train_vectors: np.ndarray, query_vectors: np.ndarray, max_bytes: int = BLOCK_BYTES
) -> np.ndarray:
    """The LDS prediction g (M, Q) = -masks (M, N) @ tau^T without holding tau (Q, N): block by block."""
    out = np.zeros((len(masks), len(query_vectors)))
    for queries, rows, scores in score_blocks(train_vectors, query_vectors, max_bytes):
        out[:, queries] -= masks[:, rows].astype(np.float32) @ scores.T
    return out


def keyed_scores(
    train: dict[int, np.ndarray],
    query: np.ndarray,
    query_bucket: np.ndarray,
    normalize: bool,
    weights: dict[int, np.ndarray] | None = None,
) -> np.ndarray:
    """tau (Q, N): each query row against the training rows of its own key (bucket), optionally as cosines
    (Diffusion-ReTrac) and/or with DAS row weights."""
    n = next(iter(train.values())).shape[0]
    scores = np.zeros((len(query), n), np.float32)
    for b, rows_train in train.items():
        rows = np.flatnonzero(query_bucket == b)
        if not len(rows):
            continue
        left, right = query[rows], rows_train
        if normalize:
            left, right = normalize_rows(left), normalize_rows(right)
        if weights is not None:
            right = das_weighted(right, weights[b])
        scores[rows] = left @ right.T
    return scores


def tracin(per_checkpoint_scores, learning_rate: float) -> np.ndarray:
    """Diffusion-TracIn: sum over checkpoints c of lr <g_q^c, g_i^c> (Diffusion-ReTrac: of unit-norm g), from
    each checkpoint's (Q, N) inner products."""
    return learning_rate * np.sum(list(per_checkpoint_scores), axis=0)
