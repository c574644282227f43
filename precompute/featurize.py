"""Featurize a training set into an index directory; resumable and deterministic.

Work happens in OUT/.partial/: the raw projected features of every (example, bucket) pair go
into a memmap chunk by chunk, and a chunk is marked done only after its rows are on disk. A run
that is killed and started again recomputes only the chunks not marked done; every chunk's
result depends only on its images and the seeds, so the final index is the same bit for bit.
Whitening, normalization, DAS weights and the FAISS files come last; meta.json is written last
of all, and only then is .partial/ removed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from explorer.atomic import explain_os_error, save_npy_atomic, write_json_atomic
from explorer.data import Dataset, to_model_range
from explorer.errors import ExplorerError
from explorer.features import FeatureSpec
from explorer.index import (
    INDEX_TYPES,
    META_NAME,
    STORAGES,
    AttributionIndex,
    FeatureSource,
    LambdaRecord,
    write_index,
)
from explorer.index_meta import DatasetInfo
from explorer.ivf import check_ivf_request
from explorer.model import DiffusionModel
from explorer.scoring import das_weighted, fit_bucket
from explorer.whitening import DEFAULT_RELATIVE_LAMBDA
from precompute.featurizer import Featurizer, default_workers

logger = logging.getLogger(__name__)

PARTIAL_DIR = ".partial"
FEATURES_NAME = "raw_features.npy"  # (B, N, k) float32, only with --keep-features
RESIDUALS_NAME = "raw_residuals.npy"  # (B, N) float32, only with --keep-features --das-weights


@dataclass
class FeaturizeOptions:
    normalize: bool = True  # Diffusion-ReTrac: L2-normalize stored and query vectors
    center: bool = True  # subtract each bucket's mean training feature first (explorer.scoring)
    das_weights: bool = False  # DAS: scale each training row by its residual weight
    relative_lambda: float | None = (
        DEFAULT_RELATIVE_LAMBDA  # None: choose by GCV on held-out training features
    )
    storage: str = "float32"  # float32 (exact) or float16 (half the disk)
    index_type: str = "flat"  # flat (exact search) or ivf (inverted lists, for large training sets)
    ivf_nlist: int | None = None  # IVF lists (None: the rule of explorer.ivf, ~sqrt(N))
    ivf_nprobe: int | None = (
        None  # lists scanned per query (None: calibrated per bucket for recall@10 >= 0.95)
    )
    chunk_size: int = 64  # examples per resumable unit
    max_chunks: int | None = None  # stop after this many new chunks (tests of interruption)
    keep_features: bool = False  # also keep the raw projected features, for `reindex` without gradients
    workers: int | None = None  # featurizing threads (precompute.featurizer); None: default_workers()


@dataclass
class FeaturizeReport:
    directory: Path
    pairs: int  # (example, bucket) gradients computed in this run
    seconds: float
    complete: bool

    @property
    def pairs_per_second(self) -> float:
        return self.pairs / self.seconds if self.seconds > 0 else 0.0


def _partial_config(
    model: DiffusionModel, dataset: Dataset, spec: FeatureSpec, options: FeaturizeOptions
) -> dict:
    """What the partial features depend on: a resumed run must match it exactly."""
    return {
        "model_hash": model.weights_hash,
        "dataset_fingerprint": dataset.fingerprint(),
        "count": len(dataset),
        "spec": spec.to_dict(),
        "das_weights": options.das_weights,
        "chunk_size": options.chunk_size,
    }


def _open_partial(out_dir: Path, config: dict, shape: tuple[int, int, int], das: bool):
    partial = out_dir / PARTIAL_DIR
    config_path = partial / "config.json"
    if config_path.is_file():
        recorded = json.loads(config_path.read_text())
        if recorded != config:
            changed = sorted(k for k in set(recorded) | set(config) if recorded.get(k) != config.get(k))
            raise ExplorerError(
                f"{str(partial)!r} holds an unfinished featurize with other settings (differs in "
                f"{', '.join(changed)}): "
                f"run it with the same settings to resume, or delete {str(partial)!r} to start over"
            )
    else:
        try:
            partial.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise explain_os_error(error, partial) from error
        for name in ("features.npy", "residuals.npy", "done.npy"):
            (partial / name).unlink(missing_ok=True)
        write_json_atomic(config_path, config)
    n_chunks = -(-shape[1] // config["chunk_size"])
    done_path = partial / "done.npy"
    features = _open_memmap(partial / "features.npy", shape)  # (B, N, k)
    residuals = _open_memmap(partial / "residuals.npy", shape[:2]) if das else None  # (B, N)
    done = np.load(done_path, allow_pickle=False) if done_path.is_file() else np.zeros(n_chunks, dtype=bool)
    if done.shape != (n_chunks,):
        raise ExplorerError(
            f"{str(done_path)!r} does not match this run: delete {str(partial)!r} to start over"
        )
    return features, residuals, done, done_path


def _open_memmap(path: Path, shape: tuple[int, ...]) -> np.memmap:
    """Open (or create, with its disk space reserved) a float32 .npy memmap."""
    if path.is_file():
        array = np.lib.format.open_memmap(path, mode="r+")
        if array.shape != shape or array.dtype != np.float32:
            raise ExplorerError(
                f"{str(path)!r} holds {array.shape} {array.dtype}, expected {shape} float32: "
                f"delete {str(path.parent)!r} to start over"
            )
        return array
    try:
        array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
        # Reserve the blocks now: writing into a memmap on a full disk kills the process (SIGBUS)
        # instead of raising, so a full disk must show up here, before any work is done.
        with open(path, "r+b") as handle:
            os.posix_fallocate(handle.fileno(), 0, os.fstat(handle.fileno()).st_size)
    except OSError as error:
        path.unlink(missing_ok=True)
        raise explain_os_error(error, path) from error
    return array


def _check_index_options(options: FeaturizeOptions, count: int) -> None:
    """Refuse bad storage / index options before any gradient is computed."""
    if options.storage not in STORAGES:
        raise ExplorerError(f"unknown storage {options.storage!r}: use one of {', '.join(STORAGES)}")
    if options.index_type not in INDEX_TYPES:
        raise ExplorerError(f"unknown index type {options.index_type!r}: use one of {', '.join(INDEX_TYPES)}")
    if options.index_type == "ivf":
        check_ivf_request(count, options.ivf_nlist, options.ivf_nprobe)
    elif options.ivf_nlist is not None or options.ivf_nprobe is not None:
        raise ExplorerError("--ivf-nlist and --ivf-nprobe apply to --index-type ivf only")


def featurize(
    model: DiffusionModel,
    dataset: Dataset,
    out_dir: str | Path,
    spec: FeatureSpec,
    options: FeaturizeOptions | None = None,
) -> FeaturizeReport:
    """Compute, whiten and index the features of every (example, bucket) pair (options None: the defaults)."""
    out_dir, options = Path(out_dir), options or FeaturizeOptions()
    _check_index_options(options, len(dataset))
    if dataset.resolution != model.sample_size:
        raise ExplorerError(
            f"dataset images are {dataset.resolution}x{dataset.resolution} but the model expects "
            f"{model.sample_size}x{model.sample_size}: load the data at the model's size"
        )
    if (out_dir / META_NAME).is_file() and not (out_dir / PARTIAL_DIR).exists():
        raise ExplorerError(
            f"{str(out_dir)!r} already holds a complete index: choose another --out, or delete it to rebuild"
        )
    workers = default_workers() if options.workers is None else options.workers
    computer = Featurizer(model, spec, chunk_size=options.chunk_size, workers=workers)
    n, nb, k = len(dataset), spec.buckets, spec.proj_dim
    config = _partial_config(model, dataset, spec, options)
    features, residuals, done, done_path = _open_partial(out_dir, config, (nb, n, k), options.das_weights)
    images = torch.from_numpy(to_model_range(dataset.images))  # (N, C, H, W)

    todo = np.flatnonzero(~done)
    if options.max_chunks is not None:
        todo = todo[: options.max_chunks]
    started, pairs = time.time(), 0
    progress = tqdm(total=int(len(todo)) * options.chunk_size, desc="featurize", unit="ex")
    for chunk in todo:
        rows = slice(int(chunk) * options.chunk_size, min(n, (int(chunk) + 1) * options.chunk_size))
        batch = images[rows]
        features[:, rows] = computer.all_bucket_features(batch).numpy().transpose(1, 0, 2)  # (B, c, k)
        if residuals is not None:
            residuals[:, rows] = computer.residual_norms(batch).numpy().T
        features.flush()
        if residuals is not None:
            residuals.flush()
        done[chunk] = True
        save_npy_atomic(done_path, done)  # only after the rows are on disk
        pairs += len(batch) * nb
        progress.update(len(batch))
        progress.set_postfix(grads_per_s=f"{pairs / (time.time() - started):.1f}")
    progress.close()
    seconds = time.time() - started
    if not done.all():
        return FeaturizeReport(out_dir, pairs, seconds, complete=False)

    source = FeatureSource(
        model_hash=model.weights_hash,
        model_path=str(model.path),
        dataset=DatasetInfo(
            dataset.name, len(dataset), dataset.fingerprint(), tuple(dataset.class_names), dataset.resolution
        ),
        spec=spec,
        timesteps=tuple(map(tuple, computer.timesteps)),
        num_train_timesteps=model.num_train_timesteps,
        num_params=computer.num_params,
    )
    if options.keep_features:
        save_npy_atomic(out_dir / FEATURES_NAME, np.asarray(features))
        if residuals is not None:
            save_npy_atomic(out_dir / RESIDUALS_NAME, np.asarray(residuals))
    build_index(out_dir, source, features, residuals, dataset, options)
    del features, residuals
    shutil.rmtree(out_dir / PARTIAL_DIR, ignore_errors=True)
    return FeaturizeReport(out_dir, pairs, seconds, complete=True)


def build_index(
    out_dir: Path,
    source: FeatureSource,
    features: np.ndarray,
    residuals: np.ndarray | None,
    dataset: Dataset,
    options: FeaturizeOptions,
) -> None:
    """Raw features (B, N, k) [+ residuals (B, N)] -> lambda, whitening, normalization, DAS, FAISS files."""
    bucket_vectors, factors, centers, lambdas = [], [], [], []
    for bucket in tqdm(range(features.shape[0]), desc="whiten", unit="bucket"):
        phi = np.asarray(features[bucket])  # (N, k)
        if not np.isfinite(phi).all():
            raise ExplorerError(
                f"bucket {bucket} has NaN/inf features: the model produces non-finite gradients"
            )
        scorer, choice = fit_bucket(
            phi, options.relative_lambda, options.center, options.normalize, seed=source.spec.proj_seed
        )
        psi = scorer.vectors(phi)
        if residuals is not None and options.das_weights:
            psi = das_weighted(psi, residuals[bucket])
        bucket_vectors.append(psi)
        factors.append(scorer.factor)
        centers.append(scorer.center)
        lambdas.append(
            LambdaRecord(choice.value, choice.relative, choice.method, tuple(map(tuple, choice.curve)))
        )
    write_index(
        out_dir,
        source,
        lambdas,
        options.normalize,
        bool(options.das_weights),
        bucket_vectors,
        factors,
        dataset.images,
        dataset.labels,
        dataset.ids,
        centers=centers if options.center else None,
        storage=options.storage,
        index_type=options.index_type,
        ivf_nlist=options.ivf_nlist,
        ivf_nprobe=options.ivf_nprobe,
    )


def reindex(source_dir: str | Path, out_dir: str | Path, options: FeaturizeOptions) -> Path:
    """A new index from the raw features an earlier featurize kept (--keep-features): no gradients.

    Other normalization, DAS, lambda, storage or index type (flat <-> ivf)."""
    source_dir, out_dir = Path(source_dir), Path(out_dir)
    index = AttributionIndex.load(source_dir)
    _check_index_options(options, index.meta.count)
    features_path = source_dir / FEATURES_NAME
    if not features_path.is_file():
        raise ExplorerError(
            f"{str(source_dir)!r} kept no raw features: featurize it again with --keep-features"
        )
    if options.das_weights and not (source_dir / RESIDUALS_NAME).is_file():
        raise ExplorerError(
            f"{str(source_dir)!r} kept no DAS residuals: featurize it again with --keep-features "
            "--das-weights"
        )
    if (out_dir / META_NAME).is_file():
        raise ExplorerError(
            f"{str(out_dir)!r} already holds a complete index: choose another --out, or delete it to rebuild"
        )
    features = np.load(features_path, mmap_mode="r", allow_pickle=False)
    residuals = (
        np.load(source_dir / RESIDUALS_NAME, mmap_mode="r", allow_pickle=False)
        if options.das_weights
        else None
    )
    dataset = Dataset(
        name=index.meta.dataset.name,
        images=index.train_images,
        labels=index.train_labels,
        ids=index.train_ids,
        class_names=index.class_names,
    )
    build_index(out_dir, index.meta.source, features, residuals, dataset, options)
    return out_dir
