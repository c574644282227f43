"""Gradient-based attribution methods scored from cached projected features of the full model.

Every method gives a score matrix tau (Q, N): tau(q, i) > 0 means "including training image i
lowers query q's loss" (the LDS prediction is g_j(q) = -sum_{i in S_j} tau(q, i)).

- TRAK / D-TRAK (DESIGN section 1): tau = phi_q^T (Phi^T Phi + lambda I)^-1 phi_i with the output
  function `loss` (TRAK) or `square`, `mean`, `l1`, `l2` (D-TRAK); lambda by GCV on the training
  features (no evaluation data); computed as <L^-1 phi_q, L^-1 phi_i>.
- Diffusion-ReTrac normalization: the same with both whitened vectors L2-normalized (cosine).
- DAS residual weights: the training rows scaled by r_i / mean(r), the scalar shortcut of DAS's released
  code (featurize --das-weights); the paper's DAS is the index method `das` (explorer.index_methods).
- Diffusion-TracIn: sum over training checkpoints c of lr <g_q^c, g_i^c> (gradients of the loss,
  no whitening); its ReTrac variant normalizes every g^c first.

Features: a whole-image query (heldout, generated) uses the gradient averaged over all timestep
buckets (D-TRAK's average over timesteps; the mean of the bucket features); a journey query uses
the features of its timestep's bucket, like the explorer does.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from explorer.atomic import write_atomic, write_json_atomic
from explorer.errors import ExplorerError
from explorer.features import FeatureSpec, bucket_of_timestep
from explorer.model import DiffusionModel
from explorer.scoring import BucketScorer, tracin
from explorer.scoring import keyed_scores as inner_product_scores
from explorer.whitening import (
    LambdaChoice,
    cholesky_factor,
    choose_lambda_gcv,
    given_lambda,
)
from precompute.evaluation.digits.ground_truth import QuerySet
from precompute.featurize.workers import Featurizer, default_workers

logger = logging.getLogger(__name__)

GLOBAL = -1  # the "bucket" key of the all-timestep (whole-image) features


@dataclass
class FeatureSet:
    """Projected gradients of the full model for the training set and the queries, one FeatureSpec.

    train[b] is (N, k): b = GLOBAL is the mean over buckets, b >= 0 a bucket that some journey
    query falls in. query (Q, k): whole-image rows hold the global feature, journey rows their bucket's.
    """

    spec: FeatureSpec
    train: dict[int, np.ndarray]
    query: np.ndarray
    query_bucket: np.ndarray  # (Q,) GLOBAL or the bucket index
    residuals: dict[int, np.ndarray] | None  # DAS residual norms (N,) per key of `train`


def query_buckets(spec: FeatureSpec, queries: QuerySet, num_train_timesteps: int) -> np.ndarray:
    return np.array(
        [
            GLOBAL if t < 0 else bucket_of_timestep(int(t), spec.buckets, num_train_timesteps)
            for t in queries.timesteps.tolist()
        ]
    )


def compute_features(
    model: DiffusionModel,
    spec: FeatureSpec,
    train_images: np.ndarray,
    queries: QuerySet,
    residuals: bool = False,
    chunk: int = 64,
) -> FeatureSet:
    """train_images (N, C, H, W) in [-1, 1] -> a FeatureSet (gradients only for the buckets needed)."""
    computer = Featurizer(model, spec, chunk_size=chunk, workers=default_workers())
    buckets = query_buckets(spec, queries, model.num_train_timesteps)
    needed = sorted(set(buckets[buckets >= 0].tolist()))
    n, k = len(train_images), spec.proj_dim
    train = {GLOBAL: np.zeros((n, k), np.float32), **{b: np.zeros((n, k), np.float32) for b in needed}}
    images = torch.from_numpy(train_images)
    for start in tqdm(range(0, n, chunk), desc=f"features {spec.output}", unit="chunk", leave=False):
        phi = computer.all_bucket_features(images[start : start + chunk]).numpy()  # (c, B, k)
        train[GLOBAL][start : start + chunk] = phi.mean(1)
        for b in needed:
            train[b][start : start + chunk] = phi[:, b]
    query = np.zeros((len(queries), k), np.float32)
    whole = np.flatnonzero(buckets == GLOBAL)
    query_images = torch.from_numpy(queries.images)
    if len(whole):
        query[whole] = computer.all_bucket_features(query_images[whole]).numpy().mean(1)
    journey = np.flatnonzero(buckets >= 0)
    if len(journey):
        query[journey] = computer.features(query_images[journey], torch.from_numpy(buckets[journey])).numpy()
    res = None
    if residuals:
        norms = computer.residual_norms(images).numpy()  # (N, B) RMS residual per bucket
        res = {GLOBAL: np.sqrt((norms**2).mean(1)), **{b: norms[:, b] for b in needed}}
    return FeatureSet(spec=spec, train=train, query=query, query_bucket=buckets, residuals=res)


def save_feature_set(features: FeatureSet, path: Path) -> None:
    arrays = {"query": features.query, "query_bucket": features.query_bucket}
    for b, phi in features.train.items():
        arrays[f"train_{b}"] = phi
        if features.residuals is not None:
            arrays[f"residual_{b}"] = features.residuals[b]

    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)

    write_atomic(path, write)


def load_feature_set(path: Path, spec: FeatureSpec) -> FeatureSet:
    with np.load(path) as data:
        keys = sorted(int(name[len("train_") :]) for name in data.files if name.startswith("train_"))
        train = {b: data[f"train_{b}"] for b in keys}
        residuals = {b: data[f"residual_{b}"] for b in keys} if f"residual_{GLOBAL}" in data.files else None
        return FeatureSet(
            spec=spec,
            train=train,
            query=data["query"],
            query_bucket=data["query_bucket"],
            residuals=residuals,
        )


def cached_features(
    path: Path,
    model: DiffusionModel,
    spec: FeatureSpec,
    train_images: np.ndarray,
    queries: QuerySet,
    residuals: bool = False,
) -> FeatureSet:
    """Load the feature set from `path`, or compute and save it there."""
    if path.is_file():
        features = load_feature_set(path, spec)
        if features.query.shape != (len(queries), spec.proj_dim) or features.train[GLOBAL].shape[0] != len(
            train_images
        ):
            raise ExplorerError(
                f"cached features {str(path)!r} do not fit this benchmark: delete it (or the --cache folder)"
            )
        if residuals and features.residuals is None:
            raise ExplorerError(
                f"cached features {str(path)!r} have no DAS residuals: delete it to recompute"
            )
        return features
    features = compute_features(model, spec, train_images, queries, residuals)
    save_feature_set(features, path)
    return features


@dataclass
class Whitened:
    """psi = L^-1 phi for the training rows and the queries, per feature key."""

    train: dict[int, np.ndarray]  # (N, k) per key
    query: np.ndarray  # (Q, k)
    relative_lambda: dict[int, float]  # GCV's choice per key


def whiten_features(
    features: FeatureSet, relative_lambda: float | None = None, gcv_cache: Path | None = None
) -> Whitened:
    """Per key: lambda by GCV on the training features alone (or the given relative lambda), Cholesky
    whitening of both sides. GCV's choices are kept in `gcv_cache` (JSON), so a rerun skips the eigh."""
    train, query, lambdas = {}, np.zeros_like(features.query), {}
    chosen = json.loads(gcv_cache.read_text()) if gcv_cache is not None and gcv_cache.is_file() else {}
    for b, phi in features.train.items():
        if relative_lambda is not None:
            choice = given_lambda(phi, relative_lambda)
        elif str(b) in chosen:
            choice = LambdaChoice(
                value=chosen[str(b)]["value"], relative=chosen[str(b)]["relative"], method="gcv"
            )
        else:
            choice = choose_lambda_gcv(phi, seed=features.spec.proj_seed)
            chosen[str(b)] = {"value": choice.value, "relative": choice.relative}
        scorer = BucketScorer(
            cholesky_factor(phi, choice.value), center=None, normalize=False
        )  # the digits study
        train[b] = scorer.vectors(phi)  # is uncentered; inner_product_scores normalizes where asked
        rows = np.flatnonzero(features.query_bucket == b)
        if len(rows):
            query[rows] = scorer.vectors(features.query[rows])
        lambdas[b] = choice.relative
        logger.info(
            "%s bucket %d: %s relative lambda %.3g", features.spec.output, b, choice.method, choice.relative
        )
    if gcv_cache is not None and relative_lambda is None:
        write_json_atomic(gcv_cache, chosen)
    return Whitened(train=train, query=query, relative_lambda=lambdas)


