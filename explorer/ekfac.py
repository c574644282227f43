"""EK-FAC influence: g_q^T (H + lambda I)^-1 g_i as an inner product of preconditioned gradients.

H is EK-FAC (George et al. 2018) of the GGN of the diffusion loss 1/2 ||eps_theta(x_t, t) - eps||^2 over
(x0, t ~ U{0..T-1}, eps ~ N(0, I)) (Mlodozeniec et al. 2024, arXiv 2410.13850). Its output Hessian is I,
so the GGN is E[G G^T] for the MC pseudo-gradient G = J^T v = grad (eps_theta . v), v ~ N(0, I). A
Conv2d / Linear layer's W~ = [W | b] (d_out, d_in' = C_in kh kw [+ 1]) acts on a~ = [a; 1]:

    A = E_{n,p}[a~ a~^T] = Q_A D_A Q_A^T,   S = E_n[sum_p g g^T] = Q_S D_S Q_S^T        (K-FAC expand)
    Lambda[i, j] = E_n[(Q_S^T G_n Q_A)[i, j]^2]     (eigenvalue correction: the best diagonal in that basis)
    H_layer = (Q_S kron Q_A) diag(vec Lambda) (Q_S kron Q_A)^T

Other parameters (GroupNorm affine, grouped convs) get the identity basis: Lambda = E_n[g^2]. H is
block-diagonal, so psi(g) = (H + lambda I)^(-1/2) g is per block, in its eigenbasis (Q is orthogonal: no
need to rotate back), (Q_S^T G Q_A) / sqrt(Lambda + lambda), and score(q, i) = <psi(g_q), psi(g_i)>.
EkfacProjector count-sketches psi for one inner-product search; lambda = relative_damping * mean(Lambda).
Scaling H by c scales every score by 1/c: the loss's scale (sum or mean, the 1/2) keeps every ranking.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from tqdm.auto import tqdm

from explorer.atomic import write_atomic, write_json_atomic
from explorer.errors import ExplorerError
from explorer.layer_gradients import unfold
from explorer.model import DiffusionModel
from explorer.projector import CountSketchProjector

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
META_NAME = "ekfac.json"
TENSORS_NAME = "ekfac.safetensors"
FACTOR_FILES = (META_NAME, TENSORS_NAME)  # what an EK-FAC index stores besides the usual files
FIELDS = ("eigenvalues", "q_a", "q_s")  # the tensors of an EkfacFactors
REFIT = "fit the factors again for this model and parameter list (explorer.ekfac.fit_ekfac)"


@dataclass(frozen=True)
class Block:
    """One diagonal block of H: a Conv2d/Linear layer's [W | b] (kronecker) or one parameter (diagonal)."""

    kind: Literal["kronecker", "diagonal"]
    key: str  # the module's name (kronecker) or the parameter's (diagonal)
    shape: tuple[int, ...]  # Lambda's: (d_out, d_in') or the parameter's
    weight: str | None = None  # kronecker: the covered weight and bias parameters (None: not covered)
    bias: str | None = None

    def widths(self) -> dict[str, int]:
        """Entries of each parameter the block covers."""
        if self.kind == "diagonal":
            return {self.key: math.prod(self.shape)}
        d_out, d_in = self.shape
        weight = {self.weight: d_out * (d_in - (self.bias is not None))} if self.weight else {}
        return weight | ({self.bias: d_out} if self.bias else {})


def plan_blocks(unet: nn.Module, names: list[str]) -> list[Block]:
    """The blocks over `names` (parameters of unet), in the order their first parameter comes in `names`."""
    params, modules = dict(unet.named_parameters()), dict(unet.named_modules())
    bad = [name for i, name in enumerate(names) if name not in params or name in names[:i]]
    if bad or not names:
        raise ExplorerError(
            f"parameter names {bad[:5] or names} are not parameters of this model, or repeat: pass distinct "
            "names from model.unet.named_parameters() (e.g. FeatureComputer.names)"
        )
    blocks, seen = [], set()
    for name in names:
        module_name, _, kind = name.rpartition(".")
        module = modules.get(module_name)
        if not (_kronecker(module) and kind in ("weight", "bias")):
            blocks.append(Block("diagonal", name, tuple(params[name].shape)))
        elif module_name not in seen:
            seen.add(module_name)
            weight, bias = (f"{module_name}.{part}" for part in ("weight", "bias"))
            weight, bias = (key if key in names else None for key in (weight, bias))
            shape = (module.weight.shape[0], module.weight[0].numel() * bool(weight) + (bias is not None))
            blocks.append(Block("kronecker", module_name, shape, weight, bias))
    return blocks


