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

3. bf16 timesteps (precision mixed): for each timestep t of the spec, how far bfloat16 arithmetic
   for every timestep up to t moves the calibration images' bucket features, over how far they lie
   from their mean (the part of the gradient that tells examples apart); timesteps below the first
   one where that exceeds MAX_BF16_MOVE run in bf16. At high timesteps x_t is mostly the shared
   noise, so a bucket of that timestep alone has little such part and bf16's rounding swamps it
   (bench/precision_agreement.py); a bucket averaging many timesteps keeps the low timesteps'.

All choices go into the FeatureSpec (exact_params, exact_layers, bf16_below), so the index metadata
holds them and queries are featurized the same way.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from explorer.errors import ExplorerError
from explorer.features import FeatureComputer, FeatureSpec, check_precision_projector
from explorer.kronecker import layer_widths
from explorer.model import DiffusionModel

EXACT_LAYER_SHARE = 0.01  # a layer at least this heavy is not Kronecker-projected
# bf16 move / example-specific part of the bucket features up to which timesteps run in bf16. Measured
# (bench/precision_agreement.py, one timestep per bucket): 0.027-0.030 at t = 50 left the agreement with exact
# scores as in fp32; 0.063 at t = 550 (square, k = 2048) cost 0.001 of it, 0.172 (mean, k = 512) 0.0065;
# 1.2-3.5
# at t = 950 lost the attributions.
MAX_BF16_MOVE = 0.05


@dataclass
class Calibration:
    spec: FeatureSpec  # the input spec with exact_params and exact_layers filled in
    shares: dict[str, float]  # parameter name -> mean share of the squared gradient norm
    kept_share: float  # the share held by spec.exact_params
    kept_width: int  # their number of values (coordinates of phi)
    predicted_variance_ratio: (
        float  # (1 - kept share)^2 k / (k - kept width): the projection error left, vs. none kept
    )
    bf16_moves: dict[int, float] = dataclasses.field(
        default_factory=dict
    )  # precision mixed: t -> move (bf16_moves)

    def bf16_summary(self) -> str:
        if not self.bf16_moves:
            return ""
        moves = ", ".join(f"t={t} {move:.3f}" for t, move in sorted(self.bf16_moves.items()))
        chosen = (
            f"bf16 below t = {self.spec.bf16_below}"
            if self.spec.precision == "mixed"
            else "no timestep in bf16 (fp32)"
        )
        return (
            f"; {chosen} (bucket features' bf16 move / example-specific part with bf16 up to t, "
            f"limit {MAX_BF16_MOVE}: {moves})"
        )

    def summary(self) -> str:
        layers = f"; exact layers {', '.join(self.spec.exact_layers)}" if self.spec.exact_layers else ""
        return (
            f"calibration: {len(self.spec.exact_params)} tensors kept exactly ({self.kept_width} of "
            f"{self.spec.proj_dim} "
            f"coordinates, {self.kept_share:.1%} of the squared gradient norm; predicted projection variance "
            f"x{self.predicted_variance_ratio:.2f}){layers}{self.bf16_summary()}"
        )


def calibration_rows(count: int, size: int) -> np.ndarray:
    """`count` evenly spaced rows of a data set of `size` (a data set sorted by class still gives every
    class)."""
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
        grads = computer.exact_gradients(
            pairs[start : start + computer.chunk_size], buckets[start : start + computer.chunk_size]
        )
        squared = {
            name: grads[name].flatten(1).double().pow(2).sum(1) for name in computer.names
        }  # (c,) each
        norm = sum(squared.values()).clamp_min(torch.finfo(torch.float64).tiny)
        for name in computer.names:
            totals[name] += float((squared[name] / norm).sum())
    return {name: total / len(pairs) for name, total in totals.items()}


def choose_kept(shares: dict[str, float], sizes: dict[str, int], dim: int) -> list[str]:
    """The prefix of tensors by share / size that minimizes (1 - kept share)^2 / (dim - kept size)."""
    order = sorted(
        (name for name in shares if sizes[name] < dim), key=lambda name: -shares[name] / sizes[name]
    )
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
        if (
            isinstance(module, (nn.Conv2d, nn.Linear))
            and shares.get(f"{name}.weight", 0.0) >= EXACT_LAYER_SHARE
        ):
            d_out, d_in = module.weight.shape[0], module.weight[0].numel()
            if layer_widths(d_in, d_out, dim) != (d_in, d_out):
                layers.append(name)
    return layers


