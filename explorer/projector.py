"""Seeded random projections of per-example gradients, d parameters -> k dimensions.

Both are rebuilt from (seed, parameter shapes) alone and are never stored (as in TRAK). The third
kind, `kronecker`, projects layer by layer without forming the gradients (explorer.kronecker).

- CountSketchProjector: each parameter j goes to one hashed output h(j) with a random sign s(j):
  phi[h(j)] += s(j) g[j]. One pass over the gradient (index_add_), ~1-3 ms per example for 1M
  parameters; E[<Px, Py>] = <x, y>.
- GaussianProjector: dense P with N(0, 1/k) entries (what TRAK uses on CPU), generated block by
  block from the seed so it never has to fit in memory at once; costly for big models.
- PartlyExactProjector: a few small parameter tensors that carry much of the gradient norm are kept
  as exact coordinates and only the rest goes through one of the above (precompute.featurize.calibration picks
  them). The estimate of <x, y> stays unbiased and its variance shrinks with the squared norm that
  no longer goes through the random projection.
"""

from __future__ import annotations

import math

import torch

from explorer.errors import ExplorerError

PROJECTORS = (
    "countsketch",
    "gaussian",
    "kronecker",
)  # every FeatureSpec.projector; kronecker lives in explorer.kronecker
GAUSSIAN_BLOCK = 65_536  # parameters per generated block of the dense projection
GAUSSIAN_CACHE_BYTES = 1 << 30  # keep the dense matrix in memory when it is at most this big


class CountSketchProjector:
    def __init__(self, num_params: int, dim: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        self.num_params, self.dim, self.seed = num_params, dim, seed
        self.buckets = torch.randint(0, dim, (num_params,), generator=generator)  # h(j)
        self.signs = torch.randint(0, 2, (num_params,), generator=generator).float() * 2 - 1  # s(j)

    def project(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """grads: per-parameter tensors (B, *shape), in a fixed order -> (B, k)."""
        batch, device = grads[0].shape[0], grads[0].device
        if self.buckets.device != device:  # the hash moves to the gradients' device once
            self.buckets, self.signs = self.buckets.to(device), self.signs.to(device)
        out = torch.zeros(batch, self.dim, dtype=torch.float32, device=device)
        offset = 0
        for grad in grads:
            flat = grad.reshape(batch, -1)  # (B, d_p)
            width = flat.shape[1]
            out.index_add_(
                1, self.buckets[offset : offset + width], flat * self.signs[offset : offset + width]
            )
            offset += width
        return out


class GaussianProjector:
    def __init__(self, num_params: int, dim: int, seed: int):
        self.num_params, self.dim, self.seed = num_params, dim, seed
        self.scale = 1.0 / math.sqrt(dim)
        self._cache: list[torch.Tensor] | None = None
        if num_params * dim * 4 <= GAUSSIAN_CACHE_BYTES:
            self._cache = [self._block(i) for i in range(self._num_blocks())]

    def _num_blocks(self) -> int:
        return math.ceil(self.num_params / GAUSSIAN_BLOCK)

    def _block(self, index: int) -> torch.Tensor:
        rows = min(GAUSSIAN_BLOCK, self.num_params - index * GAUSSIAN_BLOCK)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        return torch.randn(rows, self.dim, generator=generator) * self.scale  # (rows, k)

    def project(self, grads: list[torch.Tensor]) -> torch.Tensor:
        batch = grads[0].shape[0]
        flat = torch.cat([g.reshape(batch, -1) for g in grads], dim=1)  # (B, d)
        out = torch.zeros(batch, self.dim, dtype=torch.float32, device=flat.device)
        for index in range(self._num_blocks()):
            block = (self._cache[index] if self._cache is not None else self._block(index)).to(flat.device)
            start = index * GAUSSIAN_BLOCK
            out += flat[:, start : start + block.shape[0]] @ block
        return out


class PartlyExactProjector:
    """phi = [the kept tensors, flattened, in order | inner.project(the other tensors)]."""

    def __init__(self, kept: list[bool], inner: CountSketchProjector | GaussianProjector):
        self.kept, self.inner = kept, inner

    def project(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """grads: per-parameter tensors (B, *shape), in the order of `kept` -> (B, kept width + inner.dim)."""
        batch = grads[0].shape[0]
        exact = [grad.reshape(batch, -1) for grad, kept in zip(grads, self.kept) if kept]
        rest = [grad for grad, kept in zip(grads, self.kept) if not kept]
        return torch.cat([*exact, self.inner.project(rest)], dim=1)


def kept_mask(
    names: list[str], widths: dict[str, int], kept: tuple[str, ...], dim: int
) -> tuple[list[bool], int]:
    """For PartlyExactProjector: which of `names` are kept, and their width; refuses names outside `names`
    and a kept width that leaves nothing of `dim` for the projection."""
    unknown = [name for name in kept if name not in widths]
    if unknown:
        raise ExplorerError(
            f"exact_params {unknown} are not featurized parameters of this model: the spec was "
            "calibrated for another model or parameter set; calibrate again",
            ("calibrate",),
        )
    mask = [name in kept for name in names]
    width = sum(widths[name] for name, keep in zip(names, mask) if keep)
    if width >= dim:
        raise ExplorerError(
            f"exact_params hold {width} values, which leaves nothing of proj_dim {dim} for the "
            "projection: keep fewer tensors or raise spec.proj_dim",
            ("spec.proj_dim",),
        )
    return mask, width


def make_projector(
    kind: str, num_params: int, dim: int, seed: int
) -> CountSketchProjector | GaussianProjector:
    if dim < 1:
        raise ExplorerError(f"spec.proj_dim {dim} must be >= 1, e.g. 2048", ("spec.proj_dim",))
    if kind == "countsketch":
        return CountSketchProjector(num_params, dim, seed)
    if kind == "gaussian":
        return GaussianProjector(num_params, dim, seed)
    raise ExplorerError(f"unknown projector {kind!r}: use countsketch or gaussian")
