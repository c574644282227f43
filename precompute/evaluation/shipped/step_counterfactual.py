"""Per-step counterfactual on the shipped model (Journey-TRAK section 3.2): remove the top-k positive
influencers
of a trajectory step, retrain, complete from the same x_t with the same noise, and compare with removing k
random
or k pixel-nearest training images.

    python -m precompute evaluate step-counterfactual [--stop-after N]      # hours; resumable; several
    processes

For each query (a trajectory of the shipped model, sampler seed not used by the LDS benchmark) and each
step s:
1. the explorer's own attribution of step s (the served index, x0hat of s in the bucket of its timestep) gives
   the top-k positive influencers; the pixel-nearest are the k training images closest to the final image;
2. a model is retrained on the 4,500 training images minus those k with the shipped-truth recipe
   (precompute.evaluation.shipped.truth: the shipped architecture, 600 steps), and k random images are removed
   in shared seeded sets; the reference is the same recipe on all 4,500 images, so only the data differs;
3. every model runs M stochastic completions from the trajectory's x_t at step s with the same sampler
seed, and
   the change against the reference is measured: the drop of p(c* | x_t) (c* = the class of the trajectory's
   final image), the total-variation distance of the class distributions, the energy distance of the
   completions (precompute.evaluation.counterfactual).
Each finished model leaves one small JSON in the results folder (commit them); the weights stay in the cache.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from explorer.atomic import write_json_atomic
from explorer.classifier import load_classifier
from explorer.data import to_model_range
from explorer.errors import ExplorerError
from explorer.features import FeatureComputer, bucket_of_timestep
from explorer.index import AttributionIndex
from explorer.model import load_model
from explorer.sampler import generate
from explorer.scoring import all_scores
from precompute.evaluation.counterfactual import completions, pixel_nearest
from precompute.evaluation.metrics import mean_interval
from precompute.evaluation.retrain import train_cached
from precompute.evaluation.shipped.truth import (
    TruthConfig,
    claim_lock,
    record_settings,
    shipped_split,
    shipped_unet,
)

logger = logging.getLogger(__name__)

KINDS = ("topk", "random", "pixel")


@dataclass(frozen=True)
class StepCounterfactualConfig:
    seeds: tuple[int, ...] = (2000, 2001, 2002, 2003)  # query trajectories; no LDS query uses these seeds
    steps: tuple[int, ...] = (10, 20, 30, 40)  # sampler steps of 50 (t ~ 800, 600, 400, 200)
    sampler_steps: int = 50
    fraction: float = 0.05  # k = 5% of the training set
    random_sets: int = 3  # shared by every query and step
    completions: int = 64

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


def jobs(config: StepCounterfactualConfig) -> list[tuple[str, int, int]]:
    """(kind, query seed or random set, step) per model, in run order: the reference and random sets
    first. The
    pixel-nearest set depends on the query's final image only, so one pixel model per query serves every
    step."""
    out = [("reference", 0, -1)] + [("random", r, -1) for r in range(config.random_sets)]
    out += [("pixel", seed, -1) for seed in config.seeds]
    return out + [("topk", seed, step) for seed in config.seeds for step in config.steps]


def model_name(kind: str, index: int, step: int) -> str:
    names = {"reference": "reference", "random": f"random_set{index}", "pixel": f"pixel_seed{index}"}
    return names.get(kind, f"{kind}_seed{index}_step{step}")


def removals(
    index: AttributionIndex, model, trajectories: dict, config: StepCounterfactualConfig, k: int
) -> dict:
    """{(kind, seed, step): training positions to remove} for topk (the served attribution) and pixel."""
    spec = index.meta.spec
    computer = FeatureComputer(model, spec)
    T = index.meta.num_train_timesteps
    train_images = to_model_range(index.train_images)
    out = {}
    for seed, trajectory in trajectories.items():
        nearest = pixel_nearest(trajectory.final[None].numpy(), train_images, k)[0]
        for step in config.steps:
            bucket = bucket_of_timestep(int(trajectory.timesteps[step]), index.buckets, T)
            phi = computer.features(trajectory.x0hat[step][None], torch.tensor([bucket])).numpy()
            scores = all_scores(index.vectors(bucket), index.query_vectors(phi, np.array([bucket])))[0]
            out[("topk", seed, step)] = np.argsort(-scores, kind="stable")[:k]
        out[("pixel", seed, -1)] = nearest
    return out


def run_step_counterfactual(
    results: str | Path,
    cache: str | Path,
    model_dir: str = "assets/model",
    index_dir: str = "assets/index",
    config: StepCounterfactualConfig = StepCounterfactualConfig(),
    truth: TruthConfig = TruthConfig(),
    data: str = "mnist5k",
    stop_after: int | None = None,
) -> int:
    """Train and measure every model not yet in `results`; returns how many this call finished."""
    results, cache = Path(results), Path(cache)
    results.mkdir(parents=True, exist_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    model = load_model(model_dir)
    index = AttributionIndex.load(index_dir, model_hash=model.weights_hash)
    classifier = load_classifier(Path(model_dir) / "classifier")
    train, _ = shipped_split(data, model.sample_size)
    if not np.array_equal(train.ids, index.train_ids):
        raise ExplorerError(
            f"index {index_dir!r} does not hold the training split of {data!r}: use an index of that split"
        )
    recipe = truth.recipe(shipped_unet(model_dir))
    trajectories = {seed: generate(model, seed, config.sampler_steps) for seed in config.seeds}
    finals = torch.stack([trajectory.final for trajectory in trajectories.values()])
    targets = dict(zip(map(str, config.seeds), classifier.probabilities(finals).argmax(1).tolist()))
    wanted = {
        "counterfactual": config.to_dict(),
        "recipe_steps": truth.steps,
        "index": index.label,
        "index_hash": index.meta.file_hashes["bucket_00.faiss"],
        "model_hash": model.weights_hash,
        "targets": targets,
    }
    record_settings(results, wanted, "a counterfactual run")
    k = max(1, int(round(config.fraction * len(train))))
    removed = removals(index, model, trajectories, config, k)
    finished = 0
    for kind, which, step in jobs(config):
        name = model_name(kind, which, step)
        out = results / f"{name}.json"
        if stop_after is not None and finished >= stop_after:
            break
        if out.is_file() or not claim_lock(cache / f"{name}.lock"):
            continue
        try:
            if kind == "reference":
                gone = np.zeros(0, dtype=int)
            elif kind == "random":
                gone = np.random.default_rng([k, which]).choice(len(train), k, replace=False)
            else:
                gone = removed[(kind, which, step)]
            keep = np.setdiff1d(np.arange(len(train)), gone)
            train_cached(train.subset(keep, name), cache / name, recipe)
            new = load_model(cache / name)
            seeds = config.seeds if kind in ("reference", "random") else (which,)
            pairs = [(seed, s) for seed in seeds for s in (config.steps if step < 0 else (step,))]
            measured = [
                {
                    "seed": seed,
                    "step": s,
                    "probabilities": completions(
                        new, classifier, trajectories[seed], s, config.completions
                    ).probabilities.tolist(),
                }
                for seed, s in pairs
            ]
            write_json_atomic(
                out, {"kind": kind, "removed_ids": index.train_ids[gone].tolist(), "completions": measured}
            )
            finished += 1
        finally:
            (cache / f"{name}.lock").unlink(missing_ok=True)
    return finished


def _tv(p: np.ndarray, q: np.ndarray) -> float:
    """Total-variation distance of two class distributions."""
    return float(0.5 * np.abs(p - q).sum())


def summarize(results: str | Path) -> dict:
    """Per step: the TV distance of top-k, random and pixel removals' class distributions from the
    reference's,
    with bootstrap CIs over queries, the paired differences top-k minus random / minus pixel, and top-k's
    drop of
    p(c* | x_t)."""
    results = Path(results)
    recorded = json.loads((results / "config.json").read_text())
    config = StepCounterfactualConfig(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in recorded["counterfactual"].items()}
    )
    classifier_targets = {int(seed): int(c) for seed, c in recorded["targets"].items()}
    loaded = {
        path.stem: json.loads(path.read_text()) for path in results.glob("*.json") if path.stem != "config"
    }
    if "reference" not in loaded:
        return {"steps": {}, "models": len(loaded)}

    def probabilities(name: str, seed: int, step: int) -> np.ndarray | None:
        for row in loaded.get(name, {}).get("completions", []):
            if row["seed"] == seed and row["step"] == step:
                return np.array(row["probabilities"])
        return None

    out = {}
    for step in config.steps:
        per_kind: dict[str, list[float]] = {kind: [] for kind in KINDS}
        complete_seeds = []
        for seed in config.seeds:
            ref = probabilities("reference", seed, step)
            top, pix = (
                probabilities(f"topk_seed{seed}_step{step}", seed, step),
                probabilities(f"pixel_seed{seed}", seed, step),
            )
            randoms = [
                p
                for r in range(config.random_sets)
                if (p := probabilities(f"random_set{r}", seed, step)) is not None
            ]
            if ref is None or top is None or pix is None or not randoms:
                continue
            target = classifier_targets[seed]
            per_kind["topk"].append(_tv(ref, top))
            per_kind["pixel"].append(_tv(ref, pix))
            per_kind["random"].append(float(np.mean([_tv(ref, p) for p in randoms])))
            complete_seeds.append((seed, float(ref[target] - top[target])))
        if len(complete_seeds) < 2:
            continue
        values = {kind: np.array(v) for kind, v in per_kind.items()}
        out[str(step)] = {
            "queries": len(complete_seeds),
            "tv": {kind: mean_interval(v, 1000) for kind, v in values.items()},
            "topk_minus_random": mean_interval(values["topk"] - values["random"], 1000),
            "topk_minus_pixel": mean_interval(values["topk"] - values["pixel"], 1000),
            "drop_topk": mean_interval(np.array([d for _, d in complete_seeds]), 1000),
        }
    return {"steps": out, "models": len(loaded), "config": config.to_dict()}
