"""Per-example projected gradients of an output function at timestep buckets (torch.func vmap).

For bucket b with timesteps S_b and R noise draws (DESIGN section 1):

    phi_i^b = P^T grad_theta mean_{t in S_b, r < R} f(theta; x_i, t, eps_{t,r})

The noise eps_{t,r} comes from a bank seeded by (noise_seed, t, r), shared by every training example and
query (D-TRAK); one code path featurizes both sides, which keeps them consistent by construction.

Two ways to get phi, chosen by spec.projector:
- countsketch / gaussian: exact per-example gradients with torch.func vmap(grad), then projected
  (the exact reference);
- kronecker: one batched forward and backward over every (image, t, r) row, projecting each layer's
  activations and output gradients separately (explorer.kronecker); the full per-example gradients
  are never formed.

Offline featurization runs these chunks on worker threads (precompute.featurize.workers); the engine runs
them in turn.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
from torch.func import functional_call, grad, vmap

from explorer.errors import ExplorerError
from explorer.kronecker import KroneckerProjector
from explorer.model import DiffusionModel
from explorer.noising import forward_noise
from explorer.outputs import get_output_function, region_output
from explorer.projector import PartlyExactProjector, kept_mask, make_projector
from explorer.spec import (  # noqa: F401 (re-exported: the spec is part of this module's interface)
    NAME_LIST_FIELDS,
    PRECISIONS,
    FeatureSpec,
    bucket_of_timestep,
    bucket_timesteps,
    check_precision_projector,
    noise_bank,
    select_params,
)

logger = logging.getLogger(__name__)
# (image, t, r) rows per hooked forward of the kronecker path: 80-240 ran within noise, 320 ~15% slower
# (bench/featurize_vs_traker.py's spec, 10 timesteps per image)
KRONECKER_ROWS = 80


def native_bf16() -> bool:
    """Whether oneDNN runs bfloat16 convolutions and matmuls natively on this CPU (what makes
    spec.precision bf16 pay)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a private torch API: if it moves, assume no
        return False


def warn_precision(spec: FeatureSpec, device: torch.device) -> None:
    """Say what a reduced precision costs (accuracy at high t; speed on a CPU without native bf16)."""
    if spec.precision == "bf16":
        logger.warning(
            "spec.precision bf16 loses the example-specific gradient at high timesteps (at t = 950 its "
            "scores agree with exact ones at ~0.6-0.75 instead of ~0.995): use it for low timesteps or "
            "timestep-averaged outputs only (bench/precision_agreement.py)"
        )
    if spec.precision != "fp32" and device.type == "cpu" and not native_bf16():
        logger.warning(
            "this CPU has no native bfloat16 arithmetic (AVX512-BF16 or AMX): spec.precision "
            f"{spec.precision} is emulated here and slower than fp32"
        )


def choose_projector(spec: FeatureSpec, unet, params: dict, override=None) -> tuple:
    """(projector, kronecker) of a computer over `params` (name -> tensor, in model order): the override
    (EK-FAC: preconditioned, then sketched) or the spec's projector, with calibrated exact coordinates in
    front of it; kronecker forms its sketch from layer captures instead (the second element)."""
    names = list(params)
    if override is not None:
        if spec.projector != "countsketch" or spec.exact_params or spec.exact_layers:
            raise ExplorerError(
                f"a projector override (EK-FAC) replaces the count-sketch of exact gradients, not the "
                f"{spec.projector!r} projector or calibrated exact parameters: featurize it with the default "
                "--projector countsketch and without --calibrate",
                ("spec.projector",),
            )
        return override, None  # it takes the gradients in `names` order
    if spec.projector == "kronecker":  # checks exact_params and exact_layers itself
        kronecker = KroneckerProjector(
            unet,
            spec.proj_dim,
            spec.proj_seed,
            kept_params=spec.exact_params,
            exact_layers=spec.exact_layers,
            params=names,
        )
        return None, kronecker
    sizes = {name: p.numel() for name, p in params.items()}
    total = sum(sizes.values())
    kept, kept_width = kept_mask(names, sizes, spec.exact_params, spec.proj_dim)
    inner = make_projector(spec.projector, total - kept_width, spec.proj_dim - kept_width, spec.proj_seed)
    return (PartlyExactProjector(kept, inner) if kept_width else inner), None


