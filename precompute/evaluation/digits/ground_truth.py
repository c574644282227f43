"""LDS queries and their ground-truth outputs f_j(q): the diffusion loss of model j on query q.

Three kinds of query (DESIGN section 3):
- heldout:   real held-out images, never trained on;
- generated: final images sampled from the full model (seeded);
- journey:   the one-step estimate x0hat of a generated trajectory at a sampler step (Journey-TRAK's
             per-step query), whose output lives at that step's timestep.

f_j(q) = mean over P fixed (t, eps) pairs of |eps_theta_j(sqrt(abar_t) x_q + sqrt(1 - abar_t) eps, t) -
eps|^2.
The pairs are drawn once from a seed and are identical for every model j, so f_j(q) differs
across j only through the weights. Whole-image queries (heldout, generated) stratify t over [0, T);
a journey query stratifies t over its step's neighbourhood: the `truth_buckets`-th part of [0, T)
that holds its timestep (the explorer's default bucket).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from explorer.data import Dataset, to_model_range
from explorer.model import DiffusionModel
from explorer.noising import forward_noise
from explorer.sampler import generate

KINDS = ("heldout", "generated", "journey")


@dataclass
class QuerySet:
    """Q queries; whole-image queries have timestep -1."""

    images: np.ndarray  # (Q, C, H, W) float32 in [-1, 1]
    kinds: np.ndarray  # (Q,) str, one of KINDS
    timesteps: np.ndarray  # (Q,) int: the journey query's train timestep, -1 for whole-image queries
    sources: np.ndarray  # (Q,) int: heldout dataset id, or the sampler seed of generated/journey queries
    steps: np.ndarray  # (Q,) int: the journey query's sampler step index, -1 otherwise

    def __len__(self) -> int:
        return len(self.kinds)

    def select(self, kind: str) -> np.ndarray:
        return np.flatnonzero(self.kinds == kind)

    @property
    def whole(self) -> np.ndarray:
        return np.flatnonzero(self.timesteps < 0)

    @property
    def journey(self) -> np.ndarray:
        return np.flatnonzero(self.timesteps >= 0)

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {
            "query_images": self.images,
            "query_kinds": self.kinds.astype("U9"),
            "query_timesteps": self.timesteps,
            "query_sources": self.sources,
            "query_steps": self.steps,
        }


def build_queries(
    model: DiffusionModel,
    heldout: Dataset,
    generated: int,
    trajectories: int,
    journey_steps: list[int],
    sampler_steps: int,
    seed: int = 0,
) -> QuerySet:
    """Held-out images, `generated` sampled images (seeds seed..), and x0hat of the first
    `trajectories` of them at each of `journey_steps` (sampler step indices)."""
    images, kinds, timesteps, sources, steps = [to_model_range(heldout.images)], [], [], [], []
    kinds += ["heldout"] * len(heldout)
    timesteps += [-1] * len(heldout)
    sources += heldout.ids.tolist()
    steps += [-1] * len(heldout)
    runs = [generate(model, seed + g, sampler_steps) for g in range(max(generated, trajectories))]
    for g in range(generated):
        images.append(runs[g].final[None].numpy())
        kinds.append("generated"), timesteps.append(-1), sources.append(seed + g), steps.append(-1)
    for g in range(trajectories):
        for step in journey_steps:
            images.append(runs[g].x0hat[step][None].numpy())
            (
                kinds.append("journey"),
                timesteps.append(int(runs[g].timesteps[step])),
                sources.append(seed + g),
                steps.append(step),
            )
    return QuerySet(
        images=np.concatenate(images).astype(np.float32),
        kinds=np.array(kinds),
        timesteps=np.array(timesteps, dtype=np.int64),
        sources=np.array(sources, dtype=np.int64),
        steps=np.array(steps, dtype=np.int64),
    )


@dataclass
class TruthPairs:
    """The fixed (t, eps) pairs of every query: (Q, P) timesteps and (Q, P, C, H, W) noise."""

    timesteps: torch.Tensor
    noise: torch.Tensor


def truth_pairs(
    queries: QuerySet, pairs: int, truth_buckets: int, num_train_timesteps: int, seed: int
) -> TruthPairs:
    """Stratified timesteps (one per equal sub-range) and Gaussian noise, from a generator seeded by `seed`.

    All queries share one draw of the stratification offsets and the noise, so queries differ only
    in their images and (for journey queries) in the range their timesteps cover.
    """
    T = num_train_timesteps
    generator = torch.Generator().manual_seed(seed)
    offsets = torch.rand(pairs, generator=generator)  # (P,) position inside each stratum
    noise = torch.randn((pairs, *queries.images.shape[1:]), generator=generator)  # (P, C, H, W)
    width = T / truth_buckets
    rows = []
    for t in queries.timesteps.tolist():
        low, span = (0.0, float(T)) if t < 0 else ((t // width) * width, width)
        rows.append((low + (torch.arange(pairs) + offsets) * span / pairs).long().clamp(0, T - 1))
    return TruthPairs(timesteps=torch.stack(rows), noise=noise.expand(len(queries), *noise.shape))


@torch.no_grad()
def query_losses(
    model: DiffusionModel, queries: QuerySet, pairs: TruthPairs, batch: int = 4096
) -> np.ndarray:
    """f(q) for every query under one model: (Q,) float64, the loss averaged over the query's pairs."""
    x0 = torch.from_numpy(queries.images)  # (Q, C, H, W)
    q_count, p_count = pairs.timesteps.shape
    flat_q = torch.arange(q_count).repeat_interleave(p_count)  # (Q P,)
    flat_t = pairs.timesteps.reshape(-1)
    flat_eps = pairs.noise.reshape(-1, *x0.shape[1:])
    abar = model.scheduler.alphas_cumprod.to(torch.float32)
    losses = torch.empty(q_count * p_count, dtype=torch.float64)
    for start in range(0, len(flat_q), batch):
        rows = slice(start, start + batch)
        a = abar[flat_t[rows]].view(-1, 1, 1, 1)
        noisy = forward_noise(x0[flat_q[rows]], flat_eps[rows], a)  # x_t, DDPM eq. 4
        prediction = model.unet(noisy, flat_t[rows]).sample
        losses[rows] = (prediction - flat_eps[rows]).pow(2).flatten(1).mean(1).double()
    return losses.view(q_count, p_count).mean(1).numpy()
