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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from explorer.atomic import write_atomic, write_json_atomic
from explorer.errors import ExplorerError
from explorer.model import DiffusionModel
from explorer.projector import CountSketchProjector

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
META_NAME = "ekfac.json"
TENSORS_NAME = "ekfac.safetensors"
FACTOR_FILES = (META_NAME, TENSORS_NAME)  # what an EK-FAC index stores besides the usual files
FIELDS = ("eigenvalues", "q_a", "q_s")  # the tensors of an EkfacFactors
REFIT = "fit the factors again for this model and parameter list (explorer.ekfac_fit.fit_ekfac)"


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


def block_gradients(block: Block, grads: dict[str, Tensor]) -> Tensor:
    """A block's per-example gradients: G~ = [dW | db] (B, d_out, d_in') from dW as (B, d_out, C_in kh kw) and
    db as (B, d_out, 1), or the parameter's (B, *shape)."""
    if block.kind == "diagonal":
        return grads[block.key].reshape(-1, *block.shape)
    names = [name for name in (block.weight, block.bias) if name]
    return torch.cat([grads[name].reshape(len(grads[name]), block.shape[0], -1) for name in names], dim=2)


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

    def rotate(self, grads: list[Tensor]) -> list[Tensor]:
        """grads (B, *shape) in `names` order -> each block's gradient in its eigenbasis (factors.blocks
        order): Q_S^T G Q_A (B, d_out, d_in'), or (B, *shape) unchanged for a diagonal block."""
        if len(grads) != len(self.names):
            raise ExplorerError(f"got {len(grads)} gradient tensors for {len(self.names)} parameters")
        by_name = {name: g.float() for name, g in zip(self.names, grads)}
        tensors, out = self._tensors(grads[0].device), []
        for block in self.factors.blocks:
            g = block_gradients(block, by_name)
            if block.kind == "kronecker":
                g = tensors["q_s"][block.key].T @ g @ tensors["q_a"][block.key]  # Q_S^T G Q_A
            out.append(g)
        return out

    def scale(self, rotated: list[Tensor], damping: float | None = None) -> list[Tensor]:
        """Rotated blocks -> psi: each entry / sqrt(Lambda + lambda) (lambda: this projector's, or the given
        absolute damping)."""
        damping = self.damping if damping is None else damping
        eigenvalues = self._tensors(rotated[0].device)["eigenvalues"]
        blocks = self.factors.blocks
        return [g * (eigenvalues[block.key] + damping).rsqrt() for g, block in zip(rotated, blocks)]

    def precondition(self, grads: list[Tensor]) -> list[Tensor]:
        """grads (B, *shape) in `names` order -> psi per block (factors.blocks order): (B, d_out, d_in') in
        the block's eigenbasis, or (B, *shape) for a diagonal block."""
        return self.scale(self.rotate(grads))

    def project(self, grads: list[Tensor]) -> Tensor:
        """grads (B, *shape) in `names` order -> (B, dim) float32; <project(q), project(i)> ~ score(q, i)."""
        blocks = self.precondition(grads)
        if self.sketch is None:
            return torch.cat([block.flatten(1) for block in blocks], dim=1)
        return self.sketch.project(blocks)
