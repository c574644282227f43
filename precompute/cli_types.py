"""argparse types of the precompute CLI: each refuses a bad value with a message that names it."""

from __future__ import annotations

import argparse
import math


def int_at_least(minimum: int):
    """An argparse type: an integer >= minimum, with a message naming the bad value."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} must be >= {minimum}")
        return value

    return parse


positive_int, non_negative_int = int_at_least(1), int_at_least(0)


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{value} must be a finite number > 0")
    return value


def lambda_rule(text: str) -> float | None:
    """--lambda: `gcv` (None) or a number > 0, relative to the mean eigenvalue of Phi^T Phi."""
    if text.strip().lower() == "gcv":
        return None
    try:
        return positive_float(text)
    except argparse.ArgumentTypeError as error:
        raise argparse.ArgumentTypeError(f"{error}: use a number > 0 such as 0.01, or gcv") from None


# The engine names what it refuses by field (ExplorerError.fields); the CLI says which of its flags sets each.
FLAG_OF_FIELD = {
    "spec.output": "--output",
    "spec.buckets": "--buckets",
    "spec.timesteps_per_bucket": "--timesteps-per-bucket",
    "spec.projector": "--projector",
    "spec.proj_dim": "--proj-dim",
    "spec.params": "--params",
    "spec.precision": "--precision",
    "spec.bf16_below": "--bf16-below",
    "calibrate": "--calibrate N",
    "relative_lambda": "--lambda",
    "ivf_nlist": "--ivf-nlist",
    "ivf_nprobe": "--ivf-nprobe",
}


def flag_hint(error: Exception) -> str:
    """ " (flags: --x, --y)" for the fields an ExplorerError names, or ""."""
    flags = [FLAG_OF_FIELD[field] for field in getattr(error, "fields", ()) if field in FLAG_OF_FIELD]
    return f" (flags: {', '.join(flags)})" if flags else ""
