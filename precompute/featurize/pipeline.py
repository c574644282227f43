"""Featurize a training set into an index directory; resumable, deterministic, and sharded under torchrun.

Work happens in OUT/.partial/: the raw projected features of every chunk of examples go into one file
per chunk (precompute.featurize.chunks), written atomically, so a chunk is done when its file exists. A
run that is killed and started again, with any number of processes, recomputes only the missing chunks;
every chunk's result depends only on its images and the seeds, so the final index is the same bit for
bit. Under torchrun the missing chunks are dealt round-robin to the ranks, and each bucket's mean and
kernel are summed over the ranks (precompute.featurize.sharded_fit); rank 0 then whitens, normalizes,
applies DAS weights and writes the FAISS files, one bucket at a time through a memmap, and meta.json last
of all; only then is .partial/ removed.
"""

from __future__ import annotations

import errno
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from explorer.atomic import explain_os_error, write_json_atomic
from explorer.data import Dataset
from explorer.device import cuda_chunk_size
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
from explorer.index_methods import IndexMethod
from explorer.ivf import check_ivf_request
from explorer.model import DiffusionModel
from explorer.training_inputs import prompt_batch, training_inputs, training_prompts
from explorer.whitening import DEFAULT_RELATIVE_LAMBDA
from precompute.featurize.chunks import ArrayChunks, ChunkFiles, stack
from precompute.featurize.collective import Collective
from precompute.featurize.method_build import MethodOptions, fit_method_bucket, method_featurizer, unit_blocks
from precompute.featurize.sharded_fit import bucket_vectors
from precompute.featurize.workers import default_workers

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
    ivf_on_disk: bool = (
        False  # IVF lists in bucket_BB.ivfdata files (FAISS on-disk merge), for indexes past RAM
    )
    chunk_size: int = 64  # examples per resumable unit
    max_chunks: int | None = None  # stop after this many new chunks (tests of interruption)
    keep_features: bool = False  # also keep the raw projected features, for `reindex` without gradients
    workers: int | None = None  # featurizing threads (precompute.featurize.workers); None: default_workers()
    method: MethodOptions = field(default_factory=MethodOptions)  # trak, das, tracin, retrac, ekfac


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
        **({"method": asdict(options.method)} if options.method.name != "trak" else {}),
    }


def _open_partial(out_dir: Path, config: dict, chunks: ChunkFiles, collective: Collective) -> None:
    """Create OUT/.partial with its config (rank 0), or check that a resumed one has the same settings."""
    partial = out_dir / PARTIAL_DIR
    config_path = partial / "config.json"
    if collective.is_main and not config_path.is_file():
        try:
            chunks.directory.mkdir(parents=True, exist_ok=True)
            write_json_atomic(config_path, config)
        except OSError as error:
            raise explain_os_error(error, partial) from error
    collective.barrier()
    recorded = json.loads(config_path.read_text())
    if recorded != config:
        changed = ", ".join(
            f"{name} ({was!r} there, {now!r} now)" for name, was, now in _differences(recorded, config)
        )
        raise ExplorerError(
            f"{str(partial)!r} holds an unfinished featurize with other settings (differs in {changed}): "
            f"run it with the same settings to resume, or delete {str(partial)!r} to start over"
        )
    missing = int((~chunks.done()).sum()) * config["chunk_size"]
    need = missing * chunks.buckets * (chunks.dim + (1 if chunks.das else 0)) * 4
    if need > shutil.disk_usage(partial).free:  # refuse now rather than fail midway
        raise explain_os_error(OSError(errno.ENOSPC, "No space left on device"), partial)


