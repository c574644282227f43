"""Counterfactual test (Journey-TRAK section 3.2): remove a query's top influencers, retrain, and see
how much p(. | x_t) moves, against removing as many random or pixel-nearest images.

    python -m precompute evaluate counterfactual [--queries 20] [--step 35] [--method best]

For each query (a generated trajectory of the full model, at sampler step s):
1. attribute x0hat^(s) at the bucket of its timestep with the chosen method (a TRAK-family index
   configuration: output function, normalization, DAS) and take the top-k positive influencers;
2. retrain with the same recipe without them (k = 1% and 5% of the training set), and likewise
   without the k training images nearest to the final generated image in pixel space; random
   removals (two seeded sets per k) are shared by all queries;
3. from the same x_t, run M stochastic completions (same sampler seed for every model) and measure
   - drop: p_full(c* | x_t) - p_new(c* | x_t), c* = the class of the full model's final image,
   - tv: total-variation distance between the two class distributions,
   - energy: energy distance between the two completion sets (pixels in [-1, 1]).
A larger change than random removal means the attribution found images the model actually used.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from explorer.classifier import FeatureClassifier, load_classifier
from explorer.data import load_builtin, to_model_range, train_heldout_split
from explorer.errors import ExplorerError
from explorer.model import DiffusionModel, load_model
from explorer.sampler import Trajectory, complete_from_steps, generate
from precompute.evaluation.digits.config import LDSConfig, smoke_config
from precompute.evaluation.digits.ground_truth import QuerySet
from precompute.evaluation.digits.lds import prepare_full_model
from precompute.evaluation.digits.scores import (
    GLOBAL,
    compute_features,
    trak_scores,
    variant,
    whiten_features,
)
from precompute.evaluation.metrics import mean_interval
from precompute.evaluation.retrain import train_cached

logger = logging.getLogger(__name__)

KINDS = ("topk", "random", "pixel")


@dataclass
class CounterfactualConfig:
    queries: int = 20  # generated trajectories (sampler seeds seed0..)
    seed0: int = 1000  # not the LDS query seeds
    step: int = 35  # sampler step of the query (of 50): t ~ 280, where the digit's class is being decided
    sampler_steps: int = 50
    fractions: tuple[float, ...] = (0.01, 0.05)  # k as a fraction of the training set
    random_sets: int = 2  # seeded random removal sets per k, shared by all queries
    completions: int = 64  # M completions per (model, query)
    method: str = "dtrak-square-norm"  # a TRAK-family method id of the LDS table
    lds: LDSConfig = field(default_factory=LDSConfig)  # the recipe, the feature spec and the train data
    bootstrap: int = 1000

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


def smoke_counterfactual() -> CounterfactualConfig:
    """The harness end to end on the smoke LDS cache's tiny models."""
    return CounterfactualConfig(
        queries=3,
        step=5,
        sampler_steps=10,
        fractions=(0.05, 0.1),
        random_sets=1,
        completions=8,
        method="dtrak-square-norm",
        lds=smoke_config(),
        bootstrap=50,
    )


def parse_method(method: str) -> tuple[str, bool, bool]:
    """'dtrak-square-norm' -> ('square', normalize=True, das=False)."""
    parts = method.split("-")
    if (
        len(parts) not in (2, 3)
        or parts[0] not in ("trak", "dtrak", "das")
        or (len(parts) == 3 and parts[2] != "norm")
    ):
        raise ExplorerError(
            f"counterfactual method {method!r} is not a TRAK-family method id: use e.g. dtrak-square-norm, "
            "trak-loss, das-mean-norm"
        )
    return parts[1], len(parts) == 3, parts[0] == "das"


def top_influencers(
    model: DiffusionModel,
    config: CounterfactualConfig,
    train_images: np.ndarray,
    trajectories: list[Trajectory],
    k: int,
) -> np.ndarray:
    """(Q, k) training positions with the highest scores for x0hat at the chosen step."""
    output, normalize, das = parse_method(config.method)
    spec = variant(config.lds.spec, output=output)
    step = config.step
    queries = QuerySet(
        images=torch.stack([t.x0hat[step] for t in trajectories]).numpy(),
        kinds=np.array(["journey"] * len(trajectories)),
        timesteps=np.array([int(t.timesteps[step]) for t in trajectories]),
        sources=np.array([t.seed for t in trajectories]),
        steps=np.full(len(trajectories), step),
    )
    features = compute_features(model, spec, train_images, queries, residuals=das)
    features.train.pop(GLOBAL)  # only the step's bucket is needed
    if features.residuals is not None:
        features.residuals.pop(GLOBAL)
    scores = trak_scores(whiten_features(features), features.query_bucket, normalize, features.residuals)
    return np.argsort(-scores, axis=1)[:, :k]


