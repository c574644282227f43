"""LDS on the shipped model, scored through index directories: what the explorer serves is what is measured.

    python -m precompute evaluate shipped-lds --index assets/index runs/other [--json
    bench/results/lds_mnist5k.json]

Ground truth comes from precompute.evaluation.shipped.truth (committed per-model files). For every index
directory:
- whole-image queries (held-out digits, generated finals): the score of a training image is its score
summed over
  the index's buckets, each bucket queried at its own timestep (the whole-image column), and, bucket by
  bucket,
  the score at that bucket against the loss measured inside the bucket (the per-bucket curve of held-out
  queries);
- per-step queries (a trajectory at sampler step s, timestep t): the query the explorer builds, x0hat of
step s
  in the bucket of t, against the trajectory-tied truth (the subset model's loss at the trajectory's own
  x_t) and
  against the older proxy (x0hat re-noised);
- baselines: pixel cosine and random scores.

LDS(q) = Spearman over subset models j of f_j(q) and g_j(q) = -sum_{i in S_j} tau(q, i) (TRAK eq. 5). Dev
and test
split models (even / odd j) and queries (held-out halves by seed; generated and per-step queries by
sampler seed,
so no trajectory is in both). Intervals: 95% bootstrap over subset models and over queries together (per-step
queries resampled a trajectory at a time). A truth with several seeds per subset is used as their mean, and
every column gets its ceiling (precompute.evaluation.ceiling): the share of signal and the LDS a perfect
method reaches.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from explorer.data import to_model_range
from explorer.errors import ExplorerError
from explorer.features import FeatureComputer, bucket_of_timestep
from explorer.index import AttributionIndex
from explorer.index_methods import query_computer, query_identity
from explorer.model import DiffusionModel
from explorer.scoring import blocked_predictions
from precompute.evaluation.baselines import pixel_vectors, random_scores
from precompute.evaluation.ceiling import column_ceiling, complete_subsets, seed_grid
from precompute.evaluation.metrics import lds_interval, paired_interval, predictions
from precompute.evaluation.shipped.truth import Queries, TruthConfig, TruthTable, seed_mean

logger = logging.getLogger(__name__)


@dataclass
class QueryPredictions:
    """g = -masks @ tau^T of one method for every model of the truth table (rows of its masks): whole
    (M, W, B) per bucket, steps (M, G, J). Only these enter the LDS; tau itself is never held whole
    (explorer.scoring.blocked_predictions), so the memory is bounded for any number of training rows."""

    whole_by_bucket: np.ndarray
    steps: np.ndarray

    @property
    def whole(self) -> np.ndarray:
        return self.whole_by_bucket.sum(axis=2)  # (M, W): g is linear in tau, so the buckets add up


def index_predictions(
    index: AttributionIndex,
    model: DiffusionModel,
    whole_images: np.ndarray,
    queries: Queries,
    masks: np.ndarray,
    cache: Path | None = None,
) -> QueryPredictions:
    """The predictions of the index's scores for the benchmark's queries, read through the index's files
    (explorer's path), scored block by block."""
    spec = index.meta.spec
    computer = query_computer(index.meta.method, spec, index.directory, model)
    T = index.meta.num_train_timesteps
    raw = query_features(computer, index.buckets, whole_images, queries, T, cache)
    whole = np.stack(
        [
            blocked_predictions(
                masks,
                index.vectors(b),
                index.query_vectors(raw["whole"][:, b], np.full(len(whole_images), b)),
            )
            for b in range(index.buckets)
        ],
        axis=2,
    )  # (M, W, B)
    buckets = np.array([bucket_of_timestep(int(t), index.buckets, T) for t in queries.timesteps.ravel()])
    step_vectors = index.query_vectors(raw["steps"], buckets)
    steps = np.empty((len(masks), len(buckets)))
    for b in np.unique(buckets):
        rows = np.flatnonzero(buckets == b)
        steps[:, rows] = blocked_predictions(masks, index.vectors(int(b)), step_vectors[rows])
    return QueryPredictions(whole, steps.reshape(len(masks), *queries.timesteps.shape))


def query_features(
    computer: FeatureComputer,
    buckets: int,
    whole_images: np.ndarray,
    queries: Queries,
    T: int,
    cache: Path | None,
) -> dict[str, np.ndarray]:
    """Raw query features {whole (W, B, k), steps (G J, k)}, cached by the spec (they do not depend on lambda,
    centering, normalization or storage)."""
    if cache is not None and cache.is_file():
        with np.load(cache) as data:
            return {"whole": data["whole"], "steps": data["steps"]}
    whole = computer.all_bucket_features(torch.from_numpy(whole_images)).numpy()  # (W, B, k)
    x0hat = torch.from_numpy(queries.x0hat).flatten(0, 1)  # (G J, C, S, S)
    step_buckets = torch.tensor([bucket_of_timestep(int(t), buckets, T) for t in queries.timesteps.ravel()])
    steps = computer.features(x0hat, step_buckets).numpy()
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, whole=whole, steps=steps)
    return {"whole": whole, "steps": steps}


