"""DDPM's forward process, written once: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (DDPM eq. 4), and the
noise that joins a given x_t to a given x0 (the same equation solved for eps)."""

from __future__ import annotations

import torch


def forward_noise(x0: torch.Tensor, eps: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """x_t from x0 and eps; abar is alphas_cumprod[t] shaped to broadcast against both (e.g. (B, 1, 1, 1))."""
    return abar.sqrt() * x0 + (1 - abar).sqrt() * eps


def joining_noise(xt: torch.Tensor, x0: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """eps* = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t): the noise that takes x0 to x_t at abar_t."""
    return (xt - abar.sqrt() * x0) / (1 - abar).sqrt()
