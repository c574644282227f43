"""Feature-likelihood curves p(class | x_t) along a trajectory (Journey-TRAK section 3.1).

Two estimates per recorded step:
- rollout: run the stochastic sampler from x_t to the end M times (seeded) and average the
  classifier's probabilities over the M completions: an estimate of p(feature | x_t);
- proxy: classify the one-step estimate x0hat^(t) alone (cheap, available at every step).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from explorer.errors import ExplorerError
from explorer.model import DiffusionModel
from explorer.sampler import Trajectory, complete_from_steps


class FeatureScorer(Protocol):
    """What the curves need of a scorer: a FeatureClassifier (explorer.classifier) or ClipConcepts."""

    class_names: list[str]

    def probabilities(self, images: torch.Tensor) -> torch.Tensor: ...


@dataclass
class RolloutCurves:
    steps: np.ndarray  # (n,) trajectory step indices the rollouts started from
    probabilities: np.ndarray  # (n, classes) mean classifier probability over the completions
    completions: int  # M per step
    # (n, classes) standard error of that mean over the M completions (None where it was not kept)
    stderr: np.ndarray | None = None


def proxy_curves(classifier: FeatureScorer, trajectory: Trajectory) -> np.ndarray:
    """(S, classes): classifier probabilities of x0hat (as a picture) at every step."""
    return classifier.probabilities(trajectory.pictures[1]).numpy()


def evenly_spaced_steps(total_steps: int, count: int) -> list[int]:
    """`count` step indices spread over 0..total_steps-1, both ends included."""
    if count < 2:
        raise ExplorerError(f"rollout step count {count} must be >= 2")
    return sorted(set(np.linspace(0, total_steps - 1, min(count, total_steps)).round().astype(int).tolist()))


def rollout_curves(
    model: DiffusionModel,
    classifier: FeatureScorer,
    trajectory: Trajectory,
    steps: list[int],
    completions: int = 16,
    seed: int = 0,
    on_step=None,
) -> RolloutCurves:
    """p(class | x_t) from `completions` seeded stochastic completions at each of `steps` (on_step: see
    explorer.sampler.complete_from_steps)."""
    if completions < 1:
        raise ExplorerError(f"completions {completions} must be >= 1")
    finals = complete_from_steps(
        model, trajectory, steps, completions, seed=seed, on_step=on_step
    )  # (n, M, C, H, W)
    n, m = finals.shape[:2]
    pictures = model.to_images(finals.flatten(0, 1))  # a latent model's completions decoded
    each = classifier.probabilities(pictures).view(n, m, -1)  # (n, M, classes)
    stderr = each.std(1, unbiased=False).numpy() / np.sqrt(m)
    return RolloutCurves(np.asarray(steps), each.mean(1).numpy(), completions, stderr)