def baseline_predictions(name: str, bench: Benchmark, train_images: np.ndarray) -> QueryPredictions:
    """Pixel cosine (of the image, or of the step's x0hat) or seeded random scores, as predictions."""
    whole_images, queries, masks = bench.whole_images, bench.queries, bench.table.masks
    buckets, train_images = bench.config.buckets, to_model_range(train_images)
    steps_images = queries.x0hat.reshape(-1, *queries.x0hat.shape[2:])
    if name == "pixel":  # cosine of unit pixel vectors: an inner-product search like an index's
        train = pixel_vectors(train_images)
        whole = blocked_predictions(masks, train, pixel_vectors(whole_images))
        steps = blocked_predictions(masks, train, pixel_vectors(steps_images))
    else:
        whole = predictions(masks, random_scores(len(whole_images), len(train_images), seed=0))
        steps = predictions(masks, random_scores(len(steps_images), len(train_images), seed=1))
    whole_by_bucket = np.repeat(whole[:, :, None] / buckets, buckets, axis=2)
    return QueryPredictions(whole_by_bucket, steps.reshape(len(masks), *queries.timesteps.shape))


@dataclass
class Split:
    models: dict[str, np.ndarray]  # "dev" / "test" -> rows of the seed-0 truth table
    heldout: dict[str, np.ndarray]  # -> held-out query rows
    generated: dict[str, np.ndarray]  # -> generated / trajectory rows


def split(table: TruthTable, queries: Queries, config: TruthConfig) -> Split:
    seed0 = np.flatnonzero(table.seeds == 0)
    models = {"dev": seed0[table.subsets[seed0] % 2 == 0], "test": seed0[table.subsets[seed0] % 2 == 1]}
    dev_gen = queries.generated_dev(config.dev_seeds)
    return Split(
        models,
        {"dev": np.flatnonzero(queries.heldout_dev), "test": np.flatnonzero(~queries.heldout_dev)},
        {"dev": np.flatnonzero(dev_gen), "test": np.flatnonzero(~dev_gen)},
    )


def method_lds(
    predicted: QueryPredictions, table: TruthTable, parts: Split, queries: Queries, group: str
) -> dict:
    """Every LDS column of one method on the dev or the test group."""
    models = parts.models[group]
    held, gen = parts.heldout[group], parts.generated[group]
    n_held = len(queries.heldout_ids)
    whole_truth = table.rows["whole_by_bucket"][models]  # (M, W, B)
    whole = predicted.whole[models]
    out = {}
    for name, rows, clusters in (("heldout", held, held), ("generated", n_held + gen, gen)):
        out[name] = lds_interval(whole_truth[:, rows].mean(-1), whole[:, rows], clusters)
    out["heldout_by_bucket"] = [
        lds_interval(whole_truth[:, held, b], predicted.whole_by_bucket[models][:, held, b], held)
        for b in range(whole_truth.shape[-1])
    ]
    steps = queries.steps
    g = predicted.steps[models][:, gen]  # (M, G', J)
    for truth_name in ("step_trajectory", "step_proxy"):
        truth = table.rows[truth_name][models][:, gen]  # (M, G', J)
        clusters = np.repeat(gen, len(steps))
        out[truth_name] = lds_interval(truth.reshape(len(models), -1), g.reshape(len(models), -1), clusters)
        out[f"{truth_name}_by_step"] = [
            lds_interval(truth[:, :, j], g[:, :, j], gen) for j in range(len(steps))
        ]
    return out


