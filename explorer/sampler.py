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
    # a text model's: the prompt, its embeddings (1, L, D), the classifier-free guidance scale, and the
    # pictures decoded through the VAE (xt, x0hat, final in the UNet's space are latents)
    prompt: str | None = None
    context: torch.Tensor | None = None
    guidance: float = 1.0
    decoded: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    @property
    def pictures(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_t (S, C, H, W), x0hat (S, C, H, W), final (C, H, W)) as pictures in [-1, 1]."""
        return self.decoded if self.decoded is not None else (self.xt, self.x0hat, self.final)


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
    """x0hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), clipped to the data range [-1, 1] (pixels; latents
    have no fixed range)."""
    abar = model.scheduler.alphas_cumprod[int(t)].to(sample.device, sample.dtype)
    estimate = (sample - (1 - abar).sqrt() * eps) / abar.sqrt()
    return estimate if model.latent is not None else estimate.clamp(-1, 1)


def check_guidance(guidance) -> float:
    try:
        value = float(guidance)
    except (TypeError, ValueError):
        value = float("nan")
    if not 1.0 <= value <= 30.0:
        raise ExplorerError(f"guidance {guidance!r} must be a number from 1 (none) to 30 (7.5 is typical)")
    return value


def guided_eps(model: DiffusionModel, sample: torch.Tensor, t, context, unconditional, guidance: float):
    """The noise prediction with classifier-free guidance (Ho & Salimans 2022):
    eps_u + guidance (eps_c - eps_u); a pixel model's plain eps."""
    if context is None:
        return model.eps(sample, t)
    context = context.expand(len(sample), -1, -1)
    if guidance == 1.0:
        return model.eps(sample, t, context)
    both = model.eps(torch.cat([sample, sample]), t, torch.cat([unconditional.expand_as(context), context]))
    plain, conditioned = both.chunk(2)
    return plain + guidance * (conditioned - plain)


def prompt_context(model: DiffusionModel, prompt: str | None) -> torch.Tensor | None:
    """The prompt's embeddings (1, L, D) for a text model, None for a pixel model."""
    if model.latent is None:
        if prompt:
            raise ExplorerError(
                f"{model.path!r} is not text-conditioned: it takes no prompt (got {prompt!r})"
            )
        return None
    return model.latent.encode_prompts([prompt or ""])


def unconditional_context(model: DiffusionModel, context, guidance: float) -> torch.Tensor | None:
    """The empty prompt's embeddings where classifier-free guidance uses them (a text model, guidance > 1)."""
    return None if context is None or guidance == 1.0 else model.latent.encode_prompts([""])


def step_options(scheduler, stochastic: bool, generator: torch.Generator) -> dict:
    """Keyword arguments of scheduler.step: the generator where it takes one; eta = 1 for a DDIM step that
    must draw (completions), 0 (deterministic DDIM) for the trajectory itself."""
    accepted = inspect.signature(scheduler.step).parameters
    options = {"generator": generator} if "generator" in accepted else {}
    if "eta" in accepted:
        options["eta"] = 1.0 if stochastic else 0.0
    return options


@torch.no_grad()
def generate(
    model: DiffusionModel, seed: int, steps: int = 50, prompt: str | None = None, guidance: float = 1.0
) -> Trajectory:
    """Sample one image from pure noise, recording every step (a text model: for `prompt`, with
    classifier-free guidance scale `guidance`)."""
    seed, guidance = check_seed(seed), check_guidance(guidance)
    context = prompt_context(model, prompt)
    unconditional = unconditional_context(model, context, guidance)
    scheduler = make_sampling_scheduler(model, steps)
    generator = torch.Generator().manual_seed(seed)
    shape = (1, model.channels, model.sample_size, model.sample_size)
    sample = torch.randn(shape, generator=generator).to(model.device)  # x_T, drawn on the CPU (any device)
    inputs, estimates = [], []
    options = step_options(scheduler, stochastic=False, generator=generator)
    for t in scheduler.timesteps:
        inputs.append(sample[0])
        eps = guided_eps(model, sample, t, context, unconditional, guidance)  # 1. predict the noise
        estimates.append(one_step_estimate(model, sample, eps, t)[0])  # 2. x0hat (eq. 15)
        sample = scheduler.step(eps, t, sample, **options).prev_sample  # 3. x_{t-1} (DDPM: eq. 7)
    xt, x0hat = torch.stack(inputs).cpu(), torch.stack(estimates).cpu()
    final = sample[0].cpu() if model.latent is not None else sample[0].clamp(-1, 1).cpu()
    decoded = (
        None
        if model.latent is None
        else (model.to_images(xt), model.to_images(x0hat), model.to_images(final))
    )
    return Trajectory(
        seed=seed,
        timesteps=scheduler.timesteps.numpy().copy(),
        xt=xt,
        x0hat=x0hat,
        final=final,
        prompt=prompt if model.latent is not None else None,
        context=context,
        guidance=guidance,
        decoded=decoded,
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

    Returns (len(start_steps), completions, C, H, W) in the UNet's space (latents for a text model, with the
    trajectory's prompt and guidance). All rollouts that are active at a sampler step share its timestep, so
    they run as one batch per step (S UNet calls in all).
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
    unconditional = unconditional_context(model, trajectory.context, trajectory.guidance)
    shape = trajectory.xt.shape[1:]
    states = torch.empty((0, *shape), device=model.device)
    owner: list[int] = []  # which start step each row of `states` belongs to
    for step, t in enumerate(scheduler.timesteps):
        if step in starts:
            states = torch.cat([states, trajectory.xt[step].to(model.device).expand(completions, *shape)])
            owner += [step] * completions
        if len(states) == 0:
            continue
        outputs = []
        for chunk in states.split(batch_limit):
            eps = guided_eps(model, chunk, t, trajectory.context, unconditional, trajectory.guidance)
            outputs.append(scheduler.step(eps, t, chunk, **options).prev_sample)
        states = torch.cat(outputs)
        progress(1)
    finals = (states if model.latent is not None else states.clamp(-1, 1)).cpu()
    owners = torch.tensor(owner)
    return {s: finals[owners == s] for s in starts}
