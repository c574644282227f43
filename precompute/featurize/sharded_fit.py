"""Fit each bucket's scorer (explorer.scoring.BucketScorer) from chunked features, summed over processes.

The scorer needs three sums over the N training rows of a bucket, each a sum of per-chunk terms, so every
rank sums its own chunks and an all-reduce adds the ranks (precompute.featurize.collective):
1. the mean feature c = (sum_i phi_i) / N (two passes: the kernel is summed from centered rows, as a single
   process computes it, instead of sum phi phi^T - N c c^T, which cancels badly when one direction dominates);
2. the kernel K = sum_i (phi_i - c)(phi_i - c)^T, (k, k) float64;
3. for lambda by GCV, the held-out response rows (a seeded 10%, explorer.whitening.gcv_holdout), each rank
   filling the rows it holds into a zero matrix: the fitting kernel is K - R^T R.
Every rank gets the same sums, so every rank would derive the same factor; rank 0 writes the index.
"""

from __future__ import annotations

import numpy as np

from explorer.errors import ExplorerError
from explorer.scoring import BucketScorer
from explorer.whitening import (
    LambdaChoice,
    cholesky_of_kernel,
    gcv_choice,
    gcv_holdout,
    given_lambda_of_kernel,
    normalize_rows,
)
from precompute.featurize.chunks import ArrayChunks, ChunkFiles
from precompute.featurize.collective import Collective


def bucket_mean(chunks: ChunkFiles | ArrayChunks, bucket: int, collective: Collective) -> np.ndarray:
    """The mean raw feature (k,) of a bucket over every rank's chunks (sum 1 of the module docstring);
    refuses non-finite features."""
    total, bad = np.zeros(chunks.dim), 0.0
    for chunk in collective.mine(range(chunks.n_chunks)):
        phi = np.asarray(chunks.features(chunk, bucket), dtype=np.float64)
        bad += float((~np.isfinite(phi)).sum())
        total += phi.sum(axis=0)
    summed = collective.sum(np.append(total, bad))
    if summed[-1] > 0:
        raise ExplorerError(f"bucket {bucket} has NaN/inf features: the model produces non-finite gradients")
    return summed[:-1] / chunks.count


def fit_bucket_chunks(
    chunks: ChunkFiles | ArrayChunks,
    bucket: int,
    collective: Collective,
    relative_lambda: float | None,
    center: bool,
    normalize: bool,
    seed: int = 0,
) -> tuple[BucketScorer, LambdaChoice]:
    """The scorer of one bucket, equal on every rank (relative_lambda None: lambda by GCV)."""
    mine = collective.mine(range(chunks.n_chunks))
    k, n = chunks.dim, chunks.count
    mean = bucket_mean(chunks, bucket, collective)  # also the check for non-finite features
    mean = mean if center else None
    kernel = np.zeros((k, k))
    heldout = gcv_holdout(n, seed) if relative_lambda is None else np.array([], dtype=np.int64)
    where = np.full(n, -1)
    where[heldout] = np.arange(len(heldout))
    responses = np.zeros((len(heldout), k))
    for chunk in mine:
        phi = np.asarray(chunks.features(chunk, bucket), dtype=np.float64)
        if mean is not None:
            phi = phi - mean
        kernel += phi.T @ phi
        slots = where[chunks.rows(chunk)]
        held = slots >= 0
        responses[slots[held]] = phi[held]
    kernel = collective.sum(kernel)
    if relative_lambda is None:
        responses = collective.sum(responses)
        choice = gcv_choice(kernel - responses.T @ responses, responses)
    else:
        choice = given_lambda_of_kernel(kernel, relative_lambda)
    return BucketScorer(cholesky_of_kernel(kernel, choice.value), mean, normalize), choice


def bucket_vectors(
    chunks: ChunkFiles | ArrayChunks,
    bucket: int,
    scorer: BucketScorer,
    das: bool,
    out: np.ndarray,
    norms: np.ndarray | None = None,
) -> np.ndarray:
    """The stored rows of one bucket written into `out` (N, k) float32 (a memmap: one chunk in memory at a
    time), DAS-weighted when asked (explorer.scoring.das_weighted: r_i / mean r over all N rows); norms
    (N, 3), when given, gets each row's |phi_i|, |phi_i - c| and whitened |psi_i| before normalization."""
    weight_scale = None
    if das:
        every = [np.asarray(chunks.residuals(c, bucket), dtype=np.float64) for c in range(chunks.n_chunks)]
        weight_scale = float(np.concatenate(every).mean())
    for chunk in range(chunks.n_chunks):
        rows = chunks.rows(chunk)
        phi = chunks.features(chunk, bucket)
        whitened = scorer.whitened(phi)
        if norms is not None:
            centered = phi if scorer.center is None else phi - scorer.center
            norms[rows] = np.stack([np.linalg.norm(a, axis=1) for a in (phi, centered, whitened)], axis=1)
        psi = normalize_rows(whitened) if scorer.normalize else whitened
        if weight_scale is not None:
            weights = np.asarray(chunks.residuals(chunk, bucket), dtype=np.float64) / weight_scale
            psi = (psi * weights[:, None]).astype(np.float32)
        out[rows] = psi
    return out