def pixel_nearest(finals: np.ndarray, train_images: np.ndarray, k: int) -> np.ndarray:
    """(Q, k) training positions nearest to each final image (L2 in pixel space)."""
    distances = (
        (finals.reshape(len(finals), 1, -1) - train_images.reshape(1, len(train_images), -1)) ** 2
    ).sum(-1)
    return np.argsort(distances, axis=1)[:, :k]


def energy_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Energy distance between two sets of images (n, ...) and (m, ...): 2E|a-b| - E|a-a'| - E|b-b'|."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    return float(2 * torch.cdist(a, b).mean() - torch.cdist(a, a).mean() - torch.cdist(b, b).mean())


@dataclass
class Completions:
    probabilities: np.ndarray  # (classes,) mean classifier probability over the completions
    images: torch.Tensor  # (M, C, H, W)


def completions(
    model: DiffusionModel, classifier: FeatureClassifier, trajectory: Trajectory, step: int, count: int
) -> Completions:
    """M completions of the trajectory from x_t at `step`; the sampler seed is the trajectory's, for every
    model."""
    finals = complete_from_steps(model, trajectory, [step], count, seed=trajectory.seed)[0]
    return Completions(classifier.probabilities(finals).mean(0).numpy(), finals)


def change(full: Completions, new: Completions, target: int) -> dict[str, float]:
    return {
        "drop": float(full.probabilities[target] - new.probabilities[target]),
        "tv": float(0.5 * np.abs(full.probabilities - new.probabilities).sum()),
        "energy": energy_distance(full.images, new.images),
    }


def run_counterfactual(config: CounterfactualConfig, cache: str | Path) -> dict:
    """Train (or load from the cache) every removal model and measure the change of p(. | x_t)."""
    cache = Path(cache)
    timings, started = {}, time.perf_counter()
    lds = config.lds
    train, heldout = train_heldout_split(load_builtin("digits"))
    if lds.train_size is not None:
        train = train.subset(np.arange(lds.train_size), f"first{lds.train_size}")
    if lds.heldout_queries is not None:
        heldout = heldout.subset(np.arange(lds.heldout_queries), f"first{lds.heldout_queries}")
    train_images = to_model_range(train.images)
    full_dir = cache / "full"
    prepare_full_model(cache, train, heldout, lds)  # the LDS run's full model when it shares the cache
    model, classifier = load_model(full_dir), load_classifier(full_dir / "classifier")
    if not 0 <= config.step < config.sampler_steps:
        raise ExplorerError(f"--step {config.step} must lie in 0..{config.sampler_steps - 1}")
    trajectories = [generate(model, config.seed0 + q, config.sampler_steps) for q in range(config.queries)]
    finals = torch.stack([t.final for t in trajectories])
    targets = classifier.probabilities(finals).argmax(1).numpy()
    full = [completions(model, classifier, t, config.step, config.completions) for t in trajectories]
    ks = [max(1, int(round(f * len(train)))) for f in config.fractions]
    removals: dict[tuple[str, int], np.ndarray] = {}  # (kind, k) -> (Q, k) positions to remove
    top = top_influencers(model, config, train_images, trajectories, max(ks))
    nearest = pixel_nearest(finals.numpy(), train_images, max(ks))
    for k in ks:
        removals[("topk", k)], removals[("pixel", k)] = top[:, :k], nearest[:, :k]
    timings["attribution"] = round(time.perf_counter() - started, 1)

    started = time.perf_counter()
    root = cache / "counterfactual" / f"step{config.step}_{config.method}"
    per_query: dict[str, list[dict]] = {}
    # Shared random sets first, then query by query: a stopped run leaves whole queries done, and
    # `--queries n` then reports the first n from the cache.
    jobs = [("random", k, r) for k in ks for r in range(config.random_sets)]
    jobs += [(kind, k, q) for q in range(config.queries) for k in ks for kind in ("topk", "pixel")]
    for kind, k, index in tqdm(jobs, desc="counterfactual models", unit="model"):
        if kind == "random":
            removed = np.random.default_rng([k, index]).choice(len(train), k, replace=False)
            model_dir = cache / "counterfactual" / f"random_k{k}_set{index}"
        else:
            removed = removals[(kind, k)][index]
            model_dir = root / f"{kind}_k{k}_q{config.seed0 + index}"
        keep = np.setdiff1d(np.arange(len(train)), removed)
        train_cached(train.subset(keep, f"{model_dir.name}"), model_dir, lds.recipe)
        new_model = load_model(model_dir)
        for q in range(config.queries) if kind == "random" else [index]:
            result = change(
                full[q],
                completions(new_model, classifier, trajectories[q], config.step, config.completions),
                int(targets[q]),
            )
            per_query.setdefault(f"{kind}_k{k}", []).append(
                dict(result, query=config.seed0 + q, set=index if kind == "random" else 0)
            )
    timings["retrain + completions"] = round(time.perf_counter() - started, 1)
    return summarize(config, per_query, ks, targets, full, trajectories, removals, train.ids, timings)


