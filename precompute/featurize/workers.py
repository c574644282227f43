"""The offline featurizer: the engine's FeatureComputer plus what only a featurize of a whole training set
needs.

- Worker threads: the computer's chunks are dealt round-robin to `workers` threads, each with its own copy of
  the model (hooks and functional_call are per module) and torch's intra-op threads divided among them. On 2
  cores, two single-threaded workers featurize ~1.1x faster than one chunk at a time on both cores: many of
  the model's operations are too small to keep two threads busy.
- glibc malloc settings that keep freed memory for the next chunk (precompute.featurize.allocator).

Calibration (precompute.featurize.calibration) picks the spec's exact coordinates and bf16 range before this
runs; the features themselves are the engine's, so queries featurized by the explorer match them.
"""

from __future__ import annotations

import copy
import dataclasses
from concurrent.futures import ThreadPoolExecutor

import torch

from explorer.errors import ExplorerError
from explorer.features import FeatureComputer, FeatureSpec, every_bucket
from explorer.model import DiffusionModel
from explorer.noising import forward_noise
from precompute.featurize.allocator import keep_freed_memory


def default_workers() -> int:
    """2 where torch has at least 2 intra-op threads (measured on 2 cores; more workers are not measured),
    else 1."""
    return min(2, torch.get_num_threads())


class Featurizer:
    """features / all_bucket_features / residual_norms of a FeatureComputer, its chunks run on worker
    threads."""

    def __init__(
        self, model: DiffusionModel, spec: FeatureSpec, chunk_size: int = 64, workers: int = 1, projector=None
    ):
        """projector: FeatureComputer's override (shared by the workers: projecting keeps no state)."""
        if workers < 1:
            raise ExplorerError(f"workers {workers} must be >= 1, e.g. --workers {default_workers()}")
        keep_freed_memory()  # no page faults on every chunk's fresh activations
        self.computer = FeatureComputer(model, spec, chunk_size, projector=projector)
        self.workers = workers
        self._replicas = [
            FeatureComputer(
                dataclasses.replace(model, unet=copy.deepcopy(model.unet)),
                spec,
                chunk_size,
                quiet=True,
                projector=projector,
            )
            for _ in range(workers - 1)
        ]

    @property
    def spec(self) -> FeatureSpec:
        return self.computer.spec

    @property
    def timesteps(self) -> list[list[int]]:
        return self.computer.timesteps

    @property
    def num_params(self) -> int:
        return self.computer.num_params

    @property
    def dim(self) -> int:
        return self.spec.proj_dim

    def features(self, images: torch.Tensor, buckets: torch.Tensor, context=None) -> torch.Tensor:
        """What FeatureComputer.features returns, its chunks dealt to the worker threads."""
        chunks = self.computer.plan(images, buckets, context)
        workers = min(self.workers, len(chunks))
        if workers <= 1:
            return self.computer.combine(
                len(images), chunks, self.computer.run_chunks(images, buckets, chunks, context)
            )
        computers = [self.computer, *self._replicas][:workers]

        def run(worker: int) -> list[torch.Tensor]:
            return computers[worker].run_chunks(images, buckets, chunks[worker::workers], context)

        threads = torch.get_num_threads()  # a process-wide setting: divided among the workers, restored after
        torch.set_num_threads(max(1, threads // workers))
        try:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="featurize") as pool:
                per_worker = list(pool.map(run, range(workers)))
        finally:
            torch.set_num_threads(threads)
        parts = [per_worker[index % workers][index // workers] for index in range(len(chunks))]
        return self.computer.combine(len(images), chunks, parts)

    def all_bucket_features(self, images: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """images (N, C, H, W), context (N, L, D) or None -> phi (N, buckets, k)."""
        return every_bucket(self.features, images, self.spec.buckets, context)

    def residual_norms(self, images: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return residual_norms(self.computer, images, context)


@torch.no_grad()
def residual_norms(
    computer: FeatureComputer, images: torch.Tensor, context: torch.Tensor | None = None
) -> torch.Tensor:
    """(N, C, H, W) -> (N, buckets): RMS of eps_theta(x_t, t) - eps over each bucket's (t, r) pairs.

    DAS weights each training example's influence by its residual (the Newton step of
    removing it moves the output by J_q H^-1 J_i^T r_i); this is the per-bucket magnitude.
    """
    computer._check(images, context)
    context = None if context is None else context.to(computer.device)
    nb, draws = computer.spec.buckets, computer.draw_timesteps.shape[1]
    out = torch.zeros(len(images), nb)
    for b in range(nb):
        t = computer.draw_timesteps[b].to(computer.device)  # (mR,)
        for start in range(0, len(images), computer.chunk_size):
            x0 = images[start : start + computer.chunk_size].to(computer.device)  # (c, C, H, W)
            c = len(x0)
            rows_context = None if context is None else context[start : start + c].repeat_interleave(draws, 0)
            abar = computer.abar[t].view(1, -1, 1, 1, 1)
            noisy = forward_noise(x0.unsqueeze(1), computer.noise[b].unsqueeze(0), abar)  # (c, mR, C, H, W)
            prediction = computer.model.eps(noisy.flatten(0, 1), t.repeat(c), rows_context).view(c, draws, -1)
            residual = prediction - computer.noise[b].flatten(1).unsqueeze(0)
            out[start : start + c, b] = residual.pow(2).mean(dim=(1, 2)).sqrt().cpu()
    return out
