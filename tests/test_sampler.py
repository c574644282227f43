import numpy as np
import pytest
import torch

from explorer.errors import ExplorerError
from explorer.likelihood import evenly_spaced_steps, proxy_curves, rollout_curves
from explorer.sampler import MAX_SEED, complete_from_steps, generate


def test_generation_is_seeded_and_records_every_step(tiny_model):
    first, again, other = (
        generate(tiny_model, 7, 20),
        generate(tiny_model, 7, 20),
        generate(tiny_model, 8, 20),
    )
    assert first.steps == 20 and first.xt.shape == (20, 1, 8, 8) and first.x0hat.shape == (20, 1, 8, 8)
    assert list(first.timesteps) == sorted(first.timesteps, reverse=True)
    assert torch.equal(first.final, again.final) and not torch.equal(first.final, other.final)
    # the last estimate is (up to the last step's small noise) the image itself
    assert (first.x0hat[-1] - first.final).abs().max() < 0.2


@pytest.mark.parametrize("seed", [-1, MAX_SEED + 1, 1.5, "7", True])
def test_bad_seeds_are_refused(tiny_model, seed):
    with pytest.raises(ExplorerError, match="seed"):
        generate(tiny_model, seed, 20)


@pytest.mark.parametrize("steps", [0, 9, 1001, 2.5])
def test_bad_step_counts_are_refused(tiny_model, steps):
    with pytest.raises(ExplorerError, match="sampler steps"):
        generate(tiny_model, 0, steps)


def test_completions_start_from_x_t(tiny_model):
    trajectory = generate(tiny_model, 3, 20)
    finals = complete_from_steps(tiny_model, trajectory, [19, 0, 10], completions=4, seed=1)
    assert finals.shape == (3, 4, 1, 8, 8)
    assert torch.equal(
        finals, complete_from_steps(tiny_model, trajectory, [19, 0, 10], completions=4, seed=1)
    )
    # from the last step only one small noise step remains: completions stay close to each other;
    # from pure noise they spread
    spread = finals.flatten(2).std(dim=1).mean(dim=1)
    assert spread[0] < spread[1]


def test_likelihood_curves_are_distributions(tiny_model, tiny_explorer):
    trajectory = generate(tiny_model, 5, 20)
    proxy = proxy_curves(tiny_explorer.classifier, trajectory)
    assert proxy.shape == (20, 10) and np.allclose(proxy.sum(1), 1, atol=1e-5)
    steps = evenly_spaced_steps(20, 10)
    assert steps[0] == 0 and steps[-1] == 19 and len(steps) == 10
    curves = rollout_curves(tiny_model, tiny_explorer.classifier, trajectory, steps, completions=16, seed=0)
    assert curves.probabilities.shape == (10, 10) and np.allclose(curves.probabilities.sum(1), 1, atol=1e-5)
