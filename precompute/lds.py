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

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from explorer.atomic import save_npy_atomic, write_atomic, write_json_atomic
from explorer.classifier import load_classifier
from explorer.data import load_builtin, to_model_range, train_heldout_split
from explorer.errors import ExplorerError
from explorer.features import FeatureSpec
from explorer.model import load_model
from precompute.baselines import embedding_cosine, pixel_cosine, random_scores
from precompute.eval_report import lds_markdown, lds_plot
from precompute.ground_truth import QuerySet, build_queries, query_losses, truth_pairs
from precompute.lds_defaults import DefaultsConfig, shipped_defaults
from precompute.methods import (
    cached_features,
    inner_product_scores,
    load_feature_set,
    spec_key,
    tracin_scores,
    trak_scores,
    variant,
    whiten_features,
)
from precompute.metrics import LDSBootstrap, distinctness, fair_split, predictions, spearman_columns
from precompute.retrain import (
    Recipe,
    load_raw_weights,
    subset_masks,
    train_cached,
    train_full_with_checkpoints,
)
from precompute.train import TrainConfig, train_classifier

logger = logging.getLogger(__name__)

OUTPUT_NAMES = {
    "loss": "TRAK (loss)",
    "square": "D-TRAK (square)",
    "mean": "D-TRAK (mean)",
    "l1": "D-TRAK (l1)",
    "l2": "D-TRAK (l2)",
}


@dataclass
class LDSConfig:
    subsets: int = 64  # M subset models
    alpha: float = 0.5  # subset fraction
    mask_seed: int = 0
    recipe: Recipe = field(default_factory=Recipe)
    train_size: int | None = None  # only the first n training images (smoke runs)
    heldout_queries: int | None = None  # only the first n held-out images (None: all 180)
    generated: int = 32  # generated-image queries (sampler seeds 0..)
    trajectories: int = 16  # trajectories whose x0hat give the journey queries
    journey_steps: tuple[int, ...] = (10, 20, 30, 40)  # sampler step indices of the journey queries
    sampler_steps: int = 50
    truth_pairs: int = 128  # (t, eps) pairs per query for f_j(q)
    truth_buckets: int = 10  # a journey query's truth covers its tenth of [0, T)
    truth_seed: int = 1
    spec: FeatureSpec = field(default_factory=lambda: FeatureSpec(output="loss", buckets=10, proj_dim=2048))
    outputs: tuple[str, ...] = ("loss", "square", "mean", "l1", "l2")
    das_outputs: tuple[str, ...] = ("square", "mean")
    ablations: tuple[tuple[str, int], ...] = (
        ("buckets", 5),
        ("buckets", 20),
        ("noise_draws", 4),
        ("proj_dim", 512),
    )
    sweep_outputs: tuple[str, ...] = (
        "loss",
        "square",
        "mean",
    )  # lambda sweep (a diagnostic: chosen on the benchmark)
    sweep_lambdas: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)  # relative to the mean eigenvalue
    defaults: DefaultsConfig | None = field(
        default_factory=DefaultsConfig
    )  # the shipped-default study (needs >= 6 subsets)
    bootstrap: int = 1000
    top: int = 10  # distinctness top-list length
    classifier_epochs: int = 12
    stop_after_subsets: int | None = (
        None  # train at most this many new subset models, then stop (tests of resuming)
    )

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


def smoke_config(subsets: int = 4) -> LDSConfig:
    """The whole harness in about a minute: tiny data, steps, queries and features."""
    return LDSConfig(
        subsets=subsets,
        recipe=Recipe(steps=30, checkpoint_every=10),
        train_size=160,
        heldout_queries=6,
        generated=2,
        trajectories=1,
        journey_steps=(2, 5, 8),
        sampler_steps=10,
        truth_pairs=16,
        spec=FeatureSpec(output="loss", buckets=4, proj_dim=64),
        das_outputs=("square",),
        ablations=(("buckets", 2),),
        sweep_outputs=("loss",),
        sweep_lambdas=(1.0,),
        bootstrap=50,
        classifier_epochs=1,
        defaults=DefaultsConfig(
            dims=(32, 64),
            shippable=(32,),
            compare=("square",),
            lambdas=(1.0,),
            reference=1.0,
            storages=("int8",),
        ),
    )