def trak_scores(
    whitened: Whitened,
    query_bucket: np.ndarray,
    normalize: bool,
    das_residuals: dict[int, np.ndarray] | None = None,
) -> np.ndarray:
    """TRAK / D-TRAK (and ReTrac-normalized, and DAS-weighted) scores (Q, N)."""
    return inner_product_scores(whitened.train, whitened.query, query_bucket, normalize, das_residuals)


def tracin_scores(checkpoints: list[FeatureSet], learning_rate: float, normalize: bool) -> np.ndarray:
    """Diffusion-TracIn: sum_c lr <g_q^c, g_i^c>; Diffusion-ReTrac: the same with unit-norm g (Q, N)."""
    if not checkpoints:
        raise ExplorerError("TracIn needs at least one checkpoint")
    return tracin(
        (inner_product_scores(f.train, f.query, f.query_bucket, normalize) for f in checkpoints),
        learning_rate,
    )


def fold_features(features: FeatureSet, dim: int) -> FeatureSet:
    """Count-sketch features at k -> the same sketch at k' = `dim` (k' divides k), without new gradients.

    The projector draws h(j) with torch.randint(0, k) from a generator seeded by proj_seed, so the
    hash at k' is the hash at k modulo k' and the signs are the same draws: column c of the k'
    sketch is the sum of columns c, c + k', c + 2k', ... of the k sketch (checked against features
    computed at k' in tests/test_lds.py). Bucket means commute with the sum. DAS residuals are kept.
    """
    k = features.spec.proj_dim
    if features.spec.projector != "countsketch" or features.spec.exact_params or dim < 1 or k % dim:
        raise ExplorerError(
            f"cannot fold {features.spec.projector} features of k={k} to k={dim}: folding needs the "
            "count-sketch projector without calibrated exact_params and a k' that divides k"
        )
    fold = lambda phi: phi.reshape(len(phi), k // dim, dim).sum(1)  # noqa: E731  (n, k) -> (n, k')
    return FeatureSet(
        spec=variant(features.spec, proj_dim=dim),
        train={b: fold(phi) for b, phi in features.train.items()},
        query=fold(features.query),
        query_bucket=features.query_bucket,
        residuals=features.residuals,
    )


def spec_key(spec: FeatureSpec) -> str:
    return f"{spec.output}_B{spec.buckets}_m{spec.timesteps_per_bucket}_R{spec.noise_draws}_k{spec.proj_dim}"


def variant(spec: FeatureSpec, **changes) -> FeatureSpec:
    return replace(spec, **changes)
