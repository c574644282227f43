"""The feature spec: everything that defines a feature vector (recorded in an index's meta.json), and the
timestep buckets and noise bank it implies (DESIGN section 1: eps_{t,r} seeded by (noise_seed, t, r), shared
by every training example and query)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from explorer.errors import ExplorerError


@dataclass(frozen=True)
class FeatureSpec:
    """Everything that defines a feature vector, recorded in the index metadata."""

    output: str = "mean"  # output function, see explorer.outputs; mean has the best LDS (docs/evaluation.md)
    buckets: int = 10  # timestep buckets over [0, T)
    timesteps_per_bucket: int = 1  # evenly spaced timesteps inside each bucket
    noise_draws: int = 1  # R noise draws per timestep
    noise_seed: int = 0  # seeds the shared noise bank
    projector: str = "countsketch"  # countsketch | gaussian | kronecker
    proj_dim: int = 512  # k; 512 beats 2048 on LDS (docs/evaluation.md)
    proj_seed: int = 0  # seeds the projector
    params: tuple[
        str, ...
    ] = ()  # parameter-name prefixes whose gradient is featurized; empty: all (select_params)
    # From precompute.featurize.calibration (both empty unless an index was built with --calibrate):
    exact_params: tuple[
        str, ...
    ] = ()  # parameter tensors kept as exact coordinates in front of the projection
    exact_layers: tuple[
        str, ...
    ] = ()  # kronecker only: layers whose per-example weight gradient is formed exactly
    precision: str = (
        "fp32"  # kronecker only: bf16 runs the forward and backward under bfloat16 autocast (PRECISIONS)
    )
    bf16_below: int = 0  # precision mixed only: timesteps t < bf16_below run in bf16, the rest in fp32
    # (calibration picks it)

    def __post_init__(self) -> None:  # metadata JSON gives lists
        for key in NAME_LIST_FIELDS:
            object.__setattr__(self, key, tuple(getattr(self, key)))

    def to_dict(self) -> dict:
        return {**asdict(self), **{key: list(getattr(self, key)) for key in NAME_LIST_FIELDS}}

    def check(self, num_train_timesteps: int) -> None:
        """Refuse a spec whose fields contradict each other, naming them and the fix."""
        from explorer.projector import PROJECTORS

        if self.projector not in PROJECTORS:
            raise ExplorerError(
                f"unknown spec.projector {self.projector!r}: use one of {', '.join(PROJECTORS)}",
                ("spec.projector",),
            )
        if self.precision not in PRECISIONS:
            raise ExplorerError(
                f"unknown spec.precision {self.precision!r}: use one of {', '.join(PRECISIONS)}",
                ("spec.precision",),
            )
        check_precision_projector(self)
        T = num_train_timesteps
        if self.precision == "mixed" and not 1 <= self.bf16_below <= T:
            raise ExplorerError(
                f"spec.precision mixed with spec.bf16_below {self.bf16_below}: calibrate it (which measures "
                f"where bf16 is safe) or give spec.bf16_below T with 1 <= T <= {T}",
                ("spec.precision", "spec.bf16_below", "calibrate"),
            )
        if self.precision != "mixed" and self.bf16_below:
            raise ExplorerError(
                f"spec.bf16_below {self.bf16_below} applies to spec.precision mixed only, "
                f"not {self.precision!r}",
                ("spec.bf16_below", "spec.precision"),
            )
        if self.exact_layers and self.projector != "kronecker":
            raise ExplorerError(
                f"exact_layers {list(self.exact_layers)} apply to the kronecker projector only, not "
                f"{self.projector!r}: calibrate without them (precompute.featurize.calibration.calibrate)"
            )


def check_precision_projector(spec: FeatureSpec) -> None:
    """Refuse a reduced precision on a projector other than kronecker (the vmap path is the exact fp32
    reference)."""
    if spec.precision != "fp32" and spec.projector != "kronecker":
        raise ExplorerError(
            f"spec.precision {spec.precision} applies to the kronecker projector only (the "
            f"{spec.projector!r} path is the exact fp32 reference): use spec.projector kronecker or "
            "spec.precision fp32",
            ("spec.precision", "spec.projector"),
        )


NAME_LIST_FIELDS = ("params", "exact_params", "exact_layers")
# Arithmetic of the kronecker path's forward and backward. bf16 (autocast: convolutions and matmuls in
# bfloat16,
# normalizations in float32; explorer.kronecker forms the blocks to match) runs the shipped model's forward +
# backward 1.7x faster on a CPU with AVX512-BF16 (1.37x end to end on bench/featurize_vs_traker.py), but its
# rounding, ~0.2-0.6% of each gradient's norm, exceeds the example-specific part of the gradient at high
# timesteps, where x_t is mostly the shared noise: at t = 950 the scores' agreement with exact ones falls from
# 0.995 to 0.62 (bench/precision_agreement.py). On a CPU without native bfloat16 it is emulated and slower.
# mixed runs the timesteps below spec.bf16_below in bf16, where its rounding is small next to what tells the
# stored
# bucket features apart (precompute.featurize.calibration measures that and picks bf16_below), and the rest
# in fp32.
PRECISIONS = ("fp32", "bf16", "mixed")


def select_params(names: list[str], prefixes: tuple[str, ...]) -> list[str]:
    """The parameter names under any of the prefixes (a prefix is a parameter or module name), in model
    order."""
    if not prefixes or tuple(prefixes) == ("all",):  # `--params all` says the default out loud
        return names
    unmatched = [prefix for prefix in prefixes if not any(_under(name, prefix) for name in names)]
    if unmatched == [LORA]:
        raise ExplorerError(
            f"spec.params {LORA} matches no parameter: the model has no LoRA adapter loaded; load one with "
            "--lora PATH (a pytorch_lora_weights.safetensors file or its folder, or a peft adapter folder)",
            ("spec.params",),
        )
    if unmatched:
        tops = sorted({name.split(".")[0] for name in names})
        raise ExplorerError(
            f"spec.params {' '.join(unmatched)} matches no parameter of this model: use module or parameter "
            f"names such as {', '.join(tops)} (or up_blocks.2, conv_out.weight; {LORA} for a LoRA adapter's)",
            ("spec.params",),
        )
    return [name for name in names if any(_under(name, prefix) for prefix in prefixes)]


# spec.params entry: the LoRA adapter's matrices (peft's lora_A / lora_B), D-TRAK's LoRA setting
LORA = "lora"


def _under(name: str, prefix: str) -> bool:
    if prefix == LORA:
        return ".lora_A." in name or ".lora_B." in name
    return name == prefix or name.startswith(prefix + ".")


def bucket_timesteps(spec: FeatureSpec, num_train_timesteps: int) -> list[list[int]]:
    """Bucket b covers [b T/B, (b+1) T/B); its timesteps are the centres of m equal sub-ranges."""
    if not 1 <= spec.buckets <= num_train_timesteps:
        raise ExplorerError(
            f"spec.buckets {spec.buckets} must be between 1 and {num_train_timesteps}", ("spec.buckets",)
        )
    width = num_train_timesteps / spec.buckets
    if spec.timesteps_per_bucket < 1 or spec.timesteps_per_bucket > width:
        raise ExplorerError(
            f"spec.timesteps_per_bucket {spec.timesteps_per_bucket} must be between 1 and {int(width)}",
            ("spec.timesteps_per_bucket",),
        )
    m = spec.timesteps_per_bucket
    return [[int(b * width + (j + 0.5) * width / m) for j in range(m)] for b in range(spec.buckets)]


def bucket_of_timestep(timestep: int, buckets: int, num_train_timesteps: int) -> int:
    """The bucket whose range holds a train timestep."""
    if not 0 <= timestep < num_train_timesteps:
        raise ExplorerError(f"timestep {timestep} is out of range: use 0 <= t < {num_train_timesteps}")
    return min(buckets - 1, timestep * buckets // num_train_timesteps)


def noise_bank(spec: FeatureSpec, timesteps: list[list[int]], shape: tuple[int, int, int]) -> torch.Tensor:
    """(buckets, m R, C, H, W): eps_{t,r} from a generator seeded by (noise_seed, t, r)."""
    bank = []
    for bucket in timesteps:
        draws = []
        for t in bucket:
            for r in range(spec.noise_draws):
                generator = torch.Generator().manual_seed((spec.noise_seed * 1000 + t) * 1000 + r)
                draws.append(torch.randn(shape, generator=generator))
        bank.append(torch.stack(draws))
    return torch.stack(bank)