def summarize(
    config: CounterfactualConfig,
    per_query: dict,
    ks: list[int],
    targets: np.ndarray,
    full: list[Completions],
    trajectories: list[Trajectory],
    removals: dict,
    train_ids: np.ndarray,
    timings: dict,
) -> dict:
    """Means with bootstrap CIs over queries; paired differences top-k minus random / minus pixel."""
    q_count = config.queries

    def matrix(name: str, metric: str) -> np.ndarray:
        """(Q,) the metric per query (random: averaged over its sets)."""
        rows = per_query[name]
        values = np.zeros(q_count)
        counts = np.zeros(q_count)
        for row in rows:
            values[row["query"] - config.seed0] += row[metric]
            counts[row["query"] - config.seed0] += 1
        return values / counts

    summary, comparisons = {}, {}
    for k in ks:
        for metric in ("drop", "tv", "energy"):
            per_kind = {kind: matrix(f"{kind}_k{k}", metric) for kind in KINDS}
            for kind, values in per_kind.items():
                summary.setdefault(f"{kind}_k{k}", {})[metric] = mean_interval(values, config.bootstrap)
            for other in ("random", "pixel"):
                difference = per_kind["topk"] - per_kind[other]
                comparisons.setdefault(f"topk_minus_{other}_k{k}", {})[metric] = dict(
                    mean_interval(difference, config.bootstrap), wins=int((difference > 0).sum()), of=q_count
                )
    timesteps = int(trajectories[0].timesteps[config.step])
    return {
        "config": config.to_dict(),
        "timestep": timesteps,
        "ks": ks,
        "targets": targets.tolist(),
        "p_full_target": [float(c.probabilities[t]) for c, t in zip(full, targets)],
        "summary": summary,
        "comparisons": comparisons,
        "per_query": per_query,
        "removed_ids": {f"{kind}_k{k}": train_ids[v].tolist() for (kind, k), v in removals.items()},
        "timings_s": timings,
    }


def counterfactual_markdown(results: dict) -> str:
    def cell(entry: dict) -> str:
        return f"{entry['mean']:.3f} [{entry['ci95'][0]:.3f}, {entry['ci95'][1]:.3f}]"

    config = results["config"]
    lines = [
        f"Counterfactual: {config['queries']} generated queries at sampler step {config['step']} of "
        f"{config['sampler_steps']} (t = {results['timestep']}), method {config['method']}, "
        f"{config['completions']} completions per model; mean [95% bootstrap CI over queries]",
        "",
        "| removal | k | drop of p(c* given x_t) | TV of class distribution | energy distance of "
        "completions |",
        "|---|---|---|---|---|",
    ]
    for k in results["ks"]:
        for kind in KINDS:
            entry = results["summary"][f"{kind}_k{k}"]
            lines.append(
                f"| {kind} | {k} | {cell(entry['drop'])} | {cell(entry['tv'])} | {cell(entry['energy'])} |"
            )
    lines += [
        "",
        "| top-k minus | k | drop | TV | energy (wins = queries where top-k changed more) |",
        "|---|---|---|---|---|",
    ]
    for k in results["ks"]:
        for other in ("random", "pixel"):
            entry = results["comparisons"][f"topk_minus_{other}_k{k}"]
            lines.append(
                f"| {other} | {k} | "
                + " | ".join(
                    f"{cell(entry[m])} ({entry[m]['wins']}/{entry[m]['of']})"
                    for m in ("drop", "tv", "energy")
                )
                + " |"
            )
    lines += ["", "wall times: " + ", ".join(f"{k} {v:.0f} s" for k, v in results["timings_s"].items())]
    return "\n".join(lines)