def _ceiling_columns(table: TruthTable, queries: Queries) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per column: the (M, Q) truth of every model and the query rows of the whole set it covers."""
    n_held = len(queries.heldout_ids)
    whole = table.rows["whole_by_bucket"].mean(-1)
    return {
        "heldout": (whole[:, :n_held], np.arange(n_held)),
        "generated": (whole[:, n_held:], np.arange(whole.shape[1] - n_held)),
        "step_trajectory": (table.rows["step_trajectory"], np.arange(len(queries.seeds))),
        "step_proxy": (table.rows["step_proxy"], np.arange(len(queries.seeds))),
    }


def truth_ceiling(per_seed: TruthTable, queries: Queries, parts: Split, seeds_used: int) -> dict:
    """Per LDS column, on its test queries: the share of the truth that is signal and the LDS a perfect method
    could reach against the truth as used (precompute.evaluation.ceiling), from every subset trained with
    every seed."""
    subsets, seeds = complete_subsets(per_seed.subsets, per_seed.seeds)
    out: dict = {"subsets": len(subsets), "seeds": len(seeds), "seeds_used": seeds_used}
    if len(subsets) < 2 or len(seeds) < 2:
        return out
    tests = {
        "heldout": parts.heldout["test"],
        "generated": parts.generated["test"],
        "step_trajectory": parts.generated["test"],
        "step_proxy": parts.generated["test"],
    }
    for name, (values, _) in _ceiling_columns(per_seed, queries).items():
        rows = values[:, tests[name]].reshape(len(values), -1)  # per-step (M, G', J) -> (M, G' J)
        out[name] = column_ceiling(seed_grid(rows, per_seed.subsets, per_seed.seeds, subsets), seeds_used)
    return out


@dataclass
class Benchmark:
    """The committed ground truth of the shipped model, loaded once: what every index is scored against."""

    config: TruthConfig
    queries: Queries
    table: TruthTable  # the truth as used: one row per subset (the mean of its seeds)
    per_seed: TruthTable  # every model
    seeds_used: int
    parts: Split
    whole_images: np.ndarray  # (W, C, H, W) held-out images, then the generated finals, model range
    train_images: np.ndarray

    @classmethod
    def load(cls, truth_dir: str | Path, train_images: np.ndarray, heldout_images: np.ndarray) -> Benchmark:
        from precompute.evaluation.shipped.truth import QUERIES_NAME, load_truth

        truth_dir = Path(truth_dir)
        config, root = truth_settings(truth_dir)
        queries = Queries.load(root / QUERIES_NAME)
        per_seed = load_truth(truth_dir, len(train_images))
        table, seeds_used = seed_mean(per_seed)
        whole = np.concatenate([to_model_range(heldout_images), queries.finals]).astype(np.float32)
        parts = split(table, queries, config)
        return cls(config, queries, table, per_seed, seeds_used, parts, whole, train_images)

    def entry(self, predicted: QueryPredictions, label: str) -> dict:
        parts, queries, table = self.parts, self.queries, self.table
        return {
            "label": label,
            **{g: method_lds(predicted, table, parts, queries, g) for g in ("dev", "test")},
        }

    def columns(self, predicted: QueryPredictions, group: str) -> dict[str, tuple]:
        """(truth (M, Q), predictions (M, Q), clusters (Q,)) of the whole-image held-out and the per-step
        (trajectory-tied) columns of one split group."""
        models, held, gen = self.parts.models[group], self.parts.heldout[group], self.parts.generated[group]
        whole_truth = self.table.rows["whole_by_bucket"][models][:, held].mean(-1)
        steps = len(self.queries.steps)
        step_truth = self.table.rows["step_trajectory"][models][:, gen].reshape(len(models), -1)
        step_predicted = predicted.steps[models][:, gen].reshape(len(models), -1)
        return {
            "heldout": (whole_truth, predicted.whole[models][:, held], held),
            "step_trajectory": (step_truth, step_predicted, np.repeat(gen, steps)),
        }

    def paired(self, first: QueryPredictions, second: QueryPredictions, group: str = "test") -> dict:
        """LDS(first) - LDS(second) per column, with one bootstrap drawing the same models and queries for
        both."""
        out = {}
        a_columns, b_columns = self.columns(first, group), self.columns(second, group)
        for name, (truth, a, clusters) in a_columns.items():
            out[name] = paired_interval(truth, a, b_columns[name][1], clusters)
        return out


def truth_settings(truth_dir: Path) -> tuple[TruthConfig, Path]:
    """The query settings of a truth folder and the folder holding its queries: the 600-step truth
    (bench/results/lds_mnist5k) records them itself; a stop of the shared-seed truth
    (bench/results/truth_mnist5k/steps_1250) keeps them, with its queries, one folder up."""
    root = truth_dir if (truth_dir / "config.json").is_file() else truth_dir.parent
    if not (root / "config.json").is_file():
        raise ExplorerError(
            f"{str(truth_dir)!r} is no ground-truth folder (no config.json in it or above it): pass "
            "bench/results/truth_mnist5k/steps_1250 or a folder written by `precompute evaluate truth`"
        )
    settings = json.loads((root / "config.json").read_text())
    if "queries" in settings:
        stop = int(truth_dir.name.split("_")[-1]) if truth_dir.name.startswith("steps_") else 0
        values = {**settings["queries"], "steps": stop, "buckets": settings["truth"]["buckets"]}
    else:
        values = settings["truth"]
    return TruthConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}), root


def score_index(
    directory: str | Path, model: DiffusionModel, bench: Benchmark, cache: Path
) -> tuple[AttributionIndex, QueryPredictions]:
    """One index directory's predictions on the benchmark (its query features cached in `cache`)."""

    index = AttributionIndex.load(directory, model_hash=model.weights_hash)
    if index.buckets != bench.config.buckets:
        raise ExplorerError(
            f"index {str(directory)!r} has {index.buckets} buckets, the ground truth measures "
            f"{bench.config.buckets}: score an index built with --buckets {bench.config.buckets}"
        )
    if index.meta.count != bench.table.masks.shape[1]:
        raise ExplorerError(
            f"index {str(directory)!r} holds {index.meta.count} rows, the ground truth's subsets are "
            f"drawn from {bench.table.masks.shape[1]} training images: featurize the whole training split"
        )
    return index, index_predictions(
        index, model, bench.whole_images, bench.queries, bench.table.masks, cache / query_cache_name(index)
    )


