"""DDPM generation that records x_t and the one-step estimate x0hat at every step.

The loop is diffusers' DDPM sampling (Ho et al. 2020, Algorithm 2) written out so that each
step's input x_t and its `pred_original_sample` (x0hat = (x_t - sqrt(1 - abar_t) eps) /
sqrt(abar_t), eq. 15) are kept for attribution and for the feature-likelihood curves.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DDPMScheduler

from explorer.errors import ExplorerError
from explorer.model import DiffusionModel

MAX_SEED = 2**31 - 1
MIN_STEPS, MAX_STEPS = 10, 1000


@dataclass
class Trajectory:
    """One generation. Index s = 0 is the noisiest step, s = S - 1 the last one."""

    seed: int
    timesteps: np.ndarray  # (S,) train timesteps, decreasing
    xt: torch.Tensor  # (S, C, H, W) the sampler's input at each step
    x0hat: torch.Tensor  # (S, C, H, W) the one-step estimate of the clean image at each step
    final: torch.Tensor  # (C, H, W) the generated image

    @property
    def steps(self) -> int:
        return len(self.timesteps)


def check_seed(seed: int) -> int:
    if (
        isinstance(seed, bool)
        or not isinstance(seed, (int, np.integer))
        and not (isinstance(seed, float) and float(seed).is_integer())
    ):
        raise ExplorerError(f"seed {seed!r} is not an integer: use a whole number between 0 and {MAX_SEED}")
    seed = int(seed)
    if not 0 <= seed <= MAX_SEED:
        raise ExplorerError(f"seed {seed} is out of range: use a whole number between 0 and {MAX_SEED}")
    return seed


def check_steps(steps: int, num_train_timesteps: int) -> int:
    if (
        isinstance(steps, bool)
        or not isinstance(steps, (int, np.integer))
        and not (isinstance(steps, float) and float(steps).is_integer())
    ):
        raise ExplorerError(
            f"sampler steps {steps!r} is not an integer: use {MIN_STEPS} to {num_train_timesteps}"
        )
    steps = int(steps)
    if not MIN_STEPS <= steps <= min(MAX_STEPS, num_train_timesteps):
        raise ExplorerError(
            f"sampler steps {steps} is out of range: use {MIN_STEPS} to "
            f"{min(MAX_STEPS, num_train_timesteps)} (50-100 is typical)"
        )
    return steps


def make_sampling_scheduler(model: DiffusionModel, steps: int) -> DDPMScheduler:
    scheduler = copy.deepcopy(model.scheduler)  # set_timesteps mutates it; keep the model's pristine
    scheduler.set_timesteps(check_steps(steps, model.num_train_timesteps))
    return scheduler


@torch.no_grad()
def generate(model: DiffusionModel, seed: int, steps: int = 50) -> Trajectory:
    """Sample one image from pure noise, recording every step."""
    seed = check_seed(seed)
    scheduler = make_sampling_scheduler(model, steps)
    generator = torch.Generator().manual_seed(seed)
    shape = (1, model.channels, model.sample_size, model.sample_size)
    sample = torch.randn(shape, generator=generator)  # x_T
    inputs, estimates = [], []
    for t in scheduler.timesteps:
        inputs.append(sample[0])
        eps = model.unet(sample, t).sample  # 1. predict the noise
        out = scheduler.step(eps, t, sample, generator=generator)  # 2. x0hat (eq. 15), 3. x_{t-1} (eq. 7)
        estimates.append(out.pred_original_sample[0].clamp(-1, 1))
        sample = out.prev_sample
    return Trajectory(
        seed=seed,
        timesteps=scheduler.timesteps.numpy().copy(),
        xt=torch.stack(inputs),
        x0hat=torch.stack(estimates),
        final=sample[0].clamp(-1, 1),
    )


@torch.no_grad()
def complete_from_steps(
    model: DiffusionModel,
    trajectory: Trajectory,
    start_steps: list[int],
    completions: int,
    seed: int = 0,
    batch_limit: int = 256,
    on_step: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Stochastic completions p(. | x_t): from x_t of each start step, run the sampler to the end
    (on_step(done, total) after each sampler step, for progress).

    Returns (len(start_steps), completions, C, H, W). All rollouts that are active at a sampler
    step share its timestep, so they run as one batch per step (S UNet calls in all).
    """
    scheduler = make_sampling_scheduler(model, trajectory.steps)
    generator = torch.Generator().manual_seed(check_seed(seed))
    starts = sorted(set(int(s) for s in start_steps))
    if any(not 0 <= s < trajectory.steps for s in starts):
        raise ExplorerError(f"start steps {starts} must lie in 0..{trajectory.steps - 1}")
    shape = trajectory.xt.shape[1:]
    states = torch.empty((0, *shape))
    owner: list[int] = []  # which start step each row of `states` belongs to
    for step, t in enumerate(scheduler.timesteps):
        if step in starts:
            states = torch.cat([states, trajectory.xt[step].expand(completions, *shape)])
            owner += [step] * completions
        if len(states) == 0:
            continue
        outputs = []
        for chunk in states.split(batch_limit):
            eps = model.unet(chunk, t).sample
            outputs.append(scheduler.step(eps, t, chunk, generator=generator).prev_sample)
        states = torch.cat(outputs)
        if on_step is not None:
            on_step(step + 1, len(scheduler.timesteps))
    finals = states.clamp(-1, 1)
    order = {s: i for i, s in enumerate(starts)}
    result = torch.empty((len(starts), completions, *shape))
    for row, step in enumerate(owner):
        result[order[step], row % completions] = finals[row]
    return result[[order[int(s)] for s in start_steps]]
