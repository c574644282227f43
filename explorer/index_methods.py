"""Attribution methods as index methods: what a stored training row and a query feature are for each.

Every method ends in one inner-product search over stored rows psi_i with a query vector psi_q:

- trak (TRAK, arXiv 2303.14186; D-TRAK, arXiv 2311.00500; Journey-TRAK, arXiv 2312.06205 per bucket):
  psi = L^-1 (phi - c) with L = chol(Phi^T Phi + lambda I) of the output function's features, both sides
  (explorer.scoring). spec.output loss is TRAK, the other output functions are D-TRAK's.
- das (DAS, arXiv 2410.18639): removing z_i moves the query's noise prediction by, to first order (the
  model linearized at theta*, one Newton step with the GGN), d eps_q = J_q (J^T J)^-1 J_i^T r_i, with
  r_i = eps_theta(x_t^i) - eps the training residual. J_i^T r_i is the gradient of the training loss, so
  the stored rows are whitened loss gradients, while the kernel and the query are the output function's
  (D-TRAK's compression of the output Jacobian J to the gradient of f, e.g. mean of eps): the score is the
  linearized change of f(eps_theta(x_q)). das_kernel "loss" takes the kernel from the rows instead (the
  empirical Fisher sum_i J_i^T r_i r_i^T J_i, TRAK's stand-in for the GGN). The released code's
  approximation, grad f_i times |r_i|, is `--das-weights` (a scalar per row).
- tracin / retrac (Diffusion-TracIn and -ReTrac, arXiv 2401.09031): sum over training checkpoints c of
  eta_c <g_q^c, g_i^c> (ReTrac: of unit-norm g^c, which removes the timestep-induced norm bias). Each
  checkpoint is sketched to k / C dimensions and the sketches concatenated (scaled by sqrt(eta_c), or
  normalized), so the k-dimensional inner product is the sum; no kernel (no whitening factor is stored).
- ekfac (influence functions, Mlodozeniec et al. arXiv 2410.13850): g_q^T (H + lambda I)^-1 g_i with H the
  EK-FAC approximation of the GGN of the diffusion loss over all timesteps (explorer.ekfac); both sides are
  preconditioned with (H + lambda I)^-1/2 before the sketch; the training side is the loss gradient, the
  query side the output function's (the measurement). The factors are stored with the index.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from explorer.errors import ExplorerError
from explorer.features import FeatureComputer, FeatureSpec, every_bucket
from explorer.model import DiffusionModel

METHODS = ("trak", "das", "tracin", "retrac", "ekfac")
WHITENED = ("trak", "das")  # the methods with a TRAK kernel; the others store no whitening factor
CHECKPOINT_METHODS = ("tracin", "retrac")
DAS_KERNELS = ("output", "loss")  # das: whose gradients form the kernel (the GGN's approximation)


def checkpoint_file(step: int) -> str:
    return f"checkpoint_{step:06d}.safetensors"


@dataclass(frozen=True)
class Checkpoint:
    file: str  # in the index directory (a copy of the training run's history file)
    step: int
    learning_rate: float


@dataclass(frozen=True)
class IndexMethod:
    """meta.json "method": absent in indexes written before methods existed (they are trak)."""

    name: str = "trak"
    checkpoints: tuple[Checkpoint, ...] = ()  # tracin / retrac: the training iterates used
    relative_damping: float = 0.0  # ekfac: lambda / mean EK-FAC eigenvalue
    fit_images: int = 0  # ekfac: training images the factors were fitted on
    fit_seed: int = 0  # ekfac: seeds the fit's timesteps, noise and pseudo-targets
    das_kernel: str = "output"  # das: the GGN from the output function's gradients, or "loss": from the rows'

    @property
    def whitened(self) -> bool:
        return self.name in WHITENED

    def files(self) -> set[str]:
        """The method's own files in the index directory (hashed in meta.json like the others)."""
        if self.name == "ekfac":
            from explorer.ekfac import FACTOR_FILES

            return set(FACTOR_FILES)
        return {c.file for c in self.checkpoints}

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["checkpoints"] = [dataclasses.asdict(c) for c in self.checkpoints]
        return out

    @classmethod
    def from_json(cls, item: dict | None) -> IndexMethod:
        if item is None:
            return cls()
        return cls(
            name=item["name"],
            checkpoints=tuple(
                Checkpoint(str(c["file"]), int(c["step"]), float(c["learning_rate"]))
                for c in item["checkpoints"]
            ),
            relative_damping=float(item["relative_damping"]),
            fit_images=int(item["fit_images"]),
            fit_seed=int(item["fit_seed"]),
            das_kernel=str(item.get("das_kernel", "output")),
        )

    @property
    def label(self) -> str:
        return {"trak": "", "das": "DAS", "tracin": "TracIn", "retrac": "ReTrac", "ekfac": "EK-FAC IF"}[
            self.name
        ]