def _kronecker(module: nn.Module | None) -> bool:
    """Linear, or a Conv2d that unfold() handles (one group, zero padding given as numbers)."""
    plain_conv = isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros"
    return isinstance(module, nn.Linear) or plain_conv and not isinstance(module.padding, str)


@dataclass
class EkfacFactors:
    """Fitted EK-FAC factors, float32 on the CPU; dicts are keyed by Block.key (q_a, q_s: kronecker blocks
    only). A and S themselves are not kept: only their eigenvectors enter H."""

    names: list[str]  # the parameters covered, in the order fit_ekfac was given them
    blocks: list[Block]
    eigenvalues: dict[str, Tensor]  # Lambda: (d_out, d_in') or the parameter's shape
    q_a: dict[str, Tensor]  # (d_in', d_in'): eigenvectors of A as columns
    q_s: dict[str, Tensor]  # (d_out, d_out): eigenvectors of S
    samples: int  # (x0, t, eps, v) draws the expectations average over
    seed: int
    weights_hash: str = ""  # of the model they were fitted on ("" if unknown)

    def save(self, directory: str | Path) -> None:
        """directory/ekfac.safetensors (the tensors), then ekfac.json (the blocks), both atomically."""
        directory = Path(directory)
        tensors = {
            f"{field}/{key}": v.contiguous() for field in FIELDS for key, v in getattr(self, field).items()
        }
        write_atomic(directory / TENSORS_NAME, lambda tmp: save_file(tensors, tmp))
        meta = {"version": FORMAT_VERSION, "names": self.names, "blocks": [asdict(b) for b in self.blocks]}
        meta.update(samples=self.samples, seed=self.seed, weights_hash=self.weights_hash)
        write_json_atomic(directory / META_NAME, meta)

    @classmethod
    def load(cls, directory: str | Path, model: DiffusionModel, names: list[str]) -> EkfacFactors:
        """Read factors saved by save() and check that they fit the model's parameters `names`."""
        directory = Path(directory)
        where = f"EK-FAC factors in {str(directory)!r}"
        try:
            meta = json.loads((directory / META_NAME).read_text())
            tensors = load_file(str(directory / TENSORS_NAME))
            blocks = [Block(**{**entry, "shape": tuple(entry["shape"])}) for entry in meta["blocks"]]
            version, saved_names = meta["version"], list(meta["names"])
        except (OSError, ValueError, TypeError, KeyError) as error:
            raise ExplorerError(f"{where} are unreadable ({error}): {REFIT}") from error
        if version != FORMAT_VERSION:
            raise ExplorerError(
                f"{where} have format version {version!r}, this code reads {FORMAT_VERSION}: {REFIT}"
            )
        if saved_names != list(names):
            missing, extra = sorted(set(names) - set(saved_names)), sorted(set(saved_names) - set(names))
            raise ExplorerError(
                f"{where} cover other parameters (missing {missing[:5]}, extra {extra[:5]}, or in another "
                f"order): {REFIT}"
            )
        expected = plan_blocks(model.unet, list(names))
        for saved, fits in zip(blocks + [None] * len(expected), expected + [None] * len(blocks)):
            if saved != fits:
                raise ExplorerError(f"EK-FAC block {saved} does not fit this model's {fits}: {REFIT}")
        fields = {field: {} for field in FIELDS}
        for block in blocks:
            shapes = {"eigenvalues": block.shape}
            if block.kind == "kronecker":
                shapes.update(q_a=(block.shape[1],) * 2, q_s=(block.shape[0],) * 2)
            for field, shape in shapes.items():
                fields[field][block.key] = value = tensors.get(f"{field}/{block.key}", torch.empty(0))
                if tuple(value.shape) != shape:
                    raise ExplorerError(
                        f"{where}: {field} of {block.key!r} is {tuple(value.shape)}, not {shape}: {REFIT}"
                    )
        if meta.get("weights_hash") and meta["weights_hash"] != getattr(model, "weights_hash", ""):
            logger.warning("%s were fitted on other weights of this model", where)
        extras = {key: meta[key] for key in ("samples", "seed", "weights_hash")}
        return cls(names=saved_names, blocks=blocks, **fields, **extras)


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
        x_t = scale.sqrt() * images[rows].float().cpu() + (1 - scale).sqrt() * eps  # DDPM eq. 4, on the CPU
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