def _differences(recorded: dict, config: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    """(dotted field, recorded value, this run's value) for every setting that differs."""
    out = []
    for key in sorted(set(recorded) | set(config)):
        was, now = recorded.get(key), config.get(key)
        if isinstance(was, dict) and isinstance(now, dict):
            out += _differences(was, now, f"{prefix}{key}.")
        elif was != now:
            out.append((f"{prefix}{key}", was, now))
    return out


def _check_index_options(options: FeaturizeOptions, count: int) -> None:
    """Refuse bad storage / index options before any gradient is computed."""
    if options.storage not in STORAGES:
        raise ExplorerError(f"unknown storage {options.storage!r}: use one of {', '.join(STORAGES)}")
    if options.index_type not in INDEX_TYPES:
        raise ExplorerError(f"unknown index type {options.index_type!r}: use one of {', '.join(INDEX_TYPES)}")
    if options.index_type == "ivf":
        check_ivf_request(count, options.ivf_nlist, options.ivf_nprobe)
    elif options.ivf_nlist is not None or options.ivf_nprobe is not None or options.ivf_on_disk:
        raise ExplorerError("--ivf-nlist, --ivf-nprobe and --ivf-on-disk apply to --index-type ivf only")


def featurize(
    model: DiffusionModel,
    dataset: Dataset,
    out_dir: str | Path,
    spec: FeatureSpec,
    options: FeaturizeOptions | None = None,
    collective: Collective | None = None,
) -> FeaturizeReport:
    """Compute, whiten and index the features of every (example, bucket) pair (options None: the defaults).

    collective: this process's rank among the torchrun ranks (None: one process). Every rank computes its
    share of the missing chunks and returns its own report; rank 0 writes the index."""
    out_dir, options = Path(out_dir), options or FeaturizeOptions()
    collective = collective or Collective()
    _check_index_options(options, len(dataset))
    if (out_dir / META_NAME).is_file() and not (out_dir / PARTIAL_DIR).exists():
        raise ExplorerError(
            f"{str(out_dir)!r} already holds a complete index: choose another --out, or delete it to rebuild"
        )
    images = training_inputs(model, dataset)  # (N, C, H, W): pixels, or a text model's VAE latents
    prompts = training_prompts(model, dataset)
    on_cpu = model.device.type == "cpu"  # an accelerator runs one model copy, its batch sized to its memory
    workers = (default_workers() if on_cpu else 1) if options.workers is None else options.workers
    if options.das_weights and options.method.name != "trak":
        raise ExplorerError(
            f"--das-weights scales TRAK rows; it does not combine with --method {options.method.name}"
        )
    computer, method = method_featurizer(
        model, spec, options.method, out_dir, images, options.chunk_size, workers
    )
    if model.device.type == "cuda" and options.method.name == "trak":
        first = torch.zeros(1, dtype=torch.long), prompt_batch(model, prompts, slice(0, 1))
        computer.computer.chunk_size = cuda_chunk_size(lambda: computer.features(images[:1], *first))
    n, nb, k = len(dataset), spec.buckets, computer.dim
    chunks = ChunkFiles(out_dir / PARTIAL_DIR / "chunks", n, options.chunk_size, nb, k, options.das_weights)
    _open_partial(out_dir, _partial_config(model, dataset, spec, options), chunks, collective)

    todo = collective.mine(np.flatnonzero(~chunks.done()))
    collective.barrier()  # every rank listed the missing chunks before any rank writes one
    if options.max_chunks is not None:
        todo = todo[: options.max_chunks]
    pairs, seconds = _featurize_chunks(model, computer, images, prompts, chunks, todo, collective)
    collective.barrier()  # every rank's chunks are on disk
    if not chunks.done().all():
        return FeaturizeReport(out_dir, pairs, seconds, complete=False)

    source = _feature_source(model, dataset, spec, computer)
    build_index(out_dir, source, chunks, dataset, options, collective, captions=prompts, method=method)
    if collective.is_main:
        if options.keep_features:
            stack(chunks, out_dir / FEATURES_NAME)
            if options.das_weights:
                stack(chunks, out_dir / RESIDUALS_NAME, residuals=True)
        shutil.rmtree(out_dir / PARTIAL_DIR, ignore_errors=True)
    collective.barrier()  # the index is complete when any rank returns
    return FeaturizeReport(out_dir, pairs, seconds, complete=True)


def _featurize_chunks(
    model, computer, images, prompts, chunks: ChunkFiles, todo, collective
) -> tuple[int, float]:
    """Compute and write the chunks in `todo`: (example, bucket) pairs computed and seconds taken."""
    started, pairs = time.time(), 0
    progress = tqdm(
        total=len(todo) * chunks.chunk_size, desc="featurize", unit="ex", disable=not collective.is_main
    )
    for chunk in todo:
        batch, context = images[chunks.rows(chunk)], prompt_batch(model, prompts, chunks.rows(chunk))
        features = computer.all_bucket_features(batch, context).numpy().transpose(1, 0, 2)  # (B, c, k)
        residuals = computer.residual_norms(batch, context).numpy().T if chunks.das else None
        try:
            chunks.write(chunk, features, residuals)
        except OSError as error:
            raise explain_os_error(error, chunks.directory) from error
        pairs += len(batch) * chunks.buckets
        progress.update(len(batch))
        progress.set_postfix(grads_per_s=f"{pairs / (time.time() - started):.1f}")
    progress.close()
    return pairs, time.time() - started


def _feature_source(model: DiffusionModel, dataset: Dataset, spec: FeatureSpec, computer) -> FeatureSource:
    """What the features were computed from, as meta.json records it."""
    return FeatureSource(
        model_hash=model.weights_hash,
        model_path=str(model.path),
        dataset=DatasetInfo(
            dataset.name, len(dataset), dataset.fingerprint(), tuple(dataset.class_names), dataset.resolution
        ),
        spec=spec,
        timesteps=tuple(map(tuple, computer.timesteps)),
        num_train_timesteps=model.num_train_timesteps,
        num_params=computer.num_params,
        lora=model.lora,
    )


def build_index(
    out_dir: Path,
    source: FeatureSource,
    chunks: ChunkFiles | ArrayChunks,
    dataset: Dataset,
    options: FeaturizeOptions,
    collective: Collective | None = None,
    captions: list[str] | None = None,
    method: IndexMethod | None = None,
) -> None:
    """Raw features by chunk [+ residuals] -> lambda, whitening, normalization, DAS, FAISS files (rank 0);
    captions: a text model's training prompts, kept with the index; method: what the features are
    (precompute.featurize.method_build), trak when None."""
    collective, method = collective or Collective(), method or IndexMethod()
    fits = [
        fit_method_bucket(
            chunks,
            b,
            method,
            collective,
            options.relative_lambda,
            options.center,
            options.normalize,
            source.spec.proj_seed,
        )
        for b in tqdm(range(chunks.buckets), desc="kernel", unit="bucket", disable=not collective.is_main)
    ]
    fitted = [(scorer, choice) for scorer, choice, _, _ in fits]
    if not collective.is_main:
        return
    scratch_dir = out_dir / PARTIAL_DIR
    scratch_dir.mkdir(parents=True, exist_ok=True)
    scratch = np.lib.format.open_memmap(
        scratch_dir / "vectors.npy", mode="w+", dtype=np.float32, shape=(chunks.count, source.spec.proj_dim)
    )
    das = bool(options.das_weights and chunks.das)
    norms = [np.zeros((chunks.count, 3), np.float32) for _ in fitted]  # filled as each bucket is written
    vectors = (
        bucket_vectors(rows, b, row_scorer, das, scratch, norms[b])
        for b, (_, _, rows, row_scorer) in enumerate(fits)
    )
    write_index(
        out_dir,
        source,
        [LambdaRecord(c.value, c.relative, c.method, tuple(map(tuple, c.curve))) for _, c in fitted],
        options.normalize,
        bool(options.das_weights),
        vectors,
        [scorer.factor for scorer, _ in fitted],
        dataset.images,
        dataset.labels,
        dataset.ids,
        centers=[scorer.center for scorer, _ in fitted] if options.center else None,
        norms=norms,
        storage=options.storage,
        index_type=options.index_type,
        ivf_nlist=options.ivf_nlist,
        ivf_nprobe=options.ivf_nprobe,
        ivf_on_disk=options.ivf_on_disk,
        train_captions=captions,
        method=method,
    )
    del scratch
    (scratch_dir / "vectors.npy").unlink(missing_ok=True)


def reindex(
    source_dir: str | Path,
    out_dir: str | Path,
    options: FeaturizeOptions,
    as_retrac: bool = False,
    das_kernel: str | None = None,
) -> Path:
    """A new index from the raw features an earlier featurize kept (--keep-features): no gradients.

    Other normalization, DAS, lambda, storage or index type (flat <-> ivf); as_retrac: a tracin index's
    features as Diffusion-ReTrac's, each checkpoint's block scaled to unit norm (what featurize --method
    retrac computes from the same checkpoints); das_kernel: a das index's kernel, "output" or "loss"."""
    source_dir, out_dir = Path(source_dir), Path(out_dir)
    index = AttributionIndex.load(source_dir)
    _check_index_options(options, index.meta.count)
    if as_retrac and index.meta.method.name != "tracin":
        raise ExplorerError(
            f"--as-retrac turns a tracin index into ReTrac; {str(source_dir)!r} is {index.meta.method.name}"
        )
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
    method = index.meta.method
    if das_kernel is not None:
        if method.name != "das":
            raise ExplorerError(f"--das-kernel applies to a das index; {str(source_dir)!r} is {method.name}")
        method = replace(method, das_kernel=das_kernel)
    if as_retrac:
        features, method = unit_blocks(features, len(method.checkpoints)), replace(method, name="retrac")
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
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in method.files():  # checkpoints, EK-FAC factors: the same method, other scoring choices
        shutil.copyfile(source_dir / name, out_dir / name)
    build_index(
        out_dir,
        index.meta.source,
        ArrayChunks(features, residuals),
        dataset,
        options,
        captions=index.train_captions,
        method=method,
    )
    shutil.rmtree(out_dir / PARTIAL_DIR, ignore_errors=True)
    return out_dir
