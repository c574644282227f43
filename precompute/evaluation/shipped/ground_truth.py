"""A ground truth with signal: subset models trained with shared seeds, measured with identical noise.

    python -m precompute evaluate truth [--stops 600 1250 2500] [--subsets 4] [--results DIR] [--cache DIR]

The LDS ground truth of the shipped model (TRAK section 2, as D-TRAK and DAS build it): random halves S_j of
the 4,500 training digits, each trained with m recipe seeds **shared by every subset** (the same init, the
same batch indices, timesteps and noise: common random numbers, so the seeds' effect is one offset for all
subsets), and every model measured on the benchmark's queries with **the same evaluation draws**:

- whole-image queries (held-out digits, generated finals): the diffusion loss (DDPM eq. 14) over
  `pairs_per_bucket` stratified (t, eps) pairs in every bucket of [0, T);
- per-step queries, Journey-TRAK's definition (the primary one): the loss of x0hat at step s re-noised at
  `proxy_pairs` (t, eps) pairs inside the bucket of the step's timestep;
- per-step queries tied to the trajectory: the loss at the trajectory's own x_t against the noise joining
  x_t to each of `completions` stochastic completions of the shipped model from x_t (their mean: the
  conditional p(. | x_t) of Journey-TRAK section 3, not the one final image that happened).

Every model is trained once to the longest of `stops` and measured at each stop (training is resumable and
deterministic, so stopping and continuing changes nothing). Each measurement is one small file,
`steps_NNNN/subset_JJJ_seedM.npz`, holding the full truth under the names
precompute.evaluation.shipped.truth's files use, plus nested means over the first 1, 2, 4, ... draws
(`*_levels`): the study of how the signal grows with draws and with training length reads those
(bench/truth_study.py). Commit the files as they finish; a run resumes on any machine from them, and several
processes share the work through lock files.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from explorer.data import to_model_range
from explorer.errors import ExplorerError
from explorer.model import DiffusionModel, load_model
from explorer.noising import joining_noise
from explorer.sampler import complete_from_steps, generate
from precompute.evaluation.retrain import Recipe, subset_masks
from precompute.evaluation.shipped.truth import (
    QUERIES_NAME,
    Queries,
    claim_lock,
    noised_losses,
    record_settings,
    shipped_split,
    shipped_unet,
)
from precompute.train import train_ddpm

logger = logging.getLogger(__name__)

TARGETS_NAME = "completion_targets.npz"


@dataclass(frozen=True)
class GroundTruthConfig:
    """What the truth depends on; recorded in the results folder and checked on every resume."""

    subsets: int = (
        64  # M random halves (masks as in the 600-step benchmark: mask j depends on (mask_seed, j))
    )
    seeds: tuple[int, ...] = (0, 1, 2)  # recipe seeds, the same for every subset; the truth averages them
    stops: tuple[int, ...] = (1250,)  # training steps at which every model is measured
    alpha: float = 0.5
    mask_seed: int = 0
    pairs_per_bucket: int = 8  # whole-image (t, eps) pairs in each of the buckets
    proxy_pairs: int = 48  # Journey-TRAK per-step (t, eps) pairs inside the step's bucket
    completions: int = 8  # stochastic completions from x_t for the trajectory-tied truth
    buckets: int = 10
    truth_seed: int = 2  # the evaluation draws, identical for every model
    completion_seed: int = 0
    sampler_steps: int = 50  # the sampler steps of the queries' trajectories

    def recipe(self, unet, seed: int) -> Recipe:
        # checkpoint_every only says how often a killed run can resume; the weights do not depend on it
        return Recipe(
            steps=max(self.stops),
            batch_size=64,
            learning_rate=1e-3,
            seed=seed,
            checkpoint_every=250,
            unet=unet,
        )

    def to_dict(self) -> dict:
        """What every model's file depends on (how many subsets, which seeds and stops a run covers do not
        change any file, so a study and the full run share one folder)."""
        settings = {k: v for k, v in asdict(self).items() if k not in ("subsets", "seeds", "stops")}
        settings["recipe"] = {
            k: v for k, v in asdict(self.recipe(None, 0)).items() if k in ("batch_size", "learning_rate")
        }
        return json.loads(json.dumps(settings))


def draw_levels(count: int) -> list[int]:
    """Nested draw counts 1, 2, 4, ... up to and including `count`."""
    levels = [1]
    while levels[-1] * 2 < count:
        levels.append(levels[-1] * 2)
    return levels + [count] if levels[-1] != count else levels


def prefix_means(losses: torch.Tensor, levels: list[int]) -> torch.Tensor:
    """(..., D) draws -> (..., L): the mean of the first n draws for every n in levels."""
    cumulative = losses.double().cumsum(-1)
    return torch.stack([cumulative[..., n - 1] / n for n in levels], -1)


class Measurement:
    """f_j(q) of one model on every query, with the evaluation draws fixed once for all models."""

    def __init__(
        self,
        queries: Queries,
        heldout_images: np.ndarray,
        targets: np.ndarray,
        config: GroundTruthConfig,
        num_train_timesteps: int,
    ):
        self.whole = torch.from_numpy(np.concatenate([heldout_images, queries.finals]).astype(np.float32))
        generator = torch.Generator().manual_seed(config.truth_seed)
        T, B, per = num_train_timesteps, config.buckets, config.pairs_per_bucket
        width = T / B
        # 1. whole-image pairs: `per` stratified timesteps in each bucket, in a random order inside the
        # bucket so that every prefix of draws still spans the bucket; one noise draw per pair
        strata = (torch.arange(per) + torch.rand(B, per, generator=generator)) / per  # (B, per) in [0, 1)
        order = torch.argsort(torch.rand(B, per, generator=generator), -1)
        inside = torch.gather(strata, 1, order)
        self.whole_t = ((torch.arange(B).unsqueeze(1) + inside) * width).long().clamp(0, T - 1)  # (B, per)
        self.whole_eps = torch.randn((B, per, *self.whole.shape[1:]), generator=generator)
        # 2. Journey-TRAK pairs of a per-step query: stratified inside the query's bucket, random order
        P = config.proxy_pairs
        strata = (torch.arange(P) + torch.rand(P, generator=generator)) / P
        inside = strata[torch.randperm(P, generator=generator)] * width  # (P,)
        buckets = torch.from_numpy(queries.timesteps // width).long()  # (G, J)
        self.proxy_t = (buckets.unsqueeze(-1) * width + inside).long().clamp(0, T - 1)  # (G, J, P)
        self.proxy_eps = torch.randn((P, *self.whole.shape[1:]), generator=generator)
        self.targets = torch.from_numpy(targets)  # (G, J, L, C, H, W) mean eps* over the first n completions
        self.queries, self.config = queries, config

    @torch.no_grad()
    # 128 rows per forward: 2.4x faster per row than 2048 on this CPU (cache), and bit-identical
    def measure(self, model: DiffusionModel, batch: int = 128) -> dict[str, np.ndarray]:
        abar = model.scheduler.alphas_cumprod.to(torch.float32)
        B, per = self.whole_t.shape
        W = len(self.whole)
        losses = noised_losses(
            model,
            self.whole.repeat_interleave(B * per, 0),
            self.whole_t.flatten().repeat(W),
            self.whole_eps.flatten(0, 1).repeat(W, 1, 1, 1),
            abar,
            batch,
        ).view(W, B, per)
        whole_levels = prefix_means(losses, draw_levels(per)).mean(1)  # (W, L): the mean over buckets

        q = self.queries
        G, J = q.timesteps.shape
        P = self.proxy_t.shape[-1]
        x0hat = torch.from_numpy(q.x0hat).flatten(0, 1).repeat_interleave(P, 0)  # (G J P, C, H, W)
        eps = self.proxy_eps.repeat(G * J, 1, 1, 1)
        proxy = noised_losses(model, x0hat, self.proxy_t.flatten(), eps, abar, batch).view(G, J, P)

        # trajectory-tied: mean_c |eps_theta(x_t) - eps*_c|^2 = |eps_theta(x_t) - mean_c eps*_c|^2 + a
        # constant that no model changes, so the mean target over the first n completions gives the same
        # ranking
        t = torch.from_numpy(q.timesteps).flatten()
        xt = torch.from_numpy(q.xt).flatten(0, 1)
        predicted = torch.cat(
            [model.unet(xt[i : i + batch], t[i : i + batch]).sample for i in range(0, len(xt), batch)]
        )
        targets = self.targets.flatten(0, 1)  # (G J, L, C, H, W)
        trajectory = (predicted.unsqueeze(1) - targets).pow(2).flatten(2).mean(-1).view(G, J, -1)
        return {
            "whole_by_bucket": losses.mean(-1).numpy().astype(np.float32),
            "step_proxy": proxy.mean(-1).numpy().astype(np.float32),
            "step_trajectory": trajectory[..., -1].numpy().astype(np.float32),
            "whole_levels": whole_levels.numpy().astype(np.float32),
            "proxy_levels": prefix_means(proxy, draw_levels(P)).numpy().astype(np.float32),
            "trajectory_levels": trajectory.numpy().astype(np.float32),
        }


def completion_targets(model: DiffusionModel, queries: Queries, config: GroundTruthConfig) -> np.ndarray:
    """(G, J, L, C, H, W): for every per-step query, the mean over the first n of the shipped model's
    stochastic completions from x_t of the noise eps* = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t) that joins
    x_t to the completion x0 (DDPM eq. 4 solved for eps), for n in draw_levels(completions)."""
    abar = model.scheduler.alphas_cumprod.to(torch.float32)
    steps = [int(s) for s in queries.steps]
    levels = draw_levels(config.completions)
    out = []
    for seed, times, xt in zip(queries.seeds, queries.timesteps, queries.xt):
        trajectory = generate(model, int(seed), config.sampler_steps)
        if not np.allclose(trajectory.xt[steps].numpy(), xt, atol=1e-5):
            raise ExplorerError(f"the shipped model no longer reproduces trajectory {seed} of {QUERIES_NAME}")
        finals = complete_from_steps(
            model, trajectory, steps, config.completions, seed=config.completion_seed + int(seed)
        )  # (J, c, C, H, W)
        a = abar[torch.from_numpy(times)].view(-1, 1, 1, 1, 1)
        eps_star = joining_noise(torch.from_numpy(xt).unsqueeze(1), finals, a)
        cumulative = eps_star.double().cumsum(1)
        out.append(torch.stack([cumulative[:, n - 1] / n for n in levels], 1).float())
    return torch.stack(out).numpy()


def result_path(results: Path, stop: int, j: int, seed: int) -> Path:
    return results / f"steps_{stop:04d}" / f"subset_{j:03d}_seed{seed}.npz"


def prepare(results: Path, model_dir: str, data: str, config: GroundTruthConfig, queries_from: Path):
    """The results folder's settings, queries (the benchmark's, copied) and completion targets."""
    results.mkdir(parents=True, exist_ok=True)
    model = load_model(model_dir)
    train, heldout = shipped_split(data, model.sample_size)
    record_settings(
        results,
        {
            "truth": config.to_dict(),
            "queries": json.loads((queries_from / "config.json").read_text())["truth"],
            "model_hash": model.weights_hash,
            "train_fingerprint": train.fingerprint(),
            "heldout_fingerprint": heldout.fingerprint(),
        },
        "ground truth",
    )
    if not (results / QUERIES_NAME).is_file():
        Queries.load(queries_from / QUERIES_NAME).save(results / QUERIES_NAME)
    queries = Queries.load(results / QUERIES_NAME)
    if not (results / TARGETS_NAME).is_file():
        targets = completion_targets(model, queries, config)
        tmp = results / (TARGETS_NAME + ".tmp")
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, targets=targets.astype(np.float16))
        tmp.replace(results / TARGETS_NAME)
    with np.load(results / TARGETS_NAME) as stored:
        targets = stored["targets"].astype(np.float32)
    return model, queries, targets, train, heldout


def jobs(config: GroundTruthConfig) -> list[tuple[int, int]]:
    """(subset, seed), subset-major: a partial run has every seed of its first subsets."""
    return [(j, seed) for j in range(config.subsets) for seed in config.seeds]


def run_ground_truth(
    results: str | Path,
    cache: str | Path,
    model_dir: str = "assets/model",
    data: str = "mnist5k",
    config: GroundTruthConfig = GroundTruthConfig(),
    queries_from: str | Path = "bench/results/lds_mnist5k",
    stop_after: int | None = None,
) -> int:
    """Train and measure every (subset, seed) not yet in `results`; returns how many models this call
    finished."""
    results, cache = Path(results), Path(cache)
    model, queries, targets, train, heldout = prepare(results, model_dir, data, config, Path(queries_from))
    measurement = Measurement(
        queries, to_model_range(heldout.images), targets, config, model.num_train_timesteps
    )
    unet = shipped_unet(model_dir)
    masks = subset_masks(config.subsets, len(train), config.alpha, config.mask_seed)
    cache.mkdir(parents=True, exist_ok=True)
    finished = 0
    for j, seed in jobs(config):
        outs = [result_path(results, stop, j, seed) for stop in config.stops]
        if all(out.is_file() for out in outs):
            continue
        if stop_after is not None and finished >= stop_after:
            break
        lock = cache / f"subset_{j:03d}_seed{seed}.lock"
        if not claim_lock(lock):
            continue
        try:
            _train_and_measure(
                train.subset(np.flatnonzero(masks[j]), f"subset{j}"),
                cache / lock.stem,
                config.recipe(unet, seed),
                masks[j],
                j,
                seed,
                outs,
                measurement,
                config,
            )
            finished += 1
        finally:
            lock.unlink(missing_ok=True)
    return finished


def _train_and_measure(
    subset,
    model_dir: Path,
    recipe: Recipe,
    mask: np.ndarray,
    j: int,
    seed: int,
    outs: list[Path],
    measurement: Measurement,
    config: GroundTruthConfig,
) -> None:
    """Train one model stop by stop (resumable), measuring and writing one file at each stop."""
    train_seconds = 0.0
    for stop, out in zip(config.stops, outs):
        started = time.process_time()
        train_ddpm(subset, model_dir, recipe.train_config(stop), recipe.unet)
        train_seconds += time.process_time() - started  # a resumed run counts only what it trained here
        if out.is_file():
            continue
        started = time.process_time()
        rows = measurement.measure(load_model(model_dir))
        measure_seconds = time.process_time() - started
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        with open(tmp, "wb") as handle:
            np.savez_compressed(
                handle,
                mask=np.packbits(mask),
                subset=j,
                seed=seed,
                steps=stop,
                train_cpu_seconds=train_seconds,
                measure_cpu_seconds=measure_seconds,
                **rows,
            )
        tmp.replace(out)
        logger.info("%s: trained %.0f s, measured %.0f s (CPU)", out, train_seconds, measure_seconds)