def block_gradients(block: Block, grads: dict[str, Tensor]) -> Tensor:
    """A block's per-example gradients: G~ = [dW | db] (B, d_out, d_in') from dW as (B, d_out, C_in kh kw) and
    db as (B, d_out, 1), or the parameter's (B, *shape)."""
    if block.kind == "diagonal":
        return grads[block.key].reshape(-1, *block.shape)
    names = [name for name in (block.weight, block.bias) if name]
    return torch.cat([grads[name].reshape(len(grads[name]), block.shape[0], -1) for name in names], dim=2)


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


class EkfacProjector:
    """psi(g) = (H + lambda I)^(-1/2) g per block in its eigenbasis, count-sketched to `dim` (the
    CountSketchProjector interface); dim equal to the full width gives psi itself, unsketched."""

    def __init__(
        self,
        factors: EkfacFactors,
        names: list[str],
        sizes: dict[str, int],
        dim: int,
        seed: int,
        relative_damping: float,
    ):
        """names: the order project()'s gradients come in (the factors' parameters); sizes: name -> numel."""
        if sorted(names) != sorted(factors.names):
            raise ExplorerError(
                f"the EK-FAC factors cover {len(factors.names)} parameters, not these {len(names)} (e.g. "
                f"{sorted(set(names) ^ set(factors.names))[:3]}): {REFIT}"
            )
        for name, width in (item for block in factors.blocks for item in block.widths().items()):
            if sizes.get(name) != width:
                raise ExplorerError(
                    f"parameter {name!r} has {sizes.get(name)} entries, the factors {width}: {REFIT}"
                )
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ExplorerError(f"spec.proj_dim {dim!r} must be >= 1, e.g. 2048", ("spec.proj_dim",))
        if not relative_damping > 0:
            raise ExplorerError(f"relative_damping {relative_damping!r} must be > 0, e.g. 0.1")
        self.factors, self.names, self.dim, self.seed = factors, list(names), dim, seed
        self.width = self.num_params = sum(math.prod(b.shape) for b in factors.blocks)  # psi's = sum(sizes)
        total = sum(float(value.double().sum()) for value in factors.eigenvalues.values())
        self.damping = relative_damping * total / self.width  # lambda = relative_damping * mean(Lambda)
        if not self.damping > 0:
            raise ExplorerError(f"the EK-FAC eigenvalues are all zero (no gradient reached them): {REFIT}")
        self.sketch = None if dim == self.width else CountSketchProjector(self.width, dim, seed)
        self._device, self._moved = torch.device("cpu"), {field: getattr(factors, field) for field in FIELDS}

    def _tensors(self, device: torch.device) -> dict[str, dict[str, Tensor]]:
        """The factors' FIELDS on `device` (moved once)."""
        if device != self._device:
            self._moved = {
                field: {k: v.to(device) for k, v in getattr(self.factors, field).items()} for field in FIELDS
            }
            self._device = device
        return self._moved

    def precondition(self, grads: list[Tensor]) -> list[Tensor]:
        """grads (B, *shape) in `names` order -> psi per block (factors.blocks order): (B, d_out, d_in') in
        the block's eigenbasis, or (B, *shape) for a diagonal block."""
        if len(grads) != len(self.names):
            raise ExplorerError(f"got {len(grads)} gradient tensors for {len(self.names)} parameters")
        by_name = {name: g.float() for name, g in zip(self.names, grads)}
        tensors, out = self._tensors(grads[0].device), []
        for block in self.factors.blocks:
            g = block_gradients(block, by_name)
            if block.kind == "kronecker":
                g = tensors["q_s"][block.key].T @ g @ tensors["q_a"][block.key]  # Q_S^T G Q_A
            out.append(g * (tensors["eigenvalues"][block.key] + self.damping).rsqrt())  # / sqrt(Lambda + l)
        return out

    def project(self, grads: list[Tensor]) -> Tensor:
        """grads (B, *shape) in `names` order -> (B, dim) float32; <project(q), project(i)> ~ score(q, i)."""
        blocks = self.precondition(grads)
        if self.sketch is None:
            return torch.cat([block.flatten(1) for block in blocks], dim=1)
        return self.sketch.project(blocks)