def method_problem(meta: dict) -> str | None:
    """What is wrong with meta.json's "method" (absent: trak), or None."""
    item = meta.get("method")
    if item is None:
        return None
    keys = {f.name for f in dataclasses.fields(IndexMethod)}
    if not isinstance(item, dict) or set(item) | {"das_kernel"} != keys:
        return f"method is {item!r:.60}, must hold exactly {', '.join(sorted(keys))}"
    if item.get("das_kernel", "output") not in DAS_KERNELS:
        return f"method.das_kernel is {item['das_kernel']!r}, must be one of {', '.join(DAS_KERNELS)}"
    if item["name"] not in METHODS:
        return f"method.name is {item['name']!r}, must be one of {', '.join(METHODS)}"
    checkpoints = item["checkpoints"]
    if not isinstance(checkpoints, list) or not all(
        isinstance(c, dict)
        and set(c) == {"file", "step", "learning_rate"}
        and isinstance(c["step"], int)
        and c["file"] == checkpoint_file(c["step"])
        and isinstance(c["learning_rate"], (int, float))
        for c in checkpoints
    ):
        return f"method.checkpoints is {checkpoints!r:.60}, must list {{file, step, learning_rate}}"
    if (item["name"] in CHECKPOINT_METHODS) != bool(checkpoints):
        return f"method {item['name']} with {len(checkpoints)} checkpoints: only tracin and retrac have them"
    if not isinstance(item["relative_damping"], (int, float)) or item["relative_damping"] < 0:
        return f"method.relative_damping is {item['relative_damping']!r}, must be a number >= 0"
    if meta.get("spec", {}).get("proj_dim", 0) % max(1, len(checkpoints)):
        return f"spec.proj_dim must split evenly across the {len(checkpoints)} checkpoints"
    return None


def checkpoint_model(model: DiffusionModel, path: Path) -> DiffusionModel:
    """The served model's architecture with a training checkpoint's weights (a copy; `model` is untouched)."""
    try:
        weights = load_file(str(path))
    except (OSError, RuntimeError) as error:
        raise ExplorerError(
            f"checkpoint {str(path)!r} cannot be read ({error}): rebuild the index"
        ) from error
    unet = copy.deepcopy(model.unet)
    try:
        unet.load_state_dict(weights)
    except RuntimeError as error:
        raise ExplorerError(
            f"checkpoint {str(path)!r} does not fit the model's UNet ({str(error).splitlines()[0]}): it "
            "belongs to another architecture; pass the training run's own checkpoint/history folder"
        ) from error
    return dataclasses.replace(model, unet=unet.requires_grad_(False).eval())


class CheckpointFeatures:
    """TracIn / ReTrac features: the concatenation over checkpoints c of w_c phi^c, phi^c sketched to
    k / C dimensions at checkpoint c's weights; w_c = sqrt(eta_c) (TracIn) or 1 / |phi^c| (ReTrac)."""

    def __init__(self, computers: list, learning_rates: list[float], normalize_each: bool, spec: FeatureSpec):
        self.computers, self.learning_rates = computers, learning_rates
        self.normalize_each, self._spec = normalize_each, spec

    @property
    def spec(self) -> FeatureSpec:
        return self._spec

    @property
    def dim(self) -> int:
        return self._spec.proj_dim

    @property
    def timesteps(self) -> list[list[int]]:
        return self.computers[0].timesteps

    @property
    def num_params(self) -> int:
        return self.computers[0].num_params

    def features(self, images: torch.Tensor, buckets: torch.Tensor, context=None) -> torch.Tensor:
        parts = []
        for computer, eta in zip(self.computers, self.learning_rates):
            phi = computer.features(images, buckets, context)  # (P, k / C)
            if self.normalize_each:  # Diffusion-ReTrac, section 4: unit-norm gradients per checkpoint
                phi = phi / phi.norm(dim=1, keepdim=True).clamp_min(1e-30)
            else:
                phi = phi * eta**0.5
            parts.append(phi)
        return torch.cat(parts, dim=1)  # (P, k): <., .> = sum over c

    def all_bucket_features(self, images: torch.Tensor, context=None) -> torch.Tensor:
        return every_bucket(self.features, images, self._spec.buckets, context)


