"""Whitening that turns the TRAK score into an inner product, and the choice of lambda.

TRAK score (DESIGN section 1): tau(q, i) = phi_q^T (Phi^T Phi + lambda I)^-1 phi_i.
With L = chol(Phi^T Phi + lambda I), storing psi_i = L^-1 phi_i and querying with L^-1 phi_q
makes the inner product the exact score, so every method is one FAISS inner-product search.

lambda defaults to a fixed value relative to the mean eigenvalue of Phi^T Phi (of the centered features
by default, explorer.scoring), DEFAULT_RELATIVE_LAMBDA, chosen on the dev half of the shipped model's held-out
digits (bench/step_candidates.py: the best mean top-10 label agreement over the ten buckets) and used
unchanged
on every other dataset. The alternative that needs no benchmark at all is
generalized cross-validation (GCV) on a held-out split of the training features. The score vector tau(q,
.) = Phi (Phi^T Phi + lambda I)^-1 phi_q
is the ridge-regression solution of phi_q (k "observations") on the training gradients Phi^T
(N "predictors"), so GCV for that ridge regression is a natural, label-free criterion:

    GCV(lambda) = (|y - H y|^2 / k) / (1 - tr(H) / k)^2,   H = K (K + lambda I)^-1,  K = Phi^T Phi

with responses y the features of the held-out training examples and K from the rest.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import scipy.linalg

from explorer.errors import ExplorerError

logger = logging.getLogger(__name__)

DEFAULT_RELATIVE_LAMBDA = (
    3e-2  # centered features, k = 512: the dev choice of bench/results/step_candidates.json
)
GCV_GRID = np.logspace(
    -4, 2, 25
)  # lambda relative to the mean eigenvalue of Phi^T Phi; 1e-4 is the stability floor
GCV_HELDOUT_FRACTION = 0.1


@dataclass
class LambdaChoice:
    value: float  # absolute lambda added to Phi^T Phi
    relative: float  # lambda / (trace(Phi^T Phi) / k)
    method: str  # "gcv" or "given"
    curve: list[tuple[float, float]] = field(default_factory=list)  # (relative lambda, GCV)


def gram(features: np.ndarray) -> np.ndarray:
    """Phi (N, k) -> Phi^T Phi (k, k) in float64."""
    phi = np.asarray(features, dtype=np.float64)
    return phi.T @ phi


def gcv_holdout(count: int, seed: int = 0) -> np.ndarray:
    """Row positions of the GCV responses: a seeded 10% of the N training rows (the rest fits K)."""
    if count < 4:
        raise ExplorerError(
            f"{count} training examples are too few to choose lambda by GCV: give a relative lambda",
            ("relative_lambda",),
        )
    n_heldout = max(1, int(round(count * GCV_HELDOUT_FRACTION)))
    return np.random.default_rng(seed).permutation(count)[:n_heldout]


def choose_lambda_gcv(features: np.ndarray, seed: int = 0, grid: np.ndarray = GCV_GRID) -> LambdaChoice:
    """Pick lambda by GCV with held-out training features as responses (no evaluation data)."""
    phi = np.asarray(features, dtype=np.float64)
    heldout = gcv_holdout(len(phi), seed)
    fit = np.delete(phi, heldout, axis=0)
    return gcv_choice(fit.T @ fit, phi[heldout], grid)


def gcv_choice(fit_kernel: np.ndarray, responses: np.ndarray, grid: np.ndarray = GCV_GRID) -> LambdaChoice:
    """GCV from the kernel K (k, k) of the fitting rows and the held-out rows (R, k) as responses; a
    featurize sharded over processes sums K over its shards (precompute.featurize.sharded_fit)."""
    k = fit_kernel.shape[0]
    eigenvalues, eigenvectors = np.linalg.eigh(fit_kernel)
    eigenvalues = np.clip(eigenvalues, 0.0, None)
    scale = eigenvalues.mean()
    if not np.isfinite(scale) or scale <= 0:
        raise ExplorerError(
            "the training features are all zero or not finite: check the model and the output function"
        )
    coordinates = np.asarray(responses, dtype=np.float64) @ eigenvectors  # responses in the eigenbasis
    power = (coordinates**2).mean(axis=0)  # (k,)
    curve = []
    for relative in grid:
        lam = relative * scale
        shrink = lam / (eigenvalues + lam)  # residual factor per eigen-direction
        dof = k - shrink.sum()  # tr(H)
        gcv = float((shrink**2 * power).sum() / k / (1 - dof / k) ** 2)
        curve.append((float(relative), gcv))
    best_relative = min(curve, key=lambda point: point[1])[0]
    if best_relative == grid[0]:
        # With N >> k the held-out features are fit almost exactly and GCV keeps falling as
        # lambda shrinks; the grid's floor then acts as a numerical-stability floor.
        logger.info("GCV chose the smallest lambda of the grid (%.0e x mean eigenvalue)", best_relative)
    return LambdaChoice(value=float(best_relative * scale), relative=best_relative, method="gcv", curve=curve)


def given_lambda(features: np.ndarray, relative: float) -> LambdaChoice:
    """lambda given by the user, relative to the mean eigenvalue of Phi^T Phi."""
    return given_lambda_of_kernel(gram(features), relative)


def given_lambda_of_kernel(kernel: np.ndarray, relative: float) -> LambdaChoice:
    if not relative > 0:
        raise ExplorerError(
            f"relative lambda {relative} must be > 0 (it is relative to the mean eigenvalue of Phi^T Phi)",
            ("relative_lambda",),
        )
    scale = float(np.trace(kernel) / kernel.shape[0])
    return LambdaChoice(value=relative * scale, relative=float(relative), method="given")


def cholesky_factor(features: np.ndarray, lam: float) -> np.ndarray:
    """L (k, k) lower-triangular with L L^T = Phi^T Phi + lambda I, float64."""
    return cholesky_of_kernel(gram(features), lam)


def cholesky_of_kernel(kernel: np.ndarray, lam: float) -> np.ndarray:
    kernel = np.array(kernel, dtype=np.float64)
    kernel[np.diag_indices_from(kernel)] += lam
    try:
        return np.linalg.cholesky(kernel)
    except np.linalg.LinAlgError as error:
        raise ExplorerError(
            f"Phi^T Phi + lambda I is not positive definite at lambda={lam:g}: use a larger relative lambda",
            ("relative_lambda",),
        ) from error


def whiten(features: np.ndarray, factor: np.ndarray) -> np.ndarray:
    """phi (N, k) -> psi = L^-1 phi (N, k) float32, so <psi_q, psi_i> = tau(q, i)."""
    solved = scipy.linalg.solve_triangular(factor, np.asarray(features, dtype=np.float64).T, lower=True)
    return np.ascontiguousarray(solved.T, dtype=np.float32)


def normalize_rows(vectors: np.ndarray) -> np.ndarray:
    """L2-normalize rows (Diffusion-ReTrac); zero rows stay zero."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.where(norms > 0, norms, 1.0)).astype(np.float32)
