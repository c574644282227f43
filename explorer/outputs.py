"""Output functions f(theta; x0, t, eps) whose gradients become attribution features.

Each takes the UNet's noise prediction and the true noise for one example at its n (timestep,
noise draw) pairs, both (n, C, H, W), and returns a scalar: the average over the n pairs.

| name   | f                              | from                      |
| loss   | mean (eps_theta - eps)^2       | TRAK / Journey-TRAK       |
| square | mean eps_theta^2               | D-TRAK (L_square)         |
| mean   | mean eps_theta                 | D-TRAK (L_avg), DAS       |
| l1     | ||eps_theta||_1 per draw, mean | D-TRAK (L1-norm)          |
| l2     | ||eps_theta||_2 per draw, mean | D-TRAK (L2-norm)          |
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

from explorer.errors import ExplorerError

OutputName = Literal["loss", "square", "mean", "l1", "l2"]
OutputFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def loss_output(prediction: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return (prediction - noise).pow(2).mean()


def square_output(prediction: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return prediction.pow(2).mean()


def mean_output(prediction: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return prediction.mean()


def l1_output(prediction: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return prediction.flatten(1).abs().sum(1).mean()


def l2_output(prediction: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return prediction.flatten(1).norm(dim=1).mean()


OUTPUT_FUNCTIONS: dict[str, OutputFunction] = {
    "loss": loss_output,
    "square": square_output,
    "mean": mean_output,
    "l1": l1_output,
    "l2": l2_output,
}


def get_output_function(name: str) -> OutputFunction:
    try:
        return OUTPUT_FUNCTIONS[name]
    except KeyError:
        raise ExplorerError(
            f"unknown output function {name!r}: use one of {', '.join(OUTPUT_FUNCTIONS)}"
        ) from None


def region_output(output: OutputFunction, mask: torch.Tensor) -> OutputFunction:
    """`output` restricted to the pixels where mask (H, W) is 1: prediction and noise outside the region are
    zeroed and the result rescaled to the region's area, so a mean over pixels becomes a mean over the region.
    Query-side only (region attribution): training features stay whole-image."""
    weights = mask.to(torch.float32)
    scale = float(weights.numel() / weights.sum())

    def restricted(prediction: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return scale * output(prediction * weights, noise * weights)

    return restricted
