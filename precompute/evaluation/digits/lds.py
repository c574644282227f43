"""The LDS benchmark on the digits: subset models, ground truth, every method side by side.

    python -m precompute evaluate lds --benchmark digits [--subsets 64] [--smoke] [--cache DIR]

1. the full model: the recipe on the whole training split (raw weights kept at each checkpoint for TracIn);
2. queries (held-out, generated, journey) and their fixed (t, eps) pairs;
3. M subset models (alpha = 0.5, seeded masks), each cached; f_j(q) for every query;
4. projected gradients of the full model for every output function, cached (so any variant of
   whitening / normalization / DAS is re-scored without retraining or recomputing gradients);
5. scores of every method, LDS per query, bootstrap intervals over subsets, distinctness;
6. ablations of the feature spec (buckets, noise draws, k) for the best output function.
Everything expensive is cached in --cache; a killed run resumes where it stopped.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from explorer.atomic import save_npy_atomic
from explorer.classifier import load_classifier
from explorer.data import load_builtin, to_model_range, train_heldout_split
from explorer.model import load_model
from precompute.evaluation.baselines import embedding_cosine, pixel_cosine, random_scores
from precompute.evaluation.digits.config import OUTPUT_NAMES, LDSConfig, LDSRun, check_cache_config
from precompute.evaluation.digits.defaults import shipped_defaults
from precompute.evaluation.digits.ground_truth import QuerySet, build_queries, query_losses, truth_pairs
from precompute.evaluation.digits.scores import (
    cached_features,
    spec_key,
    tracin_scores,
    trak_scores,
    variant,
    whiten_features,
)
from precompute.evaluation.digits.studies import ablate, lambda_sweep
from precompute.evaluation.metrics import (
    LDSBootstrap,
    distinctness,
    fair_split,
    predictions,
    spearman_columns,
)
from precompute.evaluation.retrain import (
    load_raw_weights,
    subset_masks,
    train_cached,
    train_full_with_checkpoints,
)
from precompute.train import TrainConfig, train_classifier

logger = logging.getLogger(__name__)


def _queries(cache: Path, full_dir: Path, heldout, config: LDSConfig) -> QuerySet:
    path = cache / "queries.npz"
    if path.is_file():
        with np.load(path) as data:
            return QuerySet(
                images=data["query_images"],
                kinds=data["query_kinds"],
                timesteps=data["query_timesteps"],
                sources=data["query_sources"],
                steps=data["query_steps"],
            )
    queries = build_queries(
        load_model(full_dir),
        heldout,
        config.generated,
        config.trajectories,
        list(config.journey_steps),
        config.sampler_steps,
    )
    with open(path.with_suffix(".tmp"), "wb") as handle:
        np.savez(handle, **queries.to_arrays())
    path.with_suffix(".tmp").replace(path)
    return queries


def groups_of(queries: QuerySet) -> dict[str, np.ndarray]:
    groups = {"all": np.arange(len(queries))}
    for kind in ("heldout", "generated", "journey"):
        groups[kind] = queries.select(kind)
    for step in sorted(set(queries.steps[queries.steps >= 0].tolist())):
        groups[f"journey@step{step}"] = np.flatnonzero(queries.steps == step)
    return groups


def method_scores(
    config: LDSConfig,
    cache: Path,
    full_dir: Path,
    tracin_files: list[Path],
    train_images: np.ndarray,
    queries: QuerySet,
    timings: dict,
) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
    """tau (Q, N) of every method, and what each one is (label, output, lambda)."""
    model = load_model(full_dir)
    scores, info = {}, {}
    features_dir = cache / "features"
    features_dir.mkdir(exist_ok=True)
    for output in config.outputs:
        started = time.perf_counter()
        spec = variant(config.spec, output=output)
        das = output in config.das_outputs
        path = features_dir / f"full_{spec_key(spec)}.npz"
        features = cached_features(path, model, spec, train_images, queries, das)
        whitened = whiten_features(features, gcv_cache=path.with_suffix(".gcv.json"))
        lambdas = {str(b): v for b, v in whitened.relative_lambda.items()}
        family = "trak" if output == "loss" else "dtrak"
        for normalize in (False, True):
            suffix = "-norm" if normalize else ""
            label = OUTPUT_NAMES[output] + (", ReTrac-normalized" if normalize else "")
            scores[f"{family}-{output}{suffix}"] = trak_scores(whitened, features.query_bucket, normalize)
            info[f"{family}-{output}{suffix}"] = {
                "label": label,
                "output": output,
                "normalize": normalize,
                "lambda": lambdas,
            }
            if das:
                scores[f"das-{output}{suffix}"] = trak_scores(
                    whitened, features.query_bucket, normalize, features.residuals
                )
                info[f"das-{output}{suffix}"] = {
                    "label": f"DAS weights on {label}",
                    "output": output,
                    "normalize": normalize,
                    "lambda": lambdas,
                }
        timings[f"features+scores {output}"] = round(time.perf_counter() - started, 1)

    started = time.perf_counter()
    spec = variant(config.spec, output="loss")
    checkpoints = [
        cached_features(
            features_dir / f"tracin_{path.stem}_{spec_key(spec)}.npz",
            load_raw_weights(path, config.recipe),
            spec,
            train_images,
            queries,
        )
        for path in tracin_files
    ]
    for normalize, name in ((False, "tracin"), (True, "retrac")):
        scores[name] = tracin_scores(checkpoints, config.recipe.learning_rate, normalize)
        info[name] = {
            "label": "Diffusion-ReTrac (normalized TracIn)" if normalize else "Diffusion-TracIn",
            "output": "loss",
            "normalize": normalize,
            "checkpoints": [p.stem for p in tracin_files],
        }
    timings["features+scores tracin"] = round(time.perf_counter() - started, 1)

    classifier = load_classifier(full_dir / "classifier")
    scores["pixel"] = pixel_cosine(queries.images, train_images)
    scores["embedding"] = embedding_cosine(classifier, queries.images, train_images)
    scores["random"] = random_scores(len(queries), len(train_images), seed=0)
    info["pixel"] = {"label": "pixel cosine"}
    info["embedding"] = {"label": "classifier-embedding cosine"}
    info["random"] = {"label": "random"}
    return scores, info


def sign_check(masks: np.ndarray, truth: np.ndarray, scores: np.ndarray, top: int = 50) -> dict:
    """Spearman over subsets of f_j(q) with |S_j and top-`top` positive| (expected < 0) and negative (> 0)."""
    positive = np.argsort(-scores, axis=1)[:, :top]  # (Q, top)
    negative = np.argsort(scores, axis=1)[:, :top]
    count = lambda rows: masks[:, rows].sum(-1)  # noqa: E731  (M, Q)
    return {
        f"top{top}_positive": float(np.nanmean(spearman_columns(truth, count(positive)))),
        f"top{top}_negative": float(np.nanmean(spearman_columns(truth, count(negative)))),
    }


def prepare_full_model(cache: Path, train, heldout, config: LDSConfig) -> tuple[Path, list[Path]]:
    """The recipe on the whole training set (+ raw weights at its checkpoints) and the feature classifier."""
    full_dir = Path(cache) / "full"
    tracin_files = train_full_with_checkpoints(train, full_dir, config.recipe)
    if not (full_dir / "classifier" / "classifier.json").is_file():
        train_classifier(
            train,
            heldout,
            full_dir / "classifier",
            TrainConfig(batch_size=64, seed=config.recipe.seed, classifier_epochs=config.classifier_epochs),
        )
    return full_dir, tracin_files


def run_lds(config: LDSConfig, cache: str | Path) -> LDSRun:
    """Run (or resume) the benchmark; every expensive piece is cached under `cache`."""
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    check_cache_config(cache, config)
    timings: dict[str, float] = {}
    train, heldout = _digits(config)
    train_images = to_model_range(train.images)  # (N, 1, H, W)

    # 1. the full model, its TracIn checkpoints and the feature classifier
    with _timed(timings, "full model"):
        full_dir, tracin_files = prepare_full_model(cache, train, heldout, config)

    # 2. queries and their fixed (t, eps) pairs
    queries = _queries(cache, full_dir, heldout, config)
    full_model = load_model(full_dir)
    pairs = truth_pairs(
        queries, config.truth_pairs, config.truth_buckets, full_model.num_train_timesteps, config.truth_seed
    )

    # 3. subset models and f_j(q)
    masks = subset_masks(config.subsets, len(train), config.alpha, config.mask_seed)
    with _timed(timings, "subset models + truth"):
        truth, trained = _subset_truth(config, cache, train, masks, queries, pairs)
    if truth is None:
        return LDSRun({}, {}, {}, np.zeros(0), masks, queries, trained, complete=False)

    # 4-5. every method's scores, LDS, distinctness
    scores, info = method_scores(config, cache, full_dir, tracin_files, train_images, queries, timings)
    with _timed(timings, "lds + bootstrap"):
        predicted = {name: predictions(masks, tau) for name, tau in scores.items()}
        groups = groups_of(queries)
        boot = LDSBootstrap(truth, predicted, groups, config.bootstrap, seed=0)
        methods = {
            name: _method_entry(config, info[name], boot, name, tau, masks, truth, groups)
            for name, tau in scores.items()
        }

    # 6. ablations of the feature spec, for the TRAK/D-TRAK configuration with the best LDS over all queries
    best = max(
        (m for m in methods if m.startswith(("trak-", "dtrak-"))),
        key=lambda m: methods[m]["lds"]["all"]["mean"],
    )
    with _timed(timings, "ablations"):
        benchmark = (masks, truth, groups)
        ablations = ablate(
            config, cache, full_dir, train_images, queries, *benchmark, best, methods[best], scores, predicted
        )
    with _timed(timings, "lambda sweep"):
        sweep = lambda_sweep(config, cache, *benchmark, methods, scores)

    # 7. the shipped default: k x lambda rule x output, lambda chosen by the fair protocol
    with _timed(timings, "shipped defaults"):
        defaults = _shipped_defaults(config, cache, *benchmark)

    results = {
        "benchmark": "digits",
        "config": config.to_dict(),
        "train_size": len(train),
        "subsets": config.subsets,
        "queries": {kind: int(len(rows)) for kind, rows in groups.items()},
        "methods": methods,
        "claims": _claims(boot, scores, groups),
        "ablations": ablations,
        "lambda_sweep": sweep,
        "defaults": defaults,
        "best_method": best,
        "timings_s": timings,
        "truth_full_model": query_losses(full_model, queries, pairs).tolist(),
    }
    return LDSRun(results, scores, predicted, truth, masks, queries, trained, complete=True)


@contextmanager
def _timed(timings: dict[str, float], name: str):
    """Record the wall seconds of the block as timings[name]."""
    started = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - started, 1)


def _claims(boot: LDSBootstrap, scores: dict, groups: dict) -> dict:
    """The paired differences of COMPARED whose two methods were both scored."""
    return {
        name: {g: boot.difference(first, second, g).to_dict() for g in groups}
        for name, (first, second) in COMPARED.items()
        if first in scores and second in scores
    }


# The differences between methods reported with paired intervals: (first, second) -> first minus second.
COMPARED = {
    "square_minus_loss": ("dtrak-square", "trak-loss"),  # D-TRAK's headline claim
    "square_norm_minus_loss_norm": ("dtrak-square-norm", "trak-loss-norm"),
    "mean_minus_loss": ("dtrak-mean", "trak-loss"),
    "mean_minus_square": ("dtrak-mean", "dtrak-square"),
    "mean_norm_minus_mean": ("dtrak-mean-norm", "dtrak-mean"),  # ReTrac normalization on TRAK
    "retrac_minus_tracin": ("retrac", "tracin"),  # ReTrac normalization on TracIn
    "das_mean_minus_mean": ("das-mean", "dtrak-mean"),
    "mean_minus_pixel": ("dtrak-mean", "pixel"),
    "retrac_minus_mean": ("retrac", "dtrak-mean"),
}


def _digits(config: LDSConfig):
    """The digits' training split and held-out queries, cut to the config's sizes."""
    train, heldout = train_heldout_split(load_builtin("digits"))
    if config.train_size is not None:
        train = train.subset(np.arange(config.train_size), f"first{config.train_size}")
    if config.heldout_queries is not None:
        heldout = heldout.subset(np.arange(config.heldout_queries), f"first{config.heldout_queries}")
    return train, heldout


def _subset_truth(
    config: LDSConfig, cache: Path, train, masks, queries, pairs
) -> tuple[np.ndarray | None, int]:
    """f_j(q) of every subset model, (M, Q), training the missing ones, and how many were trained now; None
    when config.stop_after_subsets stopped the run first."""
    trained, truth = 0, []
    for j in tqdm(range(config.subsets), desc="subset models", unit="model"):
        model_dir = cache / "subsets" / f"subset_{j:03d}"
        truth_path = model_dir / "truth.npy"
        if (
            config.stop_after_subsets is not None
            and trained >= config.stop_after_subsets
            and not truth_path.is_file()
        ):
            logger.info("stopping after %d new subset models (stop_after_subsets)", trained)
            return None, trained
        trained += train_cached(
            train.subset(np.flatnonzero(masks[j]), f"subset{j}"), model_dir, config.recipe
        )
        if not truth_path.is_file():
            save_npy_atomic(truth_path, query_losses(load_model(model_dir), queries, pairs))
        truth.append(np.load(truth_path))
    return np.stack(truth), trained


def _method_entry(
    config: LDSConfig, info: dict, boot: LDSBootstrap, name: str, tau, masks, truth, groups
) -> dict:
    """One method's row of the results: its settings, LDS per query group, distinctness, sign check."""
    return dict(
        info,
        lds={g: boot.interval(name, g).to_dict() for g in groups},
        distinctness={
            kind: distinctness(tau[groups[kind]], config.top) for kind in ("heldout", "generated", "journey")
        },
        sign_check=sign_check(masks, truth, tau),
    )


def _shipped_defaults(config: LDSConfig, cache: Path, masks, truth, groups) -> dict:
    """The shipped-default study (precompute.evaluation.digits.defaults), when configured and possible."""
    if config.defaults is None:
        return {}
    if config.subsets < 6:
        logger.info(
            "the shipped-default study needs 3 subset models on each side of its split: use --subsets "
            "6 or more"
        )
        return {}
    return shipped_defaults(
        config.defaults,
        config.spec,
        cache / "features",
        masks,
        truth,
        groups,
        fair_split(config.subsets, groups, config.mask_seed),
        config.bootstrap,
    )