def query_cache_name(index: AttributionIndex) -> str:
    """Every spec field changes the query features (precision, calibrated exact layers, ...), and so do a
    method's checkpoints or factors: the cache is keyed on all."""
    identity = query_identity(index.meta.method, index.meta.spec, index.meta.file_hashes)
    return f"queries_{hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]}.npz"


def run_shipped_lds(
    index_dirs: list[str],
    model: DiffusionModel,
    truth_dir: str | Path,
    train_images: np.ndarray,
    heldout_images: np.ndarray,
    cache: str | Path,
    baselines: tuple[str, ...] = ("pixel", "random"),
) -> dict:
    """The LDS table of every index directory and baseline on the committed ground truth (dev and test)."""
    bench = Benchmark.load(truth_dir, train_images, heldout_images)
    methods = {}
    for directory in index_dirs:
        index, predicted = score_index(directory, model, bench, Path(cache))
        methods[str(directory)] = bench.entry(predicted, index.label)
        logger.info("%s: test heldout %s", directory, methods[str(directory)]["test"]["heldout"])
    for name in baselines:
        predicted = baseline_predictions(name, bench, train_images)
        methods[name] = bench.entry(predicted, f"{name} baseline")
    table, queries = bench.table, bench.queries
    return {
        "truth": {
            "models": int(len(table.seeds)),
            "seeds_used": bench.seeds_used,
            "dev_models": int(len(bench.parts.models["dev"])),
            "test_models": int(len(bench.parts.models["test"])),
            "recipe_steps": bench.config.steps,
            "step_timesteps": queries.timesteps.mean(0).round().astype(int).tolist(),
            "steps": queries.steps.tolist(),
        },
        "ceiling": truth_ceiling(bench.per_seed, queries, bench.parts, bench.seeds_used),
        "methods": methods,
    }