@dataclass
class LDSRun:
    results: dict
    scores: dict[str, np.ndarray]  # method -> tau (Q, N)
    predictions: dict[str, np.ndarray]  # method -> g (M, Q)
    truth: np.ndarray  # (M, Q)
    masks: np.ndarray  # (M, N)
    queries: QuerySet
    trained_subsets: int  # subset models trained by this call (0 when all were cached)
    complete: bool


def _check_cache_config(cache: Path, config: LDSConfig) -> None:
    path = cache / "config.json"
    wanted = {
        "recipe": config.recipe.to_dict(),
        "subsets_alpha_seed": [config.alpha, config.mask_seed],
        "train_size": config.train_size,
        "queries": [
            config.heldout_queries,
            config.generated,
            config.trajectories,
            list(config.journey_steps),
            config.sampler_steps,
        ],
        "truth": [config.truth_pairs, config.truth_buckets, config.truth_seed],
    }
    if path.is_file():
        found = json.loads(path.read_text())
        if found != wanted:
            raise ExplorerError(
                f"the cache {str(cache)!r} was made with other settings ({found}): use another --cache "
                "or delete it to start over"
            )
    else:
        write_json_atomic(path, wanted)


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
    _check_cache_config(cache, config)
    timings: dict[str, float] = {}
    train, heldout = train_heldout_split(load_builtin("digits"))
    if config.train_size is not None:
        train = train.subset(np.arange(config.train_size), f"first{config.train_size}")
    if config.heldout_queries is not None:
        heldout = heldout.subset(np.arange(config.heldout_queries), f"first{config.heldout_queries}")
    train_images = to_model_range(train.images)  # (N, 1, H, W)

    # 1. the full model, its TracIn checkpoints and the feature classifier
    started = time.perf_counter()
    full_dir, tracin_files = prepare_full_model(cache, train, heldout, config)
    timings["full model"] = round(time.perf_counter() - started, 1)

    # 2. queries and their fixed (t, eps) pairs
    queries = _queries(cache, full_dir, heldout, config)
    full_model = load_model(full_dir)
    pairs = truth_pairs(
        queries, config.truth_pairs, config.truth_buckets, full_model.num_train_timesteps, config.truth_seed
    )

    # 3. subset models and f_j(q)
    masks = subset_masks(config.subsets, len(train), config.alpha, config.mask_seed)
    started, trained, truth = time.perf_counter(), 0, []
    for j in tqdm(range(config.subsets), desc="subset models", unit="model"):
        model_dir = cache / "subsets" / f"subset_{j:03d}"
        truth_path = model_dir / "truth.npy"
        if (
            config.stop_after_subsets is not None
            and trained >= config.stop_after_subsets
            and not truth_path.is_file()
        ):
            logger.info("stopping after %d new subset models (stop_after_subsets)", trained)
            return LDSRun({}, {}, {}, np.zeros(0), masks, queries, trained, complete=False)
        trained += train_cached(
            train.subset(np.flatnonzero(masks[j]), f"subset{j}"), model_dir, config.recipe
        )
        if not truth_path.is_file():
            save_npy_atomic(truth_path, query_losses(load_model(model_dir), queries, pairs))
        truth.append(np.load(truth_path))
    truth = np.stack(truth)  # (M, Q)
    timings["subset models + truth"] = round(time.perf_counter() - started, 1)

    # 4-5. every method's scores, LDS, distinctness
    scores, info = method_scores(config, cache, full_dir, tracin_files, train_images, queries, timings)
    started = time.perf_counter()
    predicted = {name: predictions(masks, tau) for name, tau in scores.items()}
    groups = groups_of(queries)
    boot = LDSBootstrap(truth, predicted, groups, config.bootstrap, seed=0)
    methods = {}
    for name, tau in scores.items():
        methods[name] = dict(
            info[name],
            lds={g: boot.interval(name, g).to_dict() for g in groups},
            distinctness={
                kind: distinctness(tau[groups[kind]], config.top)
                for kind in ("heldout", "generated", "journey")
            },
            sign_check=sign_check(masks, truth, tau),
        )
    timings["lds + bootstrap"] = round(time.perf_counter() - started, 1)

    # 6. ablations of the feature spec, for the TRAK/D-TRAK configuration with the best LDS over all queries
    started = time.perf_counter()
    best = max(
        (m for m in methods if m.startswith(("trak-", "dtrak-"))),
        key=lambda m: methods[m]["lds"]["all"]["mean"],
    )
    ablations = ablate(
        config,
        cache,
        full_dir,
        train_images,
        queries,
        masks,
        truth,
        groups,
        best,
        methods[best],
        scores,
        predicted,
    )
    timings["ablations"] = round(time.perf_counter() - started, 1)

    started = time.perf_counter()
    sweep = lambda_sweep(config, cache, masks, truth, groups, methods, scores)
    timings["lambda sweep"] = round(time.perf_counter() - started, 1)

    # 7. the shipped default: k x lambda rule x output, lambda chosen by the fair protocol
    started, defaults = time.perf_counter(), {}
    if config.defaults is not None and config.subsets >= 6:
        defaults = shipped_defaults(
            config.defaults,
            config.spec,
            cache / "features",
            masks,
            truth,
            groups,
            fair_split(config.subsets, groups, config.mask_seed),
            config.bootstrap,
        )
    elif config.defaults is not None:
        logger.info(
            "the shipped-default study needs 3 subset models on each side of its split: use --subsets "
            "6 or more"
        )
    timings["shipped defaults"] = round(time.perf_counter() - started, 1)

    compared = {
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
    claims = {
        name: {g: boot.difference(first, second, g).to_dict() for g in groups}
        for name, (first, second) in compared.items()
        if first in scores and second in scores
    }
    results = {
        "benchmark": "digits",
        "config": config.to_dict(),
        "train_size": len(train),
        "subsets": config.subsets,
        "queries": {kind: int(len(rows)) for kind, rows in groups.items()},
        "methods": methods,
        "claims": claims,
        "ablations": ablations,
        "lambda_sweep": sweep,
        "defaults": defaults,
        "best_method": best,
        "timings_s": timings,
        "truth_full_model": query_losses(full_model, queries, pairs).tolist(),
    }
    return LDSRun(results, scores, predicted, truth, masks, queries, trained, complete=True)


def ablate(
    config: LDSConfig,
    cache: Path,
    full_dir: Path,
    train_images: np.ndarray,
    queries: QuerySet,
    masks: np.ndarray,
    truth: np.ndarray,
    groups: dict,
    best_name: str,
    best: dict,
    scores: dict,
    predicted: dict,
) -> dict:
    """LDS of the best method with one feature-spec setting changed at a time, and its difference from the
    base setting (paired bootstrap). Adds the ablations' scores and predictions to `scores`/`predicted`."""
    model = load_model(full_dir)
    base = variant(config.spec, output=best["output"])
    out = {}
    for name, value in config.ablations:
        spec = variant(base, **{name: value})
        path = cache / "features" / f"full_{spec_key(spec)}.npz"
        features = cached_features(path, model, spec, train_images, queries)
        whitened = whiten_features(features, gcv_cache=path.with_suffix(".gcv.json"))
        key = f"{best['output']}{'-norm' if best['normalize'] else ''}@{name}={value}"
        scores[key] = trak_scores(whitened, features.query_bucket, best["normalize"])
        predicted[key] = predictions(masks, scores[key])
    keys = [k for k in predicted if "@" in k]
    boot = LDSBootstrap(
        truth,
        {best_name: predicted[best_name], **{k: predicted[k] for k in keys}},
        groups,
        config.bootstrap,
        seed=0,
    )
    for key in keys:
        out[key] = {
            "base": best_name,
            "lds": {g: boot.interval(key, g).to_dict() for g in groups},
            "minus_base": {g: boot.difference(key, best_name, g).to_dict() for g in groups},
        }
    return out


def lambda_sweep(
    config: LDSConfig,
    cache: Path,
    masks: np.ndarray,
    truth: np.ndarray,
    groups: dict,
    methods: dict,
    scores: dict[str, np.ndarray],
) -> dict:
    """Mean LDS over a grid of relative lambdas, and without whitening ("inf": gradient dot / cosine).

    A diagnostic, not a method: picking lambda on these numbers would tune it on the benchmark,
    which is what D-TRAK and DAS did and what the GCV choice avoids. It shows how much that tuning
    is worth. "validated" is the fair version of it: lambda picked on half of the queries scored
    with half of the subset models, and reported on the other queries with the other models.
    """
    out = {}
    fair = fair_split(len(masks), groups, config.mask_seed)
    half, pick, test_groups = (
        fair.pick_models,
        fair.pick,
        fair.test_groups,
    )  # even j / half of each kind pick lambda
    for output in config.sweep_outputs:
        spec = variant(config.spec, output=output)
        features = load_feature_set(cache / "features" / f"full_{spec_key(spec)}.npz", spec)
        family = "trak" if output == "loss" else "dtrak"
        entry = {
            "gcv": {
                "relative_lambda": methods[f"{family}-{output}"]["lambda"],
                "raw": {g: methods[f"{family}-{output}"]["lds"][g]["mean"] for g in groups},
                "norm": {g: methods[f"{family}-{output}-norm"]["lds"][g]["mean"] for g in groups},
            }
        }
        split = {
            "gcv": {
                name: _split_lds(masks, truth, half, scores[f"{family}-{output}{suffix}"])
                for name, suffix in (("raw", ""), ("norm", "-norm"))
            }
        }
        grid = [(f"{value:g}", value) for value in config.sweep_lambdas] + [("inf", None)]
        for label, value in grid:
            if value is None:
                train, query = features.train, features.query
            else:
                whitened = whiten_features(features, relative_lambda=value)
                train, query = whitened.train, whitened.query
            entry[label], split[label] = {}, {}
            for normalize, name in ((False, "raw"), (True, "norm")):
                tau = inner_product_scores(train, query, features.query_bucket, normalize)
                per_query = spearman_columns(truth, predictions(masks, tau))
                entry[label][name] = {g: float(np.nanmean(per_query[rows])) for g, rows in groups.items()}
                split[label][name] = _split_lds(masks, truth, half, tau)
        validated = {}
        for name in ("raw", "norm"):
            candidates = [label for label in split if label != "gcv"]
            chosen = max(candidates, key=lambda label: np.nanmean(split[label][name][0][pick]))
            validated[name] = {
                "chosen": chosen,
                "test": {g: _mean(split[chosen][name][1][rows]) for g, rows in test_groups.items()},
                "gcv_test": {g: _mean(split["gcv"][name][1][rows]) for g, rows in test_groups.items()},
            }
        entry["validated"] = validated
        out[output] = entry
    return out


def _mean(values: np.ndarray) -> float:
    """nanmean that gives NaN for an empty or all-NaN group without a warning."""
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if len(finite) else float("nan")


def _split_lds(
    masks: np.ndarray, truth: np.ndarray, half: np.ndarray, tau: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per-query LDS on the subset models of `half`, and on the others."""
    g = predictions(masks, tau)
    return spearman_columns(truth[half], g[half]), spearman_columns(truth[~half], g[~half])


def save_run(run: LDSRun, results_dir: str | Path, cache: str | Path, name: str = "lds_digits") -> list[Path]:
    """Small results to results_dir (JSON; Markdown tables; NPZ: masks, truth, the queries, per-query LDS
    of every
    method), a PNG plot; the score matrices tau (Q x N per method) and predictions g (M x Q) to the cache."""
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    json_path, npz_path = results_dir / f"{name}.json", results_dir / f"{name}.npz"
    write_json_atomic(json_path, run.results)
    markdown_path = results_dir / f"{name}.md"
    write_atomic(markdown_path, lambda tmp: Path(tmp).write_text(lds_markdown(run.results) + "\n"))
    queries = run.queries.to_arrays()
    arrays = {
        "masks_packed": np.packbits(run.masks, axis=1),
        "masks_shape": np.array(run.masks.shape),
        "truth": run.truth.astype(np.float32),
        **queries,
        "query_images": queries["query_images"].astype(np.float16),
    }
    names = sorted(run.predictions)
    arrays["method_names"] = np.array(names)
    arrays["lds_per_query"] = np.stack(
        [spearman_columns(run.truth, run.predictions[m]) for m in names]
    )  # (methods, Q)
    predictions_by_method = {name: g.astype(np.float32) for name, g in run.predictions.items()}
    for path, payload in (
        (npz_path, arrays),
        (Path(cache) / "scores.npz", run.scores),
        (Path(cache) / "predictions.npz", predictions_by_method),
    ):
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, **payload)
        tmp.replace(path)
    plot = lds_plot(run.results, results_dir / f"{name}.png")
    return [json_path, npz_path, markdown_path] + ([plot] if plot is not None else [])
