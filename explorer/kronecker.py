"""LoGra-style Kronecker projection of per-example gradients, never materializing them.

For a Conv2d or Linear layer, let a_p be the unfolded input patch (d_in = C_in kh kw) and g_p the
gradient of the output function w.r.t. the layer output (d_out = C_out) at position p. The
per-example weight gradient is G = sum_p g_p a_p^T (d_out x d_in). With seeded Gaussian
P_in (k_in x d_in) and P_out (k_out x d_out), N(0, 1/k) entries,

    phi_layer = P_out G P_in^T = sum_p (P_out g_p)(P_in a_p)^T          (k_out x k_in)

so only projected activations and output gradients are formed: P_in a_p at every p is a
convolution with P_in as its kernel (no im2col), P_out g_p a 1x1 convolution, and the sum over
positions one batched matmul. Since E[P^T P] = I, E[<phi_layer(x), phi_layer(y)>] = <G_x, G_y>.
The input side is projected to k_in = 16, the output side to ceil(dim / 16); a side narrower than
its k is not projected, and a weight with at most `dim` entries not at all (P = I: exact; see
layer_widths).
(LoGra: Choe et al. 2024, "What is your data worth to GPT?", section 3.)

Biases (gradient sum_p g_p) and GroupNorm affine parameters (weight gradient sum_p g_p * x_hat_p)
are taken exactly. Every example's blocks and small gradients, in parameter order, are
count-sketched together down to exactly `dim` dimensions, which keeps E[<phi(x), phi(y)>] =
<grad_x, grad_y> over all parameters. A calibrated spec (precompute.featurize.calibration) keeps a few small,
heavy tensors out of the sketch as exact coordinates and forms the weight gradients of the heaviest
layers exactly (P = I on both sides), which removes most of the projection error where the
gradient norm is.

The a's come from forward hooks; the g's from one batched backward through the frozen model, in which a
hook on each layer output forms that layer's blocks as soon as its gradient exists (backward_blocks), so
no weight-gradient GEMM runs and no output gradient outlives its layer. Under bfloat16 autocast
(FeatureSpec.precision) the products run in bfloat16 and the sums in float32. Rows of the batch
are grouped: rows [i n, (i + 1) n) belong to example i, and its feature sums their contributions.
This is exact only when rows do not interact (GroupNorm is per sample; no BatchNorm).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from explorer.errors import ExplorerError
from explorer.layer_gradients import (
    conv_weight_gradients,
    graph_leaves,
    group_norm_weight_gradients,
    grouped_sum,
    is_plain_conv,
    unfold,
)
from explorer.projector import CountSketchProjector, PartlyExactProjector, kept_mask

SEED_STRIDE = 100_003  # (seed, layer) -> generator seed; more layers than this would collide
INPUT_SIDE_WIDTH = 16  # k_in of a projected layer; see layer_widths


def layer_widths(d_in: int, d_out: int, dim: int) -> tuple[int, int]:
    """(k_in, k_out) of one layer's block for a final dimension `dim`.

    A weight with at most `dim` entries is kept exactly (k = d on both sides): on the shipped model
    that is conv_out, 1 x 288 entries but 30-50% of the squared gradient norm. Otherwise the input
    side is projected to k_in = 16 and the output side to ceil(dim / k_in), or kept when narrower.
    The input side is the expensive one: P_in a is a convolution whose cost grows with k_in times
    d_in = C_in kh kw, while P_out g only mixes C_out channels. On the shipped model at k = 2048 this
    cuts the projection from 3.8 to 1.8 ms per row (bench/featurize_profile.py) against the square
    rule k_in = k_out = sqrt(dim), at the same Spearman agreement with exact scores (0.982 inner
    product, 0.983 TRAK, against 0.982 and 0.985; scored as bench/projection_agreement.py does, on
    its default subsample, median of 3 seeds).
    """
    if d_in * d_out <= dim:
        return d_in, d_out
    k_in = min(d_in, INPUT_SIDE_WIDTH)
    return k_in, min(d_out, -(-dim // k_in))


@dataclass
class Record:
    """One call of a hooked module: its input (the a's) and its output (a graph node for the g's)."""

    module: nn.Module
    name: str  # the module's name in the model
    inputs: torch.Tensor
    output: torch.Tensor


def _gaussian(rows: int, cols: int, seed: int) -> torch.Tensor:
    """(rows, cols) with N(0, 1/rows) entries, or the identity when rows >= cols (no projection needed)."""
    if rows >= cols:
        return torch.eye(cols)
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=generator) / math.sqrt(rows)


class KroneckerProjector:
    """Projected per-example gradients of a model from one batched forward and backward."""

    def __init__(
        self,
        model: nn.Module,
        dim: int,
        seed: int,
        kept_params: tuple[str, ...] = (),
        exact_layers: tuple[str, ...] = (),
        params: list[str] | None = None,
    ):
        """kept_params: parameter tensors kept as exact coordinates in front of the sketch
        (PartlyExactProjector);
        exact_layers: Conv2d/Linear layers whose per-example weight gradient is formed exactly, not projected
        (both from precompute.featurize.calibration); params: the parameters phi covers (default all).
        Only their layers are
        hooked, so the backward stops below the lowest of them."""
        if dim < 1:
            raise ExplorerError(f"spec.proj_dim {dim} must be >= 1, e.g. 2048", ("spec.proj_dim",))
        self.model, self.dim, self.seed = model, dim, seed
        self.names = (
            [name for name, _ in model.named_parameters()] if params is None else list(params)
        )  # sketch order
        covered = {name.rpartition(".")[0] for name in self.names}
        self.modules: dict[str, nn.Module] = {}
        for name, module in model.named_modules():
            if next(module.parameters(recurse=False), None) is None or name not in covered:
                continue
            self._check_supported(name, module)
            self.modules[name] = module
        wrong = [
            name for name in exact_layers if not isinstance(self.modules.get(name), (nn.Conv2d, nn.Linear))
        ]
        if wrong:
            raise ExplorerError(
                f"exact_layers {wrong} are not Conv2d or Linear layers of this model: the spec was "
                "calibrated for another model; calibrate again",
                ("calibrate",),
            )
        self._name_of = {module: name for name, module in self.modules.items()}
        # a kept weight needs its exact block; kept biases and norm parameters are exact anyway
        exact = set(exact_layers) | {
            name.rpartition(".")[0] for name in kept_params if name.endswith(".weight")
        }
        self.proj_device = torch.device("cpu")  # where the matrices live (moved to the model's on use)
        self.proj_in: dict[str, torch.Tensor] = {}  # module name -> P_in (k_in, d_in)
        self.proj_out: dict[str, torch.Tensor] = {}  # module name -> P_out (k_out, d_out)
        for layer, (name, module) in enumerate(self.modules.items()):
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                d_out, d_in = module.weight.shape[0], module.weight[0].numel()
                k_in, k_out = (d_in, d_out) if name in exact else layer_widths(d_in, d_out, dim)
                self.proj_in[name] = _gaussian(k_in, d_in, (seed * SEED_STRIDE + layer) * 2)
                self.proj_out[name] = _gaussian(k_out, d_out, (seed * SEED_STRIDE + layer) * 2 + 1)
        shapes = dict(model.named_parameters())
        self.widths = {name: self._width(name, shapes[name]) for name in self.names}
        kept, kept_width = kept_mask(self.names, self.widths, kept_params, dim)
        sketch = CountSketchProjector(
            sum(self.widths.values()) - kept_width,
            dim - kept_width,
            seed=(seed * SEED_STRIDE + SEED_STRIDE - 1) * 2,
        )
        self.sketch = PartlyExactProjector(kept, sketch) if kept_width else sketch

    @staticmethod
    def _check_supported(name: str, module: nn.Module) -> None:
        if isinstance(module, nn.Conv2d):
            if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str):
                raise ExplorerError(
                    f"layer {name!r} is a grouped, non-zero-padded or 'same'-padded Conv2d, which the "
                    "kronecker projector does not handle: use spec.projector countsketch",
                    ("spec.projector",),
                )
        elif not isinstance(module, (nn.Linear, nn.GroupNorm)):
            raise ExplorerError(
                f"layer {name!r} ({type(module).__name__}) holds parameters the kronecker projector cannot "
                "cover (it handles Conv2d, Linear and GroupNorm): use spec.projector countsketch",
                ("spec.projector",),
            )

    def _width(self, name: str, param: torch.Tensor) -> int:
        module_name, _, kind = name.rpartition(".")
        if kind == "weight" and module_name in self.proj_in:
            return self.proj_out[module_name].shape[0] * self.proj_in[module_name].shape[0]
        return param.numel()

    # 1. forward with hooks: the a's, and the layer outputs as graph nodes
    def capture(self, forward: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, list[Record]]:
        """Run `forward` (a batched model call) and record every hooked module call."""
        records: list[Record] = []

        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if not output.requires_grad:  # a frozen layer on a constant input: make its output a leaf
                output.requires_grad_(True)
            records.append(Record(module, self._name_of[module], args[0].detach(), output))

        handles = [module.register_forward_hook(hook) for module in self.modules.values()]
        try:
            with torch.enable_grad():
                result = forward()
        finally:
            for handle in handles:
                handle.remove()
        return result, records

    # 2. one backward, only w.r.t. the layer outputs
    @staticmethod
    def output_gradients(total: torch.Tensor, records: list[Record]) -> list[torch.Tensor]:
        """d total / d output of every record; total = sum over examples of f_i (rows do not interact)."""
        return list(
            torch.autograd.grad(total, [r.output for r in records], allow_unused=True, materialize_grads=True)
        )

    # 3. per-example blocks: Kronecker-projected weight gradients and exact small gradients
    def blocks(
        self, records: list[Record], grads: list[torch.Tensor], groups: int
    ) -> dict[str, torch.Tensor]:
        """Parameter name -> (groups, k_out, k_in) for Conv2d/Linear weights, (groups, *shape) for the rest,
        from the output gradients of every record (output_gradients)."""
        out: dict[str, torch.Tensor] = {}
        for record, g in zip(records, grads):
            self._add_record_blocks(
                out, record.module, record.name, record.inputs, record.output.detach(), g, groups
            )
        return self._fill_unused(out, groups)

    # 2 + 3 in one pass: each record's blocks from inside the backward
    def backward_blocks(
        self, total: torch.Tensor, records: list[Record], groups: int
    ) -> dict[str, torch.Tensor]:
        """What blocks(records, output_gradients(total, records), groups) returns, with each record's
        blocks formed by a
        hook the moment the backward reaches its output, while that gradient is still in cache, and the
        gradient
        freed right after, instead of ~70 of them held until the backward ends (with the per-example
        convolution
        backward of conv_weight_gradients, 0.93x the time per chunk on the traker bench's spec;
        docs/benchmarks/featurize_profile.md,
        "Calibrated projections").

        The backward is asked for the gradients of the graph's leaves (the hooked outputs made leaves by
        capture,
        and any parameter or input that requires grad), which sends it through every node between `total` and
        them, so every record output that `total` depends on is reached."""
        out: dict[str, torch.Tensor] = {}
        handles = []
        for record in records:

            def hook(
                g: torch.Tensor,
                module=record.module,
                name=record.name,
                a=record.inputs,
                y=record.output.detach(),  # noqa: B008 (bound once per hook, as intended)
            ) -> None:  # defaults, not the record: no cycle through the output
                self._add_record_blocks(out, module, name, a, y, g, groups)

            handles.append(record.output.register_hook(hook))
        try:
            leaves = graph_leaves(total)
            if leaves:
                torch.autograd.grad(total, leaves, allow_unused=True)
        finally:
            for handle in handles:
                handle.remove()
        return self._fill_unused(out, groups)

    def _add_record_blocks(
        self,
        out: dict[str, torch.Tensor],
        module: nn.Module,
        name: str,
        a: torch.Tensor,
        y: torch.Tensor,
        g: torch.Tensor,
        groups: int,
    ) -> None:
        """Adds one module call's blocks to out (a module called twice sums its calls); a its input, y its
        output,
        g the gradient w.r.t. y.

        Under bfloat16 autocast (FeatureSpec.precision bf16) a Conv2d/Linear output gradient g arrives in
        bfloat16;
        then its weight block's products run in bfloat16 too (fp32 accumulation inside the kernels, each row's
        block rounded once to bfloat16) and everything is summed over rows in float32."""

        def add(key: str, value: torch.Tensor) -> None:
            out[key] = out[key] + value if key in out else value

        if isinstance(module, nn.GroupNorm):  # autocast keeps normalizations in float32
            g_flat = g.float().flatten(2)
            if module.weight is not None:
                add(
                    f"{name}.weight",
                    grouped_sum(group_norm_weight_gradients(module, a.float(), y.float(), g_flat), groups),
                )
            if module.bias is not None:
                add(f"{name}.bias", grouped_sum(g_flat.sum(2), groups))
            return
        a = a.to(g.dtype)
        if self._exact(name) and is_plain_conv(module):
            weight, g_flat = (
                conv_weight_gradients(a, g, module, groups).float(),
                g.flatten(2),
            )  # (groups, d_out, d_in)
        else:
            a_proj, g_proj, g_flat = self._project_sides(
                name, module, a, g
            )  # (rows, k_in, L), (rows, k_out, L), (rows, d_out, L)
            # (P_out g)(P_in a)^T summed over positions, one product per row (regrouping the rows first would
            # copy both sides, which costs more than the bmm), then over the example's rows
            weight = grouped_sum(
                torch.bmm(g_proj, a_proj.transpose(1, 2)).float(), groups
            )  # (groups, k_out, k_in)
        add(f"{name}.weight", weight)
        if module.bias is not None:
            add(f"{name}.bias", grouped_sum(g_flat.sum(2, dtype=torch.float32), groups))

    def _fill_unused(self, out: dict[str, torch.Tensor], groups: int) -> dict[str, torch.Tensor]:
        for name in self.names:
            if name not in out:  # a parameter unused by this forward has a zero gradient
                out[name] = torch.zeros(groups, self.widths[name], device=self.proj_device)
        return out

    def _exact(self, name: str) -> bool:
        """Whether a Conv2d/Linear layer's block is its exact weight gradient (P = I on both sides)."""
        return (
            self.proj_in[name].shape[0] == self.proj_in[name].shape[1]
            and self.proj_out[name].shape[0] == self.proj_out[name].shape[1]
        )

    def _project_sides(self, name: str, module: nn.Module, a: torch.Tensor, g: torch.Tensor):
        """(P_in a, P_out g, g) at every output position, each (rows, width, L)."""
        if self.proj_in[name].device != a.device:  # the matrices move to the model's device once
            self.proj_in[name], self.proj_out[name] = (
                self.proj_in[name].to(a.device),
                self.proj_out[name].to(a.device),
            )
            self.proj_device = a.device
        p_in, p_out = self.proj_in[name].to(a.dtype), self.proj_out[name].to(a.dtype)
        if isinstance(module, nn.Conv2d):
            if (
                p_in.shape[0] == p_in.shape[1]
            ):  # P_in = I: the unfolded patches themselves (C_in kh kw order, as the weight)
                a_proj = unfold(a, module)  # (rows, d_in, L)
            else:
                kernel = p_in.view(
                    -1, *module.weight.shape[1:]
                )  # (k_in, C_in, kh, kw): P_in on unfolded patches
                a_proj = F.conv2d(a, kernel, None, module.stride, module.padding, module.dilation).flatten(
                    2
                )  # (rows, k_in, L)
            g_flat = g.flatten(2)  # (rows, C_out, L)
        else:
            a_flat = a.reshape(a.shape[0], -1, a.shape[-1]).transpose(1, 2)  # (rows, d_in, L)
            a_proj = (
                a_flat if p_in.shape[0] == p_in.shape[1] else torch.matmul(p_in, a_flat)
            )  # (rows, k_in, L)
            g_flat = g.reshape(g.shape[0], -1, g.shape[-1]).transpose(1, 2)  # (rows, d_out, L)
        g_proj = (
            g_flat if p_out.shape[0] == p_out.shape[1] else torch.matmul(p_out, g_flat)
        )  # (rows, k_out, L)
        return a_proj, g_proj, g_flat

    # 4. one vector per example
    def combine(self, blocks: dict[str, torch.Tensor]) -> torch.Tensor:
        """Blocks -> (groups, dim): a seeded count-sketch of their concatenation in parameter order."""
        return self.sketch.project([blocks[name] for name in self.names])

    def project(self, total: torch.Tensor, records: list[Record], groups: int) -> torch.Tensor:
        """Steps 2-4: (groups, dim) features from a captured forward and its summed output."""
        return self.combine(self.backward_blocks(total, records, groups))