def every_bucket(
    features, images: torch.Tensor, buckets: int, context: torch.Tensor | None = None
) -> torch.Tensor:
    """features(pairs, buckets, context) over every (image, bucket) pair of images (N, C, H, W) ->
    (N, buckets, k); context (N, L, D): each image's text conditioning (None: an unconditional model)."""
    n = len(images)
    pairs = images.repeat_interleave(buckets, dim=0)  # (N B, C, H, W), example-major
    paired = None if context is None else context.repeat_interleave(buckets, dim=0)
    return features(pairs, torch.arange(buckets).repeat(n), paired).view(n, buckets, -1)


@dataclass(frozen=True)
class Chunk:
    """One forward (or vmap call) of features(): the pairs `rows`, over their bucket's (t, r) columns
    `columns` (None: all of them), in bf16 or fp32."""

    rows: torch.Tensor
    columns: torch.Tensor | None = None
    bf16: bool = False
    share: float = 1.0  # len(columns) / the bucket's columns: f averages over columns, phi sums the parts


class FeatureComputer:
    """Projected per-example gradients phi^b(x) for a frozen model and a FeatureSpec."""

    def __init__(
        self,
        model: DiffusionModel,
        spec: FeatureSpec,
        chunk_size: int = 64,
        *,
        quiet: bool = False,
        projector=None,
    ):
        """quiet: skip the precision warnings (a worker's copy of a computer that has given them);
        projector: one with CountSketchProjector's project() over this computer's parameters instead of the
        spec's (explorer.ekfac: preconditioned, then sketched)."""
        self.model, self.spec, self.chunk_size = model, spec, chunk_size
        self.output_fn = get_output_function(spec.output)
        T = model.num_train_timesteps
        self.timesteps = bucket_timesteps(spec, T)
        shape = (model.channels, model.sample_size, model.sample_size)
        self.device = next(model.unet.parameters()).device  # inputs move here, features come back to the CPU
        # (B_n, mR, C, H, W), drawn on the CPU (seeded, the same on every device), then moved
        self.noise = noise_bank(spec, self.timesteps, shape).to(self.device)
        per_draw = torch.tensor(self.timesteps).repeat_interleave(spec.noise_draws, dim=1)  # (B_n, mR)
        self.draw_timesteps = per_draw
        self.abar = model.scheduler.alphas_cumprod.to(self.device, torch.float32)
        every = {name: p.detach() for name, p in model.unet.named_parameters()}
        self.names = select_params(list(every), spec.params)  # the parameters whose gradient phi projects
        self.params = {name: every[name] for name in self.names}
        self._frozen = {name: p for name, p in every.items() if name not in self.params}  # constants of f
        self.num_params = sum(p.numel() for p in self.params.values())
        spec.check(T)
        if not quiet:
            warn_precision(spec, self.device)
        self.projector, self.kronecker = choose_projector(spec, model.unet, self.params, projector)

    def for_region(self, mask: torch.Tensor) -> FeatureComputer:
        """This computer with its output function restricted to a region, mask (H, W) of 0/1 (region
        attribution: the query's gradient of the output inside the region; the model and projector are
        shared)."""
        clone = copy.copy(self)
        clone.output_fn = region_output(self.output_fn, mask)
        return clone

    def _noisy(self, x0: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        abar = self.abar[timesteps].view(-1, 1, 1, 1)
        return forward_noise(x0.unsqueeze(0), noise, abar)  # x_t, DDPM eq. 4

    def _output(
        self, params: dict, x0: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor, context=None
    ):
        """f averaged over one example's (t, r) pairs; x0 (C, H, W), timesteps (mR,), noise (mR, C, H, W),
        context (L, D) or None."""
        condition = (
            {} if context is None else {"encoder_hidden_states": context.expand(len(timesteps), -1, -1)}
        )
        noisy = self._noisy(x0, timesteps, noise)
        prediction = functional_call(
            self.model.unet, {**self._frozen, **params}, (noisy, timesteps), condition
        )
        return self.output_fn(prediction.sample, noise)

    def _check(self, images: torch.Tensor, context: torch.Tensor | None = None) -> None:
        self.model.check_context(context, len(images))
        expected = (self.model.channels, self.model.sample_size, self.model.sample_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ExplorerError(
                f"images of shape {tuple(images.shape)} do not fit the model: expected (N, "
                f"{', '.join(map(str, expected))})"
            )
        if not torch.isfinite(images).all():
            raise ExplorerError("images contain NaN or infinite values")

    def features(self, images: torch.Tensor, buckets: torch.Tensor, context: torch.Tensor | None = None):
        """images (P, C, H, W) in [-1, 1] (latents for a latent model), buckets (P,), context (P, L, D)
        (a text model's prompt embeddings, else None) -> phi (P, k): one feature per (image, bucket) pair."""
        chunks = self.plan(images, buckets, context)
        return self.combine(len(images), chunks, self.run_chunks(images, buckets, chunks, context))

    def plan(self, images: torch.Tensor, buckets: torch.Tensor, context=None) -> list[Chunk]:
        """Check the pairs and split them into the forwards (chunks) that featurize them."""
        self._check(images, context)
        if tuple(buckets.shape) != (len(images),):
            raise ExplorerError(
                f"buckets of shape {tuple(buckets.shape)} do not pair with {len(images)} images: give "
                "one bucket each"
            )
        if len(buckets):
            low, high = int(buckets.min()), int(buckets.max())
            if low < 0 or high >= self.spec.buckets:
                raise ExplorerError(
                    f"bucket {high if high >= self.spec.buckets else low} is out of range: this spec has "
                    f"buckets 0..{self.spec.buckets - 1}"
                )
        return self._plan(buckets)

    def combine(self, pairs: int, chunks: list[Chunk], parts: list[torch.Tensor]) -> torch.Tensor:
        """The chunks' parts -> phi (pairs, k)."""
        out = torch.zeros(pairs, self.spec.proj_dim)
        for chunk, part in zip(
            chunks, parts
        ):  # under mixed a pair's bf16 and fp32 columns come from two chunks
            out.index_add_(0, chunk.rows, part)
        return out

    def _plan(self, buckets: torch.Tensor) -> list[Chunk]:
        """The forwards that featurize pairs with these buckets.

        Under precision mixed each bucket's pairs run twice, once over the (t, r) columns below bf16_below
        in bf16 and
        once over the rest in fp32, so that every forward runs in one precision at full size: every output
        function
        is a mean over its columns (explorer.outputs), so phi is the two column sets' phi weighted by
        their shares of
        the columns. (A chunk that held both sets as two smaller forwards ran no faster; only a bucket that
        straddles bf16_below is split at all.)
        """
        pairs = torch.arange(len(buckets))
        if self.kronecker is None:
            return [Chunk(rows) for rows in pairs.split(self.chunk_size) if len(rows)]
        if self.spec.precision != "mixed":
            step = self._kronecker_step(self.draw_timesteps.shape[1])
            return [
                Chunk(rows, bf16=self.spec.precision == "bf16") for rows in pairs.split(step) if len(rows)
            ]
        order = torch.argsort(buckets, stable=True)
        per_bucket = torch.bincount(buckets, minlength=self.spec.buckets).tolist()
        chunks = []
        for bucket, rows in enumerate(order.split(per_bucket)):
            draws = self.draw_timesteps[bucket]
            for bf16 in (True, False):
                columns = torch.nonzero((draws < self.spec.bf16_below) == bf16).flatten()
                if len(rows) and len(columns):
                    chunks += [
                        Chunk(part, columns, bf16, len(columns) / len(draws))
                        for part in rows.split(self._kronecker_step(len(columns)))
                    ]
        return chunks

    def _kronecker_step(self, rows_per_pair: int) -> int:
        """Pairs per chunk of the kronecker path: rows per forward are pairs x rows_per_pair; more than
        ~80 fall out
        of cache."""
        return max(1, min(self.chunk_size, KRONECKER_ROWS // rows_per_pair))

    def run_chunks(
        self, images: torch.Tensor, buckets: torch.Tensor, chunks: list[Chunk], context=None
    ) -> list:
        """Each chunk's part of the features of images[chunk.rows], on this computer's model."""
        out = []
        for chunk in chunks:
            x0, b = images[chunk.rows], buckets[chunk.rows]  # exact_gradients and _capture move them
            c = None if context is None else context[chunk.rows]
            if self.kronecker is None:
                grads = self.exact_gradients(x0, b, c)
                out.append(self.projector.project([grads[name] for name in self.names]).cpu())
                continue
            timesteps, noise = self.draw_timesteps[b], self.noise[b]
            if chunk.columns is not None:
                timesteps, noise = timesteps[:, chunk.columns], noise[:, chunk.columns]
            phi = self.kronecker.project(*self._capture(x0, timesteps, noise, chunk.bf16, c), groups=len(x0))
            out.append((phi * chunk.share if chunk.share != 1 else phi).cpu())
        return out

    def exact_gradients(
        self, x0: torch.Tensor, buckets: torch.Tensor, context=None
    ) -> dict[str, torch.Tensor]:
        """Unprojected per-example gradients (vmap): parameter name -> (P, *shape) for x0 (P, C, H, W),
        buckets (P,), context (P, L, D) or None."""
        self.model.check_context(context, len(x0))
        per_example = vmap(grad(self._output), in_dims=(None, 0, 0, 0, None if context is None else 0))
        timesteps = self.draw_timesteps[buckets].to(self.device)
        context = None if context is None else context.to(self.device)
        return per_example(self.params, x0.to(self.device), timesteps, self.noise[buckets], context)

    def capture_rows(self, x0: torch.Tensor, buckets: torch.Tensor):
        """One hooked forward over all (image, t, r) rows of P pairs -> (sum_i f_i, the layer records).

        x0 (P, C, H, W), buckets (P,). Rows are image-major: pair i owns rows [i mR, (i + 1) mR).
        Each f_i is the output function of pair i over its own rows (the mean over its (t, r)),
        so d (sum_i f_i) / d row = d f_i / d row: rows do not interact in the UNet.
        """
        if self.spec.precision == "mixed":
            raise ExplorerError(
                "precision mixed runs a bucket's bf16 and fp32 timesteps as separate forwards: use "
                "features(), or timestep_features() for one timestep"
            )
        return self._capture(
            x0, self.draw_timesteps[buckets], self.noise[buckets], self.spec.precision == "bf16"
        )

    def _capture(
        self, x0: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor, bf16: bool, context=None
    ):
        """capture_rows on explicit rows: timesteps (P, n), noise (P, n, C, H, W), context (P, L, D) or None,
        under bfloat16 autocast if bf16."""
        pairs, draws = timesteps.shape
        x0, timesteps = x0.to(self.device), timesteps.to(self.device)  # callers pass CPU tensors
        rows_context = None if context is None else context.to(self.device).repeat_interleave(draws, dim=0)
        abar = self.abar[timesteps].view(pairs, draws, 1, 1, 1)
        noisy = forward_noise(x0.unsqueeze(1), noise, abar)  # x_t, DDPM eq. 4; (P, n, C, H, W)

        def forward() -> torch.Tensor:
            with torch.autocast(noisy.device.type, dtype=torch.bfloat16, enabled=bf16):
                prediction = self.model.eps(noisy.flatten(0, 1), timesteps.flatten(), rows_context)
            return prediction.float().view(pairs, draws, *noise.shape[2:])

        prediction, records = self.kronecker.capture(forward)
        with torch.enable_grad():
            total = vmap(self.output_fn)(prediction, noise).sum()
        return total, records

    def timestep_features(self, images: torch.Tensor, bucket: int, timestep: int, bf16: bool) -> torch.Tensor:
        """(P, k): kronecker features of images (P, C, H, W) at one timestep of a bucket alone (its R
        noise draws),
        all in bf16 or all in fp32; what precompute.featurize.calibration compares to choose bf16_below."""
        if self.kronecker is None:
            raise ExplorerError(
                f"timestep features need the kronecker projector, not {self.spec.projector!r}"
            )
        columns = self.draw_timesteps[bucket] == timestep  # (mR,)
        if not bool(columns.any()):
            raise ExplorerError(
                f"timestep {timestep} is not one of bucket {bucket}'s: {self.timesteps[bucket]}"
            )
        pairs = len(images)
        timesteps = self.draw_timesteps[bucket][columns].expand(pairs, -1)
        noise = self.noise[bucket][columns].expand(pairs, -1, -1, -1, -1)  # (P, R, C, H, W)
        total, records = self._capture(images, timesteps, noise, bf16)
        return self.kronecker.project(total, records, groups=pairs)

    def all_bucket_features(self, images: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """images (N, C, H, W), context (N, L, D) or None -> phi (N, buckets, k)."""
        return every_bucket(self.features, images, self.spec.buckets, context)
