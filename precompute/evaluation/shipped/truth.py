"""Ground truth of the LDS benchmark on the shipped model: subset models of mnist5k and their outputs f_j(q).

    python -m precompute evaluate shipped-truth [--workers-per-process 1] [--stop-after N]

The benchmark attributes the model the app ships (assets/model: mnist5k 16x16, 2,500 steps). Its ground truth
retrains that architecture on M random halves S_j of the same 4,500 training images (TRAK section 2) with a
shorter recipe (Recipe below: 600 steps, 0.24x the shipped one; ~3 min per model on one core here) and
measures, for every query q, the subset model's output f_j(q):

- whole-image queries (held-out digits, generated finals): the diffusion loss (DDPM eq. 14) averaged over
fixed
  (t, eps) pairs, six per bucket of [0, T), kept per bucket;
- per-step queries, tied to one trajectory of the shipped model at sampler step s with timestep t
(Journey-TRAK
  section 3: the step's conditional distribution p(. | x_t)): the subset model's denoising loss at the
  trajectory's own x_t, against the noise that joins x_t to the trajectory's final image,
  eps* = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t);
- the same per-step queries by the older proxy: x0hat of step s re-noised with fresh noise in its bucket.

Each finished model leaves one small file in the results folder (its mask and truth rows: a few tens of
KB, meant
to be committed as it finishes), so the benchmark resumes on any machine; the weights stay in the cache.
Several processes may run at once: each claims a model with an exclusive lock file before training it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from explorer.atomic import write_json_atomic
from explorer.data import Dataset, load_dataset, to_model_range, train_heldout_split
from explorer.errors import ExplorerError
from explorer.model import DiffusionModel, UNetConfig, load_model
from explorer.noising import forward_noise, joining_noise
from explorer.sampler import generate
from precompute.evaluation.retrain import Recipe, subset_masks, train_cached

logger = logging.getLogger(__name__)

QUERIES_NAME = "queries.npz"
CONFIG_NAME = "config.json"


@dataclass(frozen=True)
class TruthConfig:
    """What the ground truth depends on; recorded in the results folder and checked on every resume."""

    subsets: int = 64  # M random halves
    seed_repeats: int = 8  # subsets 0..7 retrained with a second recipe seed: the seed-noise ceiling of LDS
    alpha: float = 0.5
    mask_seed: int = 0
    steps: int = 600  # the shipped recipe runs 2,500; 600 on 2,250 images is 17 epochs (the shipped: 35)
    generated_seeds: tuple[int, ...] = tuple(
        range(1000, 1048)
    )  # finals and trajectories of the shipped model
    dev_seeds: int = 24  # the first 24 sampler seeds are dev queries, the rest test: no trajectory is in both
    sampler_steps: int = 50  # the app's default
    journey_steps: tuple[int, ...] = tuple(
        range(0, 50, 5)
    )  # sampler steps of the per-step queries: the whole slider
    pairs_per_bucket: int = (
        6  # (t, eps) pairs per bucket of a whole-image query's loss (measuring costs ~1/3 of training)
    )
    proxy_pairs: int = 16  # (t, eps) pairs of a per-step query's proxy loss
    buckets: int = 10
    truth_seed: int = 1
    query_split_seed: int = 0  # the dev/test split of the held-out digits

    def recipe(self, unet: UNetConfig, seed: int = 0) -> Recipe:
        return Recipe(
            steps=self.steps, batch_size=64, learning_rate=1e-3, seed=seed, checkpoint_every=100, unet=unet
        )

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


@dataclass
class Queries:
    """The benchmark's queries, fixed once from the shipped model and committed with the results."""

    heldout_ids: np.ndarray  # (H,) dataset ids of the held-out digits
    heldout_dev: np.ndarray  # (H,) bool
    seeds: np.ndarray  # (G,) sampler seeds of the generated images / trajectories
    finals: np.ndarray  # (G, C, S, S) float32 final images in [-1, 1]
    timesteps: np.ndarray  # (G, J) train timestep of each per-step query
    xt: np.ndarray  # (G, J, C, S, S) the trajectory's x_t at the journey steps
    x0hat: np.ndarray  # (G, J, C, S, S) the one-step estimate at those steps
    steps: np.ndarray  # (J,) sampler step indices

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, **asdict(self))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> Queries:
        with np.load(path, allow_pickle=False) as data:
            return cls(**{name: data[name] for name in cls.__dataclass_fields__})

    def generated_dev(self, dev_seeds: int) -> np.ndarray:
        return np.arange(len(self.seeds)) < dev_seeds


