"""Fitting EK-FAC factors (explorer.ekfac) to a diffusion model: two passes over seeded draws.

1. K-FAC: each Conv2d / Linear layer's A = E[a~ a~^T] (inputs, unfolded, with the homogeneous 1) and
   S = E[sum_p g g^T] (output gradients of the MC pseudo-loss eps_theta . v, v ~ N(0, I)), eigendecomposed;
2. eigenvalue correction: Lambda = E_n[(Q_S^T G_n Q_A)^2] over per-sample pseudo-gradients G_n (vmap), and
   E_n[g^2] for the diagonal blocks.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from tqdm.auto import tqdm

from explorer.ekfac import Block, EkfacFactors, block_gradients, plan_blocks
from explorer.errors import ExplorerError
from explorer.layer_gradients import unfold
from explorer.model import DiffusionModel
from explorer.noising import forward_noise

logger = logging.getLogger(__name__)


def draw_samples(
    model: DiffusionModel,
    images: Tensor,
    samples_per_image: int,
    seed: int,
    batch_size: int,
    context: Tensor | None = None,
) -> Iterator[tuple[Tensor, Tensor, Tensor, Tensor | None]]:
    """Batches (x_t, t, v, context) of the draws fit_ekfac averages over, on the model's device.

    Rows are image-major (row r is image r // samples_per_image); per batch a CPU generator seeded with
    `seed` draws t (b,) ~ U{0..T-1}, then eps (b, C, H, W), then v (b, C, H, W) ~ N(0, I). The same
    arguments give the same stream on every device, which both passes of fit_ekfac run over.
    """
    generator = torch.Generator().manual_seed(seed)
    device, shape = model.device, tuple(images.shape[1:])
    abar = model.scheduler.alphas_cumprod.to(torch.float32)
    for rows in torch.arange(len(images)).repeat_interleave(samples_per_image).split(batch_size):
        t = torch.randint(0, model.num_train_timesteps, (len(rows),), generator=generator)
        eps = torch.randn((len(rows), *shape), generator=generator)
        v = torch.randn((len(rows), *shape), generator=generator)
        scale = abar[t].view(-1, 1, 1, 1)
        x_t = forward_noise(images[rows].float().cpu(), eps, scale)  # DDPM eq. 4, on the CPU
        c = None if context is None else context[rows].to(device)
        yield x_t.to(device), t.to(device), v.to(device), c


def _predict(unet: nn.Module, params: dict, x_t: Tensor, t: Tensor, context) -> Tensor:
    """eps_theta(x_t, t) (B, C, H, W), with `params` substituted (functional_call)."""
    kwargs = {} if context is None else {"encoder_hidden_states": context}
    out = functional_call(unet, params, (x_t, t), kwargs)
    return getattr(out, "sample", out)


def _columns(module: nn.Module, x: Tensor, is_input: bool) -> Tensor:
    """A layer's input (unfolded patches for a conv) or output gradient as (B, d, L) over its L positions."""
    if isinstance(module, nn.Conv2d):
        return unfold(x, module) if is_input else x.flatten(2)
    return x.reshape(x.shape[0], -1, x.shape[-1]).transpose(1, 2)


def _kfac_pass(model: DiffusionModel, stream, blocks: list[Block], samples: int) -> tuple[dict, dict]:
    """Pass 1: A (d_in', d_in') and S (d_out, d_out), float64 on the CPU, of the kronecker blocks from hooked
    batched forwards and backwards."""
    layers = {block.key: (block, model.unet.get_submodule(block.key)) for block in blocks}
    zeros = {"dtype": torch.float64, "device": model.device}
    a_sum = {b.key: torch.zeros(b.shape[1], b.shape[1], **zeros) for b in blocks}  # sums of a~ a~^T
    s_sum = {b.key: torch.zeros(b.shape[0], b.shape[0], **zeros) for b in blocks}  # sums of g g^T
    a_rows, key_of, records = dict.fromkeys(layers, 0), {m: key for key, (_, m) in layers.items()}, []

    def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
        if not output.requires_grad:  # a frozen layer on a constant input: make its output a leaf
            output.requires_grad_(True)
        records.append((key_of[module], args[0].detach(), output))

    for x_t, t, v, c in stream:
        records.clear()
        handles = [module.register_forward_hook(hook) for module in key_of]
        try:
            with torch.enable_grad():
                total = (_predict(model.unet, {}, x_t, t, c) * v).sum()  # its gradient: J^T v
                outputs = [output for _, _, output in records]
                grads = torch.autograd.grad(total, outputs, allow_unused=True, materialize_grads=True)
        finally:
            for handle in handles:
                handle.remove()
        for (key, a, _), g in zip(records, grads):
            block, module = layers[key]
            a = _columns(module, a, True)  # (B, C_in kh kw, L), then a~ = [a; 1]: (B, d_in', L)
            a = torch.cat([a] * bool(block.weight) + [torch.ones_like(a[:, :1])] * bool(block.bias), dim=1)
            a, g = a.transpose(0, 1).flatten(1), _columns(module, g, False).transpose(0, 1).flatten(1)
            a_sum[key] += (a @ a.T).double()  # a: (d_in', B L), g: (d_out, B L)
            s_sum[key] += (g @ g.T).double()
            a_rows[key] += a.shape[1]
    if unused := [key for key, rows in a_rows.items() if rows == 0]:
        logger.warning("EK-FAC: layers %s never ran in the forward: their factors are zero", unused)
    # K-FAC expand: A is a mean over samples and positions, S over samples (a sum over positions)
    a_mean = {key: (a_sum[key] / max(a_rows[key], 1)).cpu() for key in layers}
    return a_mean, {key: (s_sum[key] / samples).cpu() for key in layers}


def _correction_pass(
    model: DiffusionModel, stream, blocks: list[Block], q_a: dict, q_s: dict, samples: int
) -> dict[str, Tensor]:
    """Pass 2: Lambda = E_n[(Q_S^T G_n Q_A)^2] (kronecker) or E_n[g_n^2] (diagonal); G_n by vmap(grad)."""
    covered = {name for block in blocks for name in block.widths()}
    params = {name: p.detach() for name, p in model.unet.named_parameters() if name in covered}
    sums = {block.key: torch.zeros(block.shape, dtype=torch.float64, device=model.device) for block in blocks}
    rotations = {key: (q_s[key].to(model.device).T, q_a[key].to(model.device)) for key in q_a}

    def pseudo_loss(params: dict, x_t, t, v, c) -> Tensor:  # one draw: x_t, v (C, H, W), t ()
        prediction = _predict(model.unet, params, x_t[None], t[None], None if c is None else c[None])
        return (prediction * v[None]).sum()

    for x_t, t, v, c in stream:
        per_sample = vmap(grad(pseudo_loss), in_dims=(None, 0, 0, 0, None if c is None else 0))
        grads = per_sample(params, x_t, t, v, c)  # name -> (B, *shape)
        for block in blocks:
            g = block_gradients(block, grads)
            if block.kind == "kronecker":
                left, right = rotations[block.key]
                g = left @ g @ right  # Q_S^T G_n Q_A, (B, d_out, d_in')
            sums[block.key] += g.double().pow(2).sum(0)
    return {key: (value / samples).float().cpu() for key, value in sums.items()}


def fit_ekfac(
    model: DiffusionModel,
    images: Tensor,
    samples_per_image: int,
    seed: int,
    batch_size: int = 32,
    names: list[str] | None = None,
    context: Tensor | None = None,
) -> EkfacFactors:
    """EK-FAC factors of the diffusion loss's GGN over images (N, C, H, W) in [-1, 1] (latents for a latent
    model, context (N, L, D) its prompt embeddings), samples_per_image (t, eps, v) draws each.

    names: the parameters covered (default all, in model.unet.named_parameters() order). Two passes over
    the N samples_per_image draws of draw_samples: hooked batched forwards and backwards for A and S, then
    per-sample gradients (vmap: batch_size x #params floats at once) for Lambda. Run the model in eval mode.
    """
    # 0. check the inputs
    expected = (model.channels, model.sample_size, model.sample_size)
    if images.ndim != 4 or tuple(images.shape[1:]) != expected or len(images) == 0:
        raise ExplorerError(
            f"images of shape {tuple(images.shape)} do not fit the model: expected (N >= 1, "
            f"{', '.join(map(str, expected))})"
        )
    if not torch.isfinite(images).all():
        raise ExplorerError("images contain NaN or infinite values: fit EK-FAC on finite images in [-1, 1]")
    for label, value in (("samples_per_image", samples_per_image), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ExplorerError(f"{label} {value!r} must be a whole number >= 1, e.g. 4")
    model.check_context(context, len(images))
    names = [name for name, _ in model.unet.named_parameters()] if names is None else list(names)
    blocks = plan_blocks(model.unet, names)
    samples = len(images) * samples_per_image

    def stream(label: str):
        batches = draw_samples(model, images, samples_per_image, seed, batch_size, context)
        return tqdm(batches, desc=label, unit="batch", total=-(-samples // batch_size))

    # 1. K-FAC factors A and S (pass 1) and their eigenbases
    kronecker = [block for block in blocks if block.kind == "kronecker"]
    a_mean, s_mean = _kfac_pass(model, stream("EK-FAC pass 1 (K-FAC factors)"), kronecker, samples)
    q_a = {key: torch.linalg.eigh(value).eigenvectors.float().contiguous() for key, value in a_mean.items()}
    q_s = {key: torch.linalg.eigh(value).eigenvectors.float().contiguous() for key, value in s_mean.items()}
    # 2. eigenvalue correction in those bases (pass 2)
    eigenvalues = _correction_pass(model, stream("EK-FAC pass 2 (eigenvalues)"), blocks, q_a, q_s, samples)
    weights_hash = getattr(model, "weights_hash", "")
    return EkfacFactors(names, blocks, eigenvalues, q_a, q_s, samples, seed, weights_hash)
