"""Per-example weight gradients of one layer from its inputs and output gradients, the building blocks of the
kronecker projector (explorer.kronecker): for a linear layer the gradient of example i is sum_rows g a^T over
its rows; convolutions unfold their input patches first (or, for large layers, take a grouped backward).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def grouped_sum(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(rows, *shape) -> (groups, *shape): the sum over each example's consecutive rows."""
    if x.shape[0] == groups:
        return x
    return x.reshape(groups, x.shape[0] // groups, *x.shape[1:]).sum(1)


def unfold(a: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """(rows, C_in kh kw, L): the input patches of every output position, in the weight's order.

    Built from kh kw strided slices of the padded input, which is several times faster than F.unfold
    (im2col) on CPU; a 1x1 convolution without stride needs no copy at all.
    """
    (kh, kw), (sh, sw), (dh, dw), (ph, pw) = conv.kernel_size, conv.stride, conv.dilation, conv.padding
    if (kh, kw, sh, sw, ph, pw) == (1, 1, 1, 1, 0, 0):
        return a.flatten(2)
    padded = F.pad(a, (pw, pw, ph, ph))
    out_h = (padded.shape[2] - dh * (kh - 1) - 1) // sh + 1
    out_w = (padded.shape[3] - dw * (kw - 1) - 1) // sw + 1
    slices = [
        padded[:, :, i * dh : i * dh + sh * (out_h - 1) + 1 : sh, j * dw : j * dw + sw * (out_w - 1) + 1 : sw]
        for i in range(kh)
        for j in range(kw)
    ]
    return (
        torch.stack(slices, dim=2).flatten(1, 2).flatten(2)
    )  # (rows, C_in, kh kw, Ho, Wo) -> (rows, C_in kh kw, L)


def group_norm_weight_gradients(
    norm: nn.GroupNorm, a: torch.Tensor, y: torch.Tensor, g: torch.Tensor
) -> torch.Tensor:
    """(rows, C): sum over positions of g x_hat, the per-row gradient of the GroupNorm's weight.

    x_hat comes back from the output y = w x_hat + b as (y - b) / w, which saves normalizing the input
    again; when some |w| is small next to its |b| that division loses precision, and the input is
    normalized again instead.
    """
    weight = norm.weight.detach()
    bias = norm.bias.detach() if norm.bias is not None else torch.zeros_like(weight)
    if bool(
        (weight.abs() >= 1e-3 * bias.abs().clamp_min(1.0)).all()
    ):  # vecdot: half the time of einsum's bmm of 1x1 products
        return (torch.linalg.vecdot(g, y.flatten(2), dim=2) - bias * g.sum(2)) / weight
    x_hat = F.group_norm(a, norm.num_groups, eps=norm.eps).flatten(2)  # (rows, C, L)
    return torch.linalg.vecdot(g, x_hat, dim=2)


def graph_leaves(total: torch.Tensor) -> list[torch.Tensor]:
    """The leaf tensors requiring grad that `total` depends on, found by walking its autograd graph."""
    if total.grad_fn is None:
        return [total] if total.requires_grad else []
    leaves, seen, stack = [], set(), [total.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # an AccumulateGrad node holds its leaf
        if variable is not None:
            leaves.append(variable)
        stack.extend(child for child, _ in node.next_functions)
    return leaves


def is_plain_conv(module: nn.Module) -> bool:
    """A Conv2d with a kernel larger than 1x1, stride 1 and dilation 1 (what conv_weight_gradients
    handles)."""
    return (
        isinstance(module, nn.Conv2d)
        and module.kernel_size != (1, 1)
        and module.stride == (1, 1)
        and module.dilation == (1, 1)
    )


def conv_weight_gradients(a: torch.Tensor, g: torch.Tensor, conv: nn.Conv2d, groups: int) -> torch.Tensor:
    """(groups, C_out, C_in kh kw): each example's exact weight gradient, the sum over its rows of sum_p
    g_p a_p^T,
    without unfolding the patches.

    With the padded input flattened row-major at width Wp, the patch entry (i, j) of output position (y, x)
    sits at flat index (y + i) Wp + x + j, so for each kernel offset the inputs of all positions are one
    contiguous window of the flattened input, if g is widened to Wp columns with zeros (which multiply the
    wrapped-around entries by 0). That is kh kw batched matmuls on views, ~12% more multiply-adds (Wp / Wo)
    and no kh kw-fold copy of the activations, which costs more than the matmuls on CPU. Each offset's
    products are summed over the example's rows before the offsets are interleaved, so the interleaving
    copy is of `groups`, not `rows`, gradients.
    """
    if (
        a.shape[0] // groups >= BACKWARD_MIN_ROWS
        and min(conv.in_channels, conv.out_channels) >= BACKWARD_MIN_CHANNELS
    ):
        return conv_weight_gradients_by_backward(a, g, conv, groups)
    (kh, kw), (ph, pw) = conv.kernel_size, conv.padding
    padded = F.pad(a, (pw, pw, ph, ph + 1))  # one extra zero row: the last window runs kw - 1 past the end
    width = padded.shape[3]
    out_h, out_w = g.shape[2], g.shape[3]
    flat = padded.flatten(2)  # (rows, C_in, (Hp + 1) Wp)
    g_wide = F.pad(g, (0, width - out_w)).flatten(2)  # (rows, C_out, Ho Wp)
    span = out_h * width
    per_offset = [
        grouped_sum(
            torch.bmm(g_wide, flat[:, :, i * width + j : i * width + j + span].transpose(1, 2)), groups
        )
        for i in range(kh)
        for j in range(kw)
    ]  # each (groups, C_out, C_in)
    return torch.stack(per_offset, dim=3).flatten(
        2
    )  # (groups, C_out, C_in, kh kw) -> the weight's (C_in, kh, kw) order


# Above these rows per example and channels, a convolution's own weight-gradient kernel (oneDNN, what
# training's
# backward runs) once per example beats the windowed matmuls (MKL): 3x3 at 16x16, 80 rows, 32 -> 32 channels
# 2.9
# against 3.6 ms at 8 rows per example and 3.2 against 4.1 at 10, 64 -> 32 5.0 against 6.6 and 5.5 against
# 8.2;
# at 4 rows per example, or with 1 channel on a side, the matmuls win (bench/featurize_profile.py)
BACKWARD_MIN_ROWS = 8
BACKWARD_MIN_CHANNELS = 32


def conv_weight_gradients_by_backward(
    a: torch.Tensor, g: torch.Tensor, conv: nn.Conv2d, groups: int
) -> torch.Tensor:
    """conv_weight_gradients by one weight-only convolution backward per example over its rows."""
    rows, weight = a.shape[0] // groups, conv.weight.detach().to(a.dtype)
    per_example = [
        torch.ops.aten.convolution_backward(
            g[i * rows : (i + 1) * rows],
            a[i * rows : (i + 1) * rows],
            weight,
            None,
            conv.stride,
            conv.padding,
            conv.dilation,
            False,
            [0, 0],
            1,
            [False, True, False],
        )[1]
        for i in range(groups)
    ]  # each (C_out, C_in, kh, kw)
    return torch.stack(per_example).flatten(2)
