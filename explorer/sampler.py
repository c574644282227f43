"""Generation that records x_t and the one-step estimate x0hat at every step.

The loop is diffusers' sampling loop written out (for DDPM, Ho et al. 2020, Algorithm 2) with the model's own
scheduler (explorer.model.SCHEDULERS), so that each step's input x_t and x0hat = (x_t - sqrt(1 - abar_t) eps)
/ sqrt(abar_t) (DDPM eq. 15, what DDPM's `pred_original_sample` is) are kept for attribution and for the
feature-likelihood curves. Completions from x_t must be random draws of p(. | x_t): a DDIM scheduler runs
them with eta = 1 (DDIM's stochastic case, DDPM's variance); a DPM-Solver, whose multistep state belongs to
one trajectory, runs each start step's completions as their own batch.
"""

from __future__ import annotations

import copy
import inspect
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


STATEFUL_SCHEDULERS = ("DPMSolverMultistepScheduler",)  # keep earlier steps' outputs: one trajectory each


def make_sampling_scheduler(model: DiffusionModel, steps: int) -> DDPMScheduler:
    scheduler = copy.deepcopy(model.scheduler)  # set_timesteps mutates it; keep the model's pristine
    scheduler.set_timesteps(check_steps(steps, model.num_train_timesteps))
    return scheduler


def one_step_estimate(model: DiffusionModel, sample: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
    """x0hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), clipped to the data range [-1, 1]."""
    abar = model.scheduler.alphas_cumprod[int(t)].to(sample.dtype)
    return ((sample - (1 - abar).sqrt() * eps) / abar.sqrt()).clamp(-1, 1)


def step_options(scheduler, stochastic: bool, generator: torch.Generator) -> dict:
    """Keyword arguments of scheduler.step: the generator where it takes one; eta = 1 for a DDIM step that
    must draw (completions), 0 (deterministic DDIM) for the trajectory itself."""
    accepted = inspect.signature(scheduler.step).parameters
    options = {"generator": generator} if "generator" in accepted else {}
    if "eta" in accepted:
        options["eta"] = 1.0 if stochastic else 0.0
    return options


@torch.no_grad()
def generate(model: DiffusionModel, seed: int, steps: int = 50) -> Trajectory:
    """Sample one image from pure noise, recording every step."""
    seed = check_seed(seed)
    scheduler = make_sampling_scheduler(model, steps)
    generator = torch.Generator().manual_seed(seed)
    shape = (1, model.channels, model.sample_size, model.sample_size)
    sample = torch.randn(shape, generator=generator)  # x_T
    inputs, estimates = [], []
    options = step_options(scheduler, stochastic=False, generator=generator)
    for t in scheduler.timesteps:
        inputs.append(sample[0])
        eps = model.unet(sample, t).sample  # 1. predict the noise
        estimates.append(one_step_estimate(model, sample, eps, t)[0])  # 2. x0hat (eq. 15)
        sample = scheduler.step(eps, t, sample, **options).prev_sample  # 3. x_{t-1} (DDPM: eq. 7)
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
    generator = torch.Generator().manual_seed(check_seed(seed))
    starts = sorted(set(int(s) for s in start_steps))
    if any(not 0 <= s < trajectory.steps for s in starts):
        raise ExplorerError(f"start steps {starts} must lie in 0..{trajectory.steps - 1}")
    groups = [[s] for s in starts] if type(model.scheduler).__name__ in STATEFUL_SCHEDULERS else [starts]
    done, total = 0, sum(trajectory.steps - group[0] for group in groups)
    finals: dict[int, torch.Tensor] = {}

    def progress(steps_run: int) -> None:
        nonlocal done
        done += steps_run
        if on_step is not None:
            on_step(done, total)

    for group in groups:
        finals.update(_rollouts(model, trajectory, group, completions, generator, batch_limit, progress))
    return torch.stack([finals[int(s)] for s in start_steps])


def _rollouts(model, trajectory, starts, completions, generator, batch_limit, progress) -> dict:
    """{start step: (completions, C, H, W)}: rollouts that are active at a sampler step share its timestep,
    so they run as one batch per step."""
    scheduler = make_sampling_scheduler(model, trajectory.steps)
    options = step_options(scheduler, stochastic=True, generator=generator)
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
            outputs.append(scheduler.step(eps, t, chunk, **options).prev_sample)
        states = torch.cat(outputs)
        progress(1)
    finals = states.clamp(-1, 1)
    owners = torch.tensor(owner)
    return {s: finals[owners == s] for s in starts}