class StackedFeatures:
    """DAS's training side: [phi_f, phi_loss] per pair (P, 2k): the kernel's output-function features and
    the stored rows' loss gradients from one pass over the data (the same projection for both)."""

    def __init__(self, kernel, rows):
        self.kernel, self.rows = kernel, rows

    @property
    def spec(self) -> FeatureSpec:
        return self.kernel.spec

    @property
    def dim(self) -> int:
        return 2 * self.kernel.spec.proj_dim

    @property
    def timesteps(self) -> list[list[int]]:
        return self.kernel.timesteps

    @property
    def num_params(self) -> int:
        return self.kernel.num_params

    def features(self, images: torch.Tensor, buckets: torch.Tensor, context=None) -> torch.Tensor:
        return torch.cat(
            [self.kernel.features(images, buckets, context), self.rows.features(images, buckets, context)], 1
        )

    def all_bucket_features(self, images: torch.Tensor, context=None) -> torch.Tensor:
        return every_bucket(self.features, images, self.spec.buckets, context)


def checkpoint_spec(spec: FeatureSpec, count: int) -> FeatureSpec:
    """The spec of one checkpoint's sketch: k / C dimensions."""
    if count < 1 or spec.proj_dim % count:
        raise ExplorerError(
            f"--proj-dim {spec.proj_dim} does not split across {count} checkpoints: choose a proj_dim that "
            f"{count} divides (e.g. {count * max(1, spec.proj_dim // count)}) or another --num-checkpoints",
            ("spec.proj_dim",),
        )
    return dataclasses.replace(spec, proj_dim=spec.proj_dim // count)


def query_identity(method: IndexMethod, spec: FeatureSpec, file_hashes: dict[str, str]) -> dict:
    """Everything a query feature depends on (for caches): das queries are trak's; the others add their
    method, damping and the hashes of their stored checkpoints or factors."""
    identity = {"spec": spec.to_dict()}
    if method.whitened:
        return identity
    return {
        **identity,
        **method.to_json(),
        "files": {name: file_hashes[name] for name in sorted(method.files())},
    }


def query_computer(method: IndexMethod, spec: FeatureSpec, directory: Path, model: DiffusionModel):
    """What turns a query (images, buckets) into the raw features the index's scorers take."""
    if method.name in CHECKPOINT_METHODS:
        one = checkpoint_spec(spec, len(method.checkpoints))
        computers = [
            FeatureComputer(checkpoint_model(model, directory / c.file), one) for c in method.checkpoints
        ]
        return CheckpointFeatures(
            computers, [c.learning_rate for c in method.checkpoints], method.name == "retrac", spec
        )
    if method.name == "ekfac":
        from explorer.ekfac import EkfacFactors

        plain = FeatureComputer(model, spec)  # the parameter names and sizes the preconditioner covers
        factors = EkfacFactors.load(directory, model, plain.names)
        return FeatureComputer(
            model, spec, projector=ekfac_projector(factors, plain, method.relative_damping)
        )
    return FeatureComputer(model, spec)


def ekfac_projector(factors, computer: FeatureComputer, relative_damping: float):
    """(H + lambda I)^-1/2 per layer, then the spec's seeded count-sketch (explorer.ekfac.EkfacProjector)."""
    from explorer.ekfac import EkfacProjector

    sizes = {name: computer.params[name].numel() for name in computer.names}
    spec = computer.spec
    return EkfacProjector(factors, computer.names, sizes, spec.proj_dim, spec.proj_seed, relative_damping)
