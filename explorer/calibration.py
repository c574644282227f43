"""Calibrated projections: which parameter tensors and layers to take exactly, from a few gradients.

A random projection to k dimensions estimates <x, y> with an error whose variance grows like
||x||^2 ||y||^2 / k (for count-sketch and Gaussian alike), so it is paid where the gradient norm
is. On the shipped model that norm is concentrated: conv_out's weight (288 values) holds ~46% of
the squared norm of D-TRAK's square output, the last ResNet's conv2 another 21%
(bench/featurize_vs_traker.py's images). Two uses of that, both measured on a few training images:

1. kept tensors (every projector): tensors sorted by share / size; the kept prefix minimizes the
   predicted relative variance of what is still projected, (1 - kept share)^2 / (k - kept size),
   and is stored as exact coordinates in front of the projection (PartlyExactProjector).
2. exact layers (kronecker only): Conv2d/Linear layers whose weight holds at least
   EXACT_LAYER_SHARE of the squared norm form their per-example gradient exactly instead of
   Kronecker-projecting it (on the shipped model: the 16x16 layers of 32 channels, where the
   exact block costs ~3x the projected one, 3.4 against 1.0-1.1 ms per 80 rows).

Both choices go into the FeatureSpec (exact_params, exact_layers), so the index metadata holds
them and queries are featurized the same way.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from explorer.errors import ExplorerError
from explorer.features import FeatureComputer, FeatureSpec
from explorer.kronecker import layer_widths
from explorer.model import DiffusionModel

EXACT_LAYER_SHARE = 0.01  # a layer at least this heavy is not Kronecker-projected


@dataclass
class Calibration:
    spec: FeatureSpec  # the input spec with exact_params and exact_layers filled in
    shares: dict[str, float]  # parameter name -> mean share of the squared gradient norm
    kept_share: float  # the share held by spec.exact_params
    kept_width: int  # their number of values (coordinates of phi)
    predicted_variance_ratio: float  # (1 - kept share)^2 k / (k - kept width): the projection error left, vs. none kept

    def summary(self) -> str:
        layers = f"; exact layers {', '.join(self.spec.exact_layers)}" if self.spec.exact_layers else ""
        return (f"calibration: {len(self.spec.exact_params)} tensors kept exactly ({self.kept_width} of {self.spec.proj_dim} "
                f"coordinates, {self.kept_share:.1%} of the squared gradient norm; predicted projection variance "
                f"x{self.predicted_variance_ratio:.2f}){layers}")


def calibration_rows(count: int, size: int) -> np.ndarray:
    """`count` evenly spaced rows of a data set of `size` (a data set sorted by class still gives every class)."""
    if count < 1:
        raise ExplorerError(f"--calibrate {count}: use at least 1 image, e.g. --calibrate 16")
    return np.unique(np.linspace(0, size - 1, min(count, size)).round().astype(int))


def gradient_shares(computer: FeatureComputer, images: torch.Tensor) -> dict[str, float]:
    """Mean over (image, bucket) pairs of each parameter tensor's share of the squared gradient norm."""
    nb = computer.spec.buckets
    pairs = images.repeat_interleave(nb, dim=0)
    buckets = torch.arange(nb).repeat(len(images))
    totals = dict.fromkeys(computer.names, 0.0)
    for start in range(0, len(pairs), computer.chunk_size):
        grads = computer.exact_gradients(pairs[start : start + computer.chunk_size], buckets[start : start + computer.chunk_size])
        squared = {name: grads[name].flatten(1).double().pow(2).sum(1) for name in computer.names}  # (c,) each
        norm = sum(squared.values()).clamp_min(torch.finfo(torch.float64).tiny)
        for name in computer.names:
            totals[name] += float((squared[name] / norm).sum())
    return {name: total / len(pairs) for name, total in totals.items()}


def choose_kept(shares: dict[str, float], sizes: dict[str, int], dim: int) -> list[str]:
    """The prefix of tensors by share / size that minimizes (1 - kept share)^2 / (dim - kept size)."""
    order = sorted((name for name in shares if sizes[name] < dim), key=lambda name: -shares[name] / sizes[name])
    best, best_cost, share, width = 0, 1.0 / dim, 0.0, 0
    for count, name in enumerate(order, start=1):
        share, width = share + shares[name], width + sizes[name]
        if width >= dim:
            break
        cost = (1 - share) ** 2 / (dim - width)
        if cost < best_cost:
            best, best_cost = count, cost
    return order[:best]


def choose_exact_layers(model: nn.Module, shares: dict[str, float], dim: int) -> list[str]:
    """Conv2d/Linear layers with a weight share >= EXACT_LAYER_SHARE that layer_widths would project."""
    layers = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)) and shares.get(f"{name}.weight", 0.0) >= EXACT_LAYER_SHARE:
            d_out, d_in = module.weight.shape[0], module.weight[0].numel()
            if layer_widths(d_in, d_out, dim) != (d_in, d_out):
                layers.append(name)
    return layers


def calibrate(model: DiffusionModel, spec: FeatureSpec, images: torch.Tensor, chunk_size: int = 64) -> Calibration:
    """images (n, C, H, W) in [-1, 1], a few training images -> the spec with its exact parts chosen."""
    plain = dataclasses.replace(spec, exact_params=(), exact_layers=())
    computer = FeatureComputer(model, dataclasses.replace(plain, projector="countsketch", precision="fp32"),  # exact
                               chunk_size=chunk_size)
    shares = gradient_shares(computer, images)
    sizes = {name: computer.params[name].numel() for name in computer.names}
    kept = choose_kept(shares, sizes, spec.proj_dim)
    layers = choose_exact_layers(model.unet, shares, spec.proj_dim) if spec.projector == "kronecker" else []
    order = {name: index for index, name in enumerate(computer.names)}
    kept.sort(key=order.__getitem__)
    kept_share, kept_width = sum(shares[name] for name in kept), sum(sizes[name] for name in kept)
    ratio = (1 - kept_share) ** 2 * spec.proj_dim / (spec.proj_dim - kept_width)
    return Calibration(dataclasses.replace(plain, exact_params=tuple(kept), exact_layers=tuple(layers)), shares,
                       kept_share, kept_width, ratio)