def bf16_moves(computer: FeatureComputer, images: torch.Tensor) -> dict[int, float]:
    """Timestep t -> how far bfloat16 moves the features an index stores when every timestep up to t runs
    in it.

    For each bucket that is the median over images of |phi_mixed - phi_fp32| / |phi_fp32 - mean phi_fp32|,
    phi the
    bucket's feature: the mean of its timesteps' features (every output function averages over its (t, r)
    columns,
    explorer.outputs), with the timesteps up to t taken in bf16 in phi_mixed. The move at t is the largest
    over buckets.
    With one timestep per bucket that is the largest single-timestep move up to t. On a bucket that
    averages many
    timesteps, a high timestep's bf16 rounding is measured against what tells the averaged features apart,
    which the
    low timesteps dominate: on the traker bench's 10-timestep bucket all ten together move it 0.038, while
    t = 950
    alone moves its own feature 1.7 (bench/precision_agreement.py).
    """
    buckets = []  # per bucket: its timesteps, fp32 and bf16 features per timestep, fp32 bucket feature, its
    # spread
    for bucket, timesteps in enumerate(computer.timesteps):
        exact = [computer.timestep_features(images, bucket, t, bf16=False) for t in timesteps]
        rounded = [computer.timestep_features(images, bucket, t, bf16=True) for t in timesteps]
        full = torch.stack(exact).mean(0)
        spread = (full - full.mean(0)).norm(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
        buckets.append((timesteps, exact, rounded, full, spread))
    moves = {}
    for t in sorted(u for timesteps, *_ in buckets for u in timesteps):
        moves[t] = 0.0
        for timesteps, exact, rounded, full, spread in buckets:
            if timesteps[0] <= t:
                mixed = torch.stack(
                    [low if u <= t else high for u, high, low in zip(timesteps, exact, rounded)]
                ).mean(0)
                moves[t] = max(moves[t], float(((mixed - full).norm(dim=1) / spread).median()))
    return moves


def choose_bf16_below(moves: dict[int, float]) -> int:
    """The first timestep (ascending) whose bf16 move exceeds MAX_BF16_MOVE, or one past the last: every
    timestep
    below it runs in bf16. 0 when even the lowest fails."""
    ascending = sorted(moves)
    for t in ascending:
        if moves[t] > MAX_BF16_MOVE:
            return 0 if t == ascending[0] else t
    return ascending[-1] + 1


def calibrate(
    model: DiffusionModel, spec: FeatureSpec, images: torch.Tensor, chunk_size: int = 64
) -> Calibration:
    """images (n, C, H, W) in [-1, 1], a few training images -> the spec with its exact parts chosen, and with
    precision mixed its bf16 timesteps (unless spec.bf16_below is given)."""
    check_precision_projector(spec)  # before the exact pass, which runs on countsketch in fp32
    if len(images) < 2 and spec.precision == "mixed" and not spec.bf16_below:
        raise ExplorerError(
            f"--calibrate {len(images)}: choosing the bf16 timesteps of --precision mixed compares "
            "examples with each other, so calibrate on at least 2 images, e.g. --calibrate 16"
        )
    plain = dataclasses.replace(spec, exact_params=(), exact_layers=())
    exact = dataclasses.replace(plain, projector="countsketch", precision="fp32", bf16_below=0)
    computer = FeatureComputer(model, exact, chunk_size=chunk_size)
    shares = gradient_shares(computer, images)
    sizes = {name: computer.params[name].numel() for name in computer.names}
    kept = choose_kept(shares, sizes, spec.proj_dim)
    layers = choose_exact_layers(model.unet, shares, spec.proj_dim) if spec.projector == "kronecker" else []
    order = {name: index for index, name in enumerate(computer.names)}
    kept.sort(key=order.__getitem__)
    kept_share, kept_width = sum(shares[name] for name in kept), sum(sizes[name] for name in kept)
    ratio = (1 - kept_share) ** 2 * spec.proj_dim / (spec.proj_dim - kept_width)
    chosen = dataclasses.replace(plain, exact_params=tuple(kept), exact_layers=tuple(layers))
    moves = {}
    if spec.precision == "mixed" and not spec.bf16_below:  # measured with the calibrated projection itself
        measuring = FeatureComputer(
            model, dataclasses.replace(chosen, precision="fp32", bf16_below=0), chunk_size=chunk_size
        )
        moves = bf16_moves(measuring, images)
        below = choose_bf16_below(moves)
        chosen = (
            dataclasses.replace(chosen, bf16_below=below)
            if below
            else dataclasses.replace(chosen, precision="fp32", bf16_below=0)
        )
    return Calibration(chosen, shares, kept_share, kept_width, ratio, moves)