def shipped_split(data: str, resolution: int) -> tuple[Dataset, Dataset]:
    return train_heldout_split(load_dataset(data, resolution))


def build_queries(model: DiffusionModel, heldout: Dataset, config: TruthConfig) -> Queries:
    dev = np.zeros(len(heldout), dtype=bool)
    dev[np.random.default_rng(config.query_split_seed).permutation(len(heldout))[: len(heldout) // 2]] = True
    runs = [generate(model, seed, config.sampler_steps) for seed in config.generated_seeds]
    steps = np.array(config.journey_steps)
    return Queries(
        heldout_ids=heldout.ids.copy(),
        heldout_dev=dev,
        seeds=np.array(config.generated_seeds),
        finals=torch.stack([run.final for run in runs]).numpy(),
        timesteps=np.stack([run.timesteps[steps] for run in runs]).astype(np.int64),
        xt=torch.stack([run.xt[steps] for run in runs]).numpy(),
        x0hat=torch.stack([run.x0hat[steps] for run in runs]).numpy(),
        steps=steps,
    )


class Truth:
    """f_j(q) of one model on the benchmark's queries (the same fixed (t, eps) pairs for every model)."""

    def __init__(
        self, queries: Queries, heldout_images: np.ndarray, config: TruthConfig, num_train_timesteps: int
    ):
        self.whole = np.concatenate([heldout_images, queries.finals]).astype(np.float32)  # (W, C, S, S)
        generator = torch.Generator().manual_seed(config.truth_seed)
        T, per = num_train_timesteps, config.pairs_per_bucket
        count = config.buckets * per
        offsets = torch.rand(count, generator=generator)
        # 1. whole-image pairs: `per` stratified timesteps in each bucket, shared noise
        self.whole_t = (
            ((torch.arange(count) + offsets) * T / count).long().clamp(0, T - 1)
        )  # (B per,) bucket-major
        self.whole_eps = torch.randn((count, *self.whole.shape[1:]), generator=generator)
        # 2. proxy pairs of per-step queries: stratified inside the query's bucket
        width = T / config.buckets
        buckets = queries.timesteps // width  # (G, J)
        proxy_offsets = torch.rand(config.proxy_pairs, generator=generator)
        inside = (torch.arange(config.proxy_pairs) + proxy_offsets) * width / config.proxy_pairs  # (P,)
        self.proxy_t = (
            (torch.from_numpy(buckets).unsqueeze(-1) * width + inside).long().clamp(0, T - 1)
        )  # (G, J, P)
        self.proxy_eps = torch.randn((config.proxy_pairs, *self.whole.shape[1:]), generator=generator)
        self.buckets, self.per, self.queries = config.buckets, per, queries

    @torch.no_grad()
    def measure(self, model: DiffusionModel, batch: int = 2048) -> dict[str, np.ndarray]:
        """{whole_by_bucket (W, B), step_trajectory (G, J), step_proxy (G, J)}, float32 losses."""
        abar = model.scheduler.alphas_cumprod.to(torch.float32)
        x0 = torch.from_numpy(self.whole)
        w, p = len(x0), len(self.whole_t)
        losses = noised_losses(
            model,
            x0.repeat_interleave(p, 0),
            self.whole_t.repeat(w),
            self.whole_eps.repeat(w, 1, 1, 1),
            abar,
            batch,
        )
        whole = losses.view(w, self.buckets, self.per).mean(-1)  # (W, B)

        q = self.queries
        t = torch.from_numpy(q.timesteps).flatten()  # (G J,)
        xt = torch.from_numpy(q.xt).flatten(0, 1)  # (G J, C, S, S)
        final = torch.from_numpy(q.finals).repeat_interleave(q.xt.shape[1], 0)
        a = abar[t].view(-1, 1, 1, 1)
        target = joining_noise(xt, final, a)  # eps* joining x_t to the final image
        trajectory = _predict_loss(model, xt, t, target, batch)

        pairs = self.proxy_t.shape[-1]
        x0hat = torch.from_numpy(q.x0hat).flatten(0, 1).repeat_interleave(pairs, 0)  # (G J P, C, S, S)
        proxy_t = self.proxy_t.flatten()
        eps = self.proxy_eps.repeat(len(t), 1, 1, 1)
        proxy = noised_losses(model, x0hat, proxy_t, eps, abar, batch).view(len(t), pairs).mean(-1)
        shape = q.timesteps.shape
        return {
            "whole_by_bucket": whole.numpy().astype(np.float32),
            "step_trajectory": trajectory.view(shape).numpy().astype(np.float32),
            "step_proxy": proxy.view(shape).numpy().astype(np.float32),
        }


def noised_losses(
    model: DiffusionModel,
    x0: torch.Tensor,
    t: torch.Tensor,
    eps: torch.Tensor,
    abar: torch.Tensor,
    batch: int,
) -> torch.Tensor:
    a = abar[t].view(-1, 1, 1, 1)
    return _predict_loss(model, forward_noise(x0, eps, a), t, eps, batch)  # x_t, DDPM eq. 4


def _predict_loss(
    model: DiffusionModel, xt: torch.Tensor, t: torch.Tensor, target: torch.Tensor, batch: int
) -> torch.Tensor:
    out = torch.empty(len(xt), dtype=torch.float64)
    for start in range(0, len(xt), batch):
        rows = slice(start, start + batch)
        out[rows] = (model.unet(xt[rows], t[rows]).sample - target[rows]).pow(2).flatten(1).mean(1).double()
    return out


def model_jobs(config: TruthConfig) -> list[tuple[int, int]]:
    """(subset j, recipe seed) in the order they run: the LDS models, with one seed repeat after every
    fourth of
    them, so that a partial run has both LDS models and a first ceiling."""
    jobs, repeats = [], [(j, 1) for j in range(config.seed_repeats)]
    for j in range(config.subsets):
        jobs.append((j, 0))
        if j % 4 == 3 and repeats:
            jobs.append(repeats.pop(0))
    return jobs + repeats


def result_name(j: int, seed: int) -> str:
    return f"subset_{j:03d}.npz" if seed == 0 else f"subset_{j:03d}_seed{seed}.npz"


def claim_lock(lock: Path) -> bool:
    """An exclusive claim on one model; a claim whose process is gone is taken over."""
    try:
        handle = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            pid = int(lock.read_text() or 0)
            os.kill(pid, 0)
            return False
        except (ValueError, ProcessLookupError):
            lock.unlink(missing_ok=True)
            return claim_lock(lock)
        except PermissionError:
            return False
    os.write(handle, str(os.getpid()).encode())
    os.close(handle)
    return True


def record_settings(results: Path, wanted: dict, what: str) -> None:
    """Write the settings a results folder depends on, or refuse a folder made with other ones (naming the
    keys)."""
    path = results / CONFIG_NAME
    if path.is_file():
        found = json.loads(path.read_text())
        changed = sorted(k for k in set(found) | set(wanted) if found.get(k) != wanted.get(k))
        if changed:
            raise ExplorerError(
                f"{str(results)!r} holds {what} made with other settings (differs in {', '.join(changed)}): "
                "use another --results folder, or delete it to start over"
            )
    else:
        write_json_atomic(path, wanted)


def shipped_unet(model_dir: str | Path) -> UNetConfig:
    """The architecture recorded in a model directory's training.json (what the benchmarks retrain)."""
    recorded = json.loads((Path(model_dir) / "training.json").read_text())["unet"]
    return UNetConfig(**{**recorded, "block_out_channels": tuple(recorded["block_out_channels"])})


def prepare(
    results: Path, model_dir: str, data: str, config: TruthConfig
) -> tuple[Queries, Dataset, Dataset]:
    """The results folder's config and queries (made once from the shipped model, checked afterwards)."""
    results.mkdir(parents=True, exist_ok=True)
    model = load_model(model_dir)
    train, heldout = shipped_split(data, model.sample_size)
    wanted = {
        "truth": config.to_dict(),
        "model_hash": model.weights_hash,
        "train_fingerprint": train.fingerprint(),
        "heldout_fingerprint": heldout.fingerprint(),
    }
    record_settings(results, wanted, "ground truth")
    if not (results / QUERIES_NAME).is_file():
        build_queries(model, heldout, config).save(results / QUERIES_NAME)
    return Queries.load(results / QUERIES_NAME), train, heldout


def run_truth(
    results: str | Path,
    cache: str | Path,
    model_dir: str = "assets/model",
    data: str = "mnist5k",
    config: TruthConfig = TruthConfig(),
    stop_after: int | None = None,
) -> int:
    """Train and measure every model not yet in `results`; returns how many this call finished."""
    results, cache = Path(results), Path(cache)
    queries, train, heldout = prepare(results, model_dir, data, config)
    unet = shipped_unet(model_dir)
    truth = Truth(queries, to_model_range(heldout.images), config, load_model(model_dir).num_train_timesteps)
    masks = subset_masks(config.subsets, len(train), config.alpha, config.mask_seed)
    cache.mkdir(parents=True, exist_ok=True)
    finished = 0
    for j, seed in model_jobs(config):
        out = results / result_name(j, seed)
        lock = cache / (out.stem + ".lock")
        if stop_after is not None and finished >= stop_after:
            break
        if out.is_file() or not claim_lock(lock):
            continue
        try:
            started = time.perf_counter()
            model_dir_j = cache / out.stem
            train_cached(
                train.subset(np.flatnonzero(masks[j]), f"subset{j}"), model_dir_j, config.recipe(unet, seed)
            )
            rows = truth.measure(load_model(model_dir_j))
            tmp = out.with_suffix(".tmp")
            with open(tmp, "wb") as handle:
                np.savez_compressed(handle, mask=np.packbits(masks[j]), subset=j, seed=seed, **rows)
            tmp.replace(out)
            finished += 1
            logger.info("%s in %.0f s", out.name, time.perf_counter() - started)
        finally:
            lock.unlink(missing_ok=True)
    return finished


@dataclass
class TruthTable:
    """Every finished model's truth, stacked: rows are models (in job order), with their subset j and seed."""

    masks: np.ndarray  # (M, N) bool
    subsets: np.ndarray  # (M,)
    seeds: np.ndarray  # (M,)
    rows: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (M, ...)


def seed_mean(table: TruthTable) -> tuple[TruthTable, int]:
    """The truth as used and how many seeds it averages: one row per subset that has every seed, the mean of
    its seeds' rows (seed 0 stands for the mean). A truth with one seed per subset and a few repeats (the
    600-step benchmark) keeps its seed-0 rows instead."""
    from precompute.evaluation.ceiling import complete_subsets

    subsets, seeds = complete_subsets(table.subsets, table.seeds)
    if len(subsets) < len(set(table.subsets.tolist())) / 2:  # the 600-step truth: repeats are the exception
        keep = np.flatnonzero(table.seeds == 0)
        kept = {k: v[keep] for k, v in table.rows.items()}
        return TruthTable(table.masks[keep], table.subsets[keep], table.seeds[keep], kept), 1
    rows = {k: [] for k in table.rows}
    masks = []
    for j in subsets:
        mine = np.flatnonzero(table.subsets == j)
        masks.append(table.masks[mine[0]])
        for k, v in table.rows.items():
            rows[k].append(v[mine].astype(np.float64).mean(0).astype(np.float32))
    stacked = {k: np.stack(v) for k, v in rows.items()}
    return TruthTable(np.stack(masks), np.array(subsets), np.zeros(len(subsets), dtype=int), stacked), len(
        seeds
    )


def load_truth(results: str | Path, size: int) -> TruthTable:
    files = sorted(Path(results).glob("subset_*.npz"))
    if not files:
        raise ExplorerError(
            f"{str(results)!r} holds no finished subset model: run `python -m precompute evaluate "
            "shipped-truth`"
        )
    masks, subsets, seeds, rows = [], [], [], {}
    for path in files:
        with np.load(path, allow_pickle=False) as data:
            masks.append(np.unpackbits(data["mask"])[:size].astype(bool))
            subsets.append(int(data["subset"]))
            seeds.append(int(data["seed"]))
            for name in ("whole_by_bucket", "step_trajectory", "step_proxy"):
                rows.setdefault(name, []).append(data[name])
    return TruthTable(
        np.stack(masks), np.array(subsets), np.array(seeds), {k: np.stack(v) for k, v in rows.items()}
    )
