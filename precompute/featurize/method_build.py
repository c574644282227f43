"""The featurize side of each index method (explorer.index_methods): which gradients a training row is made
of, what is copied into the index (checkpoints, EK-FAC factors), and how each bucket's scorer is fitted.

- trak: the output function's features; the kernel and rows from the same features.
- das: one pass computes [phi_f, phi_loss] per pair (2k columns); the kernel (and the query side) from
  phi_f, the stored rows are phi_loss whitened by that kernel, centered by their own mean.
- tracin / retrac: C checkpoints of the training run's history (precompute.train keeps them), each sketched
  to k / C at its own weights; no kernel (no whitening factor is stored).
- ekfac: factors fitted on a seeded subset of the training data, stored in the index; the rows are
  preconditioned loss gradients; no kernel.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from explorer.errors import ExplorerError
from explorer.features import FeatureComputer, FeatureSpec
from explorer.index_methods import (
    CHECKPOINT_METHODS,
    DAS_KERNELS,
    METHODS,
    Checkpoint,
    CheckpointFeatures,
    IndexMethod,
    StackedFeatures,
    checkpoint_file,
    checkpoint_model,
    checkpoint_spec,
    ekfac_projector,
)
from explorer.model import DiffusionModel
from explorer.scoring import BucketScorer
from explorer.whitening import LambdaChoice
from precompute.featurize.collective import Collective
from precompute.featurize.sharded_fit import bucket_mean, fit_bucket_chunks
from precompute.featurize.workers import Featurizer

logger = logging.getLogger(__name__)


@dataclass
class MethodOptions:
    name: str = "trak"  # one of explorer.index_methods.METHODS
    checkpoints: str | None = None  # tracin / retrac: the training run's OUT/checkpoint/history folder
    num_checkpoints: int = 4  # tracin / retrac: evenly spaced over the history, the last one included
    relative_damping: float = 1e-3  # ekfac: lambda / mean eigenvalue
    fit_images: int = 1000  # ekfac: training images the factors are fitted on (seeded subset)
    fit_samples_per_image: int = 4  # ekfac: (t, eps, v) draws per fitting image
    fit_seed: int = 0
    das_kernel: str = "output"  # das: the kernel from the output function's gradients, or the rows' (loss)

    def check(self) -> None:
        if self.name not in METHODS:
            raise ExplorerError(f"unknown --method {self.name!r}: use one of {', '.join(METHODS)}")
        if self.name in CHECKPOINT_METHODS and self.checkpoints is None:
            raise ExplorerError(
                f"--method {self.name} needs --checkpoints DIR: the training run's checkpoint/history folder "
                "(precompute train keeps the weights of every checkpoint there)"
            )
        if self.name not in CHECKPOINT_METHODS and self.checkpoints is not None:
            raise ExplorerError(f"--checkpoints applies to --method tracin or retrac, not {self.name}")
        if self.das_kernel not in DAS_KERNELS:
            raise ExplorerError(f"--das-kernel {self.das_kernel!r}: use one of {', '.join(DAS_KERNELS)}")
        if self.relative_damping <= 0:
            raise ExplorerError(f"--damping {self.relative_damping} must be > 0, e.g. 1e-3")


def history_checkpoints(directory: Path, count: int) -> list[tuple[Path, int, float]]:
    """`count` evenly spaced (path, step, learning rate) of a training history folder, the last included."""
    paths = sorted(directory.glob("step_*.safetensors")) if directory.is_dir() else []
    if not paths:
        raise ExplorerError(
            f"--checkpoints {str(directory)!r} holds no step_*.safetensors: pass the checkpoint/history "
            "folder of a `python -m precompute train` run (runs before checkpoints were kept need retraining)"
        )
    if count > len(paths):
        raise ExplorerError(
            f"--num-checkpoints {count} exceeds the {len(paths)} checkpoints in {str(directory)!r}"
        )
    picks = np.round(np.linspace(-1, len(paths) - 1, count + 1)[1:]).astype(int)  # spaced >= 1 apart
    out = []
    for index in picks:
        with safe_open(str(paths[index]), "pt") as handle:
            meta = handle.metadata() or {}
        if "step" not in meta or "learning_rate" not in meta:
            raise ExplorerError(f"{str(paths[index])!r} has no step / learning_rate metadata: retrain")
        out.append((paths[index], int(meta["step"]), float(meta["learning_rate"])))
    return out


def method_featurizer(
    model: DiffusionModel,
    spec: FeatureSpec,
    options: MethodOptions,
    out_dir: Path,
    images: torch.Tensor,
    chunk_size: int,
    workers: int,
):
    """(the training side's featurizer, the IndexMethod to record); files the method stores are written into
    out_dir now (checkpoint copies, EK-FAC factors), so a resumed run finds them."""
    options.check()
    loss = dataclasses.replace(spec, output="loss")
    if options.name == "trak":
        return Featurizer(model, spec, chunk_size, workers), IndexMethod()
    if options.name == "das":
        kernel, rows = (
            Featurizer(model, spec, chunk_size, workers),
            Featurizer(model, loss, chunk_size, workers),
        )
        return StackedFeatures(kernel, rows), IndexMethod("das", das_kernel=options.das_kernel)
    if options.name in CHECKPOINT_METHODS:
        chosen = history_checkpoints(Path(options.checkpoints), options.num_checkpoints)
        one = checkpoint_spec(spec, len(chosen))
        records, computers = [], []
        out_dir.mkdir(parents=True, exist_ok=True)
        for path, step, lr in chosen:
            shutil.copyfile(path, out_dir / checkpoint_file(step))
            records.append(Checkpoint(checkpoint_file(step), step, lr))
            computers.append(Featurizer(checkpoint_model(model, path), one, chunk_size, workers))
        logger.info("%s over checkpoints at steps %s", options.name, [r.step for r in records])
        features = CheckpointFeatures(
            computers, [r.learning_rate for r in records], options.name == "retrac", spec
        )
        return features, IndexMethod(options.name, checkpoints=tuple(records))
    from explorer.ekfac import FACTOR_FILES, EkfacFactors
    from explorer.ekfac_fit import fit_ekfac

    if model.latent is not None:
        raise ExplorerError(
            "--method ekfac fits its factors on pixel models only (the fit draws no prompts): use trak or "
            "das for a text-to-image model"
        )
    plain = FeatureComputer(model, loss)  # the parameters the factors cover (names, sizes), no replicas
    if all((out_dir / name).is_file() for name in FACTOR_FILES):
        factors = EkfacFactors.load(out_dir, model, plain.names)  # a resumed run: fitted already
    else:
        generator = torch.Generator().manual_seed(options.fit_seed)
        count = min(options.fit_images, len(images))
        subset = images[torch.randperm(len(images), generator=generator)[:count]]
        factors = fit_ekfac(model, subset, options.fit_samples_per_image, options.fit_seed, names=plain.names)
        factors.save(out_dir)
    projector = ekfac_projector(factors, plain, options.relative_damping)
    method = IndexMethod(
        "ekfac",
        relative_damping=options.relative_damping,
        fit_images=min(options.fit_images, len(images)),
        fit_seed=options.fit_seed,
    )
    return Featurizer(model, loss, chunk_size, workers, projector=projector), method


def unit_blocks(features: np.ndarray, parts: int) -> np.ndarray:
    """(..., k) -> the same with each of its `parts` column blocks scaled to unit norm (ReTrac's
    per-checkpoint normalization of TracIn's concatenated sketches), float32."""
    blocks = np.asarray(features, dtype=np.float32).reshape(*features.shape[:-1], parts, -1)
    norms = np.linalg.norm(blocks, axis=-1, keepdims=True)
    return (blocks / np.maximum(norms, 1e-30)).reshape(features.shape)


class ColumnView:
    """Columns [start, stop) of a chunk store: DAS's kernel features and its rows live side by side."""

    def __init__(self, chunks, start: int, stop: int):
        self.chunks, self.start, self.stop = chunks, start, stop
        self.count, self.n_chunks, self.buckets = chunks.count, chunks.n_chunks, chunks.buckets
        self.dim, self.das = stop - start, False

    def rows(self, chunk: int) -> slice:
        return self.chunks.rows(chunk)

    def features(self, chunk: int, bucket: int) -> np.ndarray:
        return np.asarray(self.chunks.features(chunk, bucket)[:, self.start : self.stop])


def fit_method_bucket(
    chunks,
    bucket: int,
    method: IndexMethod,
    collective: Collective,
    relative_lambda: float | None,
    center: bool,
    normalize: bool,
    seed: int,
):
    """(the query side's scorer, the lambda choice, the stored rows' chunks, the rows' scorer) of a bucket."""
    if method.name == "trak":
        scorer, choice = fit_bucket_chunks(
            chunks, bucket, collective, relative_lambda, center, normalize, seed
        )
        return scorer, choice, chunks, scorer
    if method.name == "das":
        k = chunks.dim // 2
        kernel, rows = ColumnView(chunks, 0, k), ColumnView(chunks, k, 2 * k)
        fit = relative_lambda, center, normalize, seed
        if method.das_kernel == "loss":  # the rows' empirical Fisher; the query keeps its own center
            row_scorer, choice = fit_bucket_chunks(rows, bucket, collective, *fit)
            query_center = bucket_mean(kernel, bucket, collective) if center else None
            return BucketScorer(row_scorer.factor, query_center, normalize), choice, rows, row_scorer
        scorer, choice = fit_bucket_chunks(kernel, bucket, collective, *fit)
        row_center = bucket_mean(rows, bucket, collective) if center else None
        return scorer, choice, rows, BucketScorer(scorer.factor, row_center, normalize)
    # tracin, retrac, ekfac: no kernel, no factor file
    mean = bucket_mean(chunks, bucket, collective) if center else None
    scorer = BucketScorer(None, mean, normalize)
    return scorer, LambdaChoice(value=0.0, relative=0.0, method="none"), chunks, scorer
