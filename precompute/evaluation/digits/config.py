"""The digits LDS's configuration (LDSConfig, the smoke-test one), its run record, and the check that a cache
folder was filled with the same configuration (precompute.evaluation.digits.lds runs it)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from explorer.atomic import write_json_atomic
from explorer.errors import ExplorerError
from explorer.features import FeatureSpec
from precompute.evaluation.digits.defaults import DefaultsConfig
from precompute.evaluation.digits.ground_truth import QuerySet
from precompute.evaluation.retrain import (
    Recipe,
)

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


def check_cache_config(cache: Path, config: LDSConfig) -> None:
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
