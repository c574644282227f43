"""Where featurization time goes: the vmap path vs the kronecker path, against a training step.

    flock /tmp/cpu.lock python -m bench.featurize_profile                 # shipped model, 2 threads
    python -m bench.featurize_profile --images 256 --batch 64 --proj-dim 2048 --threads 2 --repeats 3

On the shipped model (assets/model) and mnist5k training images, with one timestep and one noise
draw per bucket (so one row = one (example, timestep) pair), it prints medians over --repeats:

1. stages of one batch of --batch rows (buckets cycling over the rows):
   vmap path: batched forward and batched output-gradient backward of the same rows (for scale),
   vmap(grad) per-example gradients (forward + backward + per-example weight gradients, fused),
   count-sketch projection;
   kronecker path: forward with hooks, backward w.r.t. layer outputs only, per-layer Kronecker
   projection (+ exact bias/GroupNorm gradients), count-sketch of the blocks, and the backward with
   the blocks formed inside it (what features() runs instead of the two stages before the sketch);
   kronecker+calibrated: the same with a calibrated spec (heaviest layers' blocks exact, heavy small
   tensors kept); +bf16: under bfloat16 autocast (FeatureSpec.precision);
2. end to end over --images images x all buckets, as precompute featurize runs it: features (on
   --workers threads, precompute featurize's default),
   whitening (GCV lambda, Cholesky, whiten, normalize per bucket), I/O (memmap + index files);
3. one batched AdamW training step of the same model at the same batch size, per sample, and the
   cost per (example, timestep) of each path relative to it (timed back to back in each repeat;
   the median of the per-repeat ratios).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from explorer.data import load_builtin, to_model_range, train_heldout_split
from explorer.features import FeatureComputer, FeatureSpec
from explorer.index import FeatureSource, LambdaRecord, write_index
from explorer.index_meta import DatasetInfo
from explorer.model import load_model
from explorer.noising import forward_noise
from explorer.scoring import fit_bucket
from precompute.featurize.calibration import calibrate
from precompute.featurize.workers import Featurizer, default_workers

ROOT = Path(__file__).resolve().parents[1]


def timed(fn):
    started = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - started


def stage_profile(
    computer: FeatureComputer, x0: torch.Tensor, buckets: torch.Tensor, repeats: int
) -> dict[str, float]:
    """Seconds per stage for one batch (medians)."""
    stages: dict[str, list[float]] = {}

    def record(name: str, seconds: float) -> None:
        stages.setdefault(name, []).append(seconds)

    unet = computer.model.unet
    timesteps = computer.draw_timesteps[buckets].flatten()
    noise = computer.noise[buckets].flatten(0, 1)
    abar = computer.abar[timesteps].view(-1, 1, 1, 1)
    noisy = forward_noise(x0, noise, abar)
    for repeat in range(repeats + 1):
        times: dict[str, float] = {}
        if computer.kronecker is None:
            with torch.no_grad():
                _, times["forward (batched, for scale)"] = timed(lambda: unet(noisy, timesteps).sample)
            leaf = noisy.clone().requires_grad_(True)
            with torch.enable_grad():
                prediction = unet(leaf, timesteps).sample
                total = computer.output_fn(prediction, noise)  # any scalar: the backward's cost is the same
            _, times["backward to inputs (batched, for scale)"] = timed(
                lambda: torch.autograd.grad(total, leaf)
            )
            grads, times["vmap(grad): per-example gradients"] = timed(
                lambda: computer.exact_gradients(x0, buckets)
            )
            _, times["count-sketch projection"] = timed(
                lambda: computer.projector.project([grads[n] for n in computer.names])
            )
        else:
            kron = computer.kronecker
            (total, records), times["forward with hooks"] = timed(lambda: computer.capture_rows(x0, buckets))
            grads, times["backward w.r.t. layer outputs"] = timed(
                lambda: kron.output_gradients(total, records)
            )
            blocks, times["Kronecker projection + exact small grads"] = timed(
                lambda: kron.blocks(records, grads, len(x0))
            )
            _, times["count-sketch of the blocks"] = timed(lambda: kron.combine(blocks))
            del total, records, grads, blocks
            total, records = computer.capture_rows(
                x0, buckets
            )  # what features() runs: the blocks formed in the backward
            _, times["backward + blocks, one pass (features())"] = timed(
                lambda: kron.backward_blocks(total, records, len(x0))
            )
        if repeat > 0:  # the first pass is a warm-up
            for name, seconds in times.items():
                record(name, seconds)
    return {name: statistics.median(values) for name, values in stages.items()}


def end_to_end(computer: Featurizer, images: torch.Tensor, chunk: int, dataset) -> dict[str, float]:
    """One featurize run as precompute/featurize/pipeline.py does it: features, whitening, I/O (seconds)."""
    n, nb, k = len(images), computer.spec.buckets, computer.spec.proj_dim
    with tempfile.TemporaryDirectory() as tmp:
        memmap = np.lib.format.open_memmap(
            Path(tmp) / "features.npy", mode="w+", dtype=np.float32, shape=(nb, n, k)
        )
        seconds = {"features": 0.0, "whitening": 0.0, "I/O": 0.0}
        for start in range(0, n, chunk):
            phi, elapsed = timed(lambda: computer.all_bucket_features(images[start : start + chunk]))
            seconds["features"] += elapsed
            started = time.perf_counter()
            memmap[:, start : start + chunk] = phi.numpy().transpose(1, 0, 2)
            memmap.flush()
            seconds["I/O"] += time.perf_counter() - started
        vectors, factors, centers, lambdas = [], [], [], []
        started = time.perf_counter()
        for bucket in range(
            nb
        ):  # what precompute.featurize.pipeline.build_index does at its defaults (lambda by GCV here)
            phi = np.asarray(memmap[bucket])
            scorer, choice = fit_bucket(phi, None, center=True, normalize=True)
            vectors.append(scorer.vectors(phi))
            factors.append(scorer.factor)
            centers.append(scorer.center)
            lambdas.append(LambdaRecord(choice.value, choice.relative, choice.method))
        seconds["whitening"] = time.perf_counter() - started
        source = FeatureSource(
            "bench",
            "bench",
            DatasetInfo("bench", n, "bench", tuple(dataset.class_names), dataset.resolution),
            computer.spec,
            tuple(map(tuple, computer.timesteps)),
            1000,
            computer.num_params,
        )
        _, elapsed = timed(
            lambda: write_index(
                Path(tmp) / "index",
                source,
                lambdas,
                True,
                False,
                vectors,
                factors,
                dataset.images[:n],
                dataset.labels[:n],
                dataset.ids[:n],
                centers=centers,
            )
        )
        seconds["I/O"] += elapsed
    return seconds


def training_step(model, images: torch.Tensor, batch: int):
    """A function running one AdamW step of a trainable copy of the model on `batch` samples."""
    unet = copy.deepcopy(model.unet).train().requires_grad_(True)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    abar_all = model.scheduler.alphas_cumprod.to(torch.float32)
    generator = torch.Generator().manual_seed(0)

    def step() -> None:
        x0 = images[torch.randint(0, len(images), (batch,), generator=generator)]
        t = torch.randint(0, model.num_train_timesteps, (batch,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        abar = abar_all[t].view(-1, 1, 1, 1)
        loss = F.mse_loss(unet(forward_noise(x0, noise, abar), t).sample, noise)  # as precompute/train.py
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def seconds_per_sample(step, steps: int, batch: int) -> float:
    """Wall time of `steps` calls of a training step (from training_step) on `batch` samples, per sample."""
    return timed(lambda: [step() for _ in range(steps)])[1] / steps / batch


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=str(ROOT / "assets" / "model"))
    parser.add_argument("--images", type=int, default=256, help="training images featurized end to end")
    parser.add_argument(
        "--batch", type=int, default=64, help="rows per forward (= featurize --chunk-size) and training batch"
    )
    parser.add_argument("--buckets", type=int, default=10)
    parser.add_argument("--proj-dim", type=int, default=2048)
    parser.add_argument("--output", default="square")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="worker threads of the end-to-end features (default: "
        "precompute featurize's, 2 on 2 or more threads); the stages run on one",
    )
    parser.add_argument("--train-steps", type=int, default=10, help="training steps per timed repeat")
    parser.add_argument(
        "--paths",
        nargs="+",
        default=["countsketch", "kronecker", "kronecker+calibrated"],
        help="projectors to profile; name+calibrated calibrates the spec first "
        "(precompute.featurize.calibration), "
        "kronecker+bf16 runs under bfloat16 autocast (FeatureSpec.precision)",
    )
    parser.add_argument(
        "--calibrate", type=int, default=16, help="training images the +calibrated paths calibrate on"
    )
    parser.add_argument("--json", default=None, help="also write the numbers to this file")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    workers = default_workers() if args.workers is None else args.workers
    model = load_model(args.model)
    train, _ = train_heldout_split(load_builtin("mnist5k", model.sample_size))
    images = torch.from_numpy(to_model_range(train.images))  # (N, C, H, W)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; model {args.model} "
        f"({sum(p.numel() for p in model.unet.parameters()):,} params); {args.images} images x "
        f"{args.buckets} buckets, "
        f"batch {args.batch}, k {args.proj_dim}, output {args.output}, medians of {args.repeats}; "
        "end-to-end features on "
        f"{workers} worker thread(s)"
    )

    step = training_step(model, images, args.batch)
    x0, buckets = images[: args.batch], torch.arange(args.batch) % args.buckets
    computers, stages = {}, {}
    for path in args.paths:
        projector, *variants = path.split("+")
        if not set(variants) <= {"calibrated", "bf16"}:
            raise SystemExit(
                f"--paths {path!r}: use a projector name, optionally with +calibrated and/or +bf16"
            )
        spec = FeatureSpec(
            output=args.output,
            buckets=args.buckets,
            projector=projector,
            proj_dim=args.proj_dim,
            precision="bf16" if "bf16" in variants else "fp32",
        )
        if (
            "calibrated" in variants
        ):  # precompute.featurize.calibration on the first --calibrate images (not timed: once per index)
            calibration = calibrate(model, spec, images[: args.calibrate], chunk_size=args.batch)
            spec = calibration.spec
            print(f"{path}: {calibration.summary()}")
        stages[path] = stage_profile(
            FeatureComputer(model, spec, chunk_size=args.batch), x0, buckets, args.repeats
        )
        computers[path] = Featurizer(model, spec, chunk_size=args.batch, workers=workers)
        computers[path].all_bucket_features(
            images[:16]
        )  # untimed: first calls build oneDNN's kernels per thread

    # Interleaved repeats: the machine is shared, so each repeat times the training step and every
    # path back to back, and the ratios are taken within a repeat.
    step()
    train_runs, runs = [], {path: [] for path in args.paths}
    for _ in range(args.repeats):
        train_runs.append(seconds_per_sample(step, args.train_steps, args.batch))
        for path in args.paths:
            runs[path].append(end_to_end(computers[path], images[: args.images], args.batch, train))
    pairs = args.images * args.buckets
    train_ms = statistics.median(train_runs) * 1e3
    results = {
        "train_step_per_sample_ms": train_ms,
        "threads": torch.get_num_threads(),
        "workers": workers,
        "batch": args.batch,
        "proj_dim": args.proj_dim,
        "images": args.images,
        "buckets": args.buckets,
        "paths": {},
    }
    print(
        f"\nAdamW training step, batch {args.batch}: {train_ms * args.batch:.1f} ms = {train_ms:.2f} ms "
        "per sample "
        f"(repeats: {', '.join(f'{t * 1e3:.2f}' for t in train_runs)})"
    )
    for path in args.paths:
        e2e = {name: statistics.median(run[name] for run in runs[path]) for name in runs[path][0]}
        ratios = [run["features"] / pairs / t for run, t in zip(runs[path], train_runs)]
        per_pair_ms = e2e["features"] / pairs * 1e3
        results["paths"][path] = {
            "stages_ms_per_batch": {n: v * 1e3 for n, v in stages[path].items()},
            "end_to_end_s": e2e,
            "features_ms_per_example_timestep": per_pair_ms,
            "examples_per_s": pairs / e2e["features"],
            "relative_to_train_step": statistics.median(ratios),
            "ratios": ratios,
        }
        print(f"\n== {path} path: one batch of {args.batch} (example, timestep) rows ==")
        for name, seconds in stages[path].items():
            print(f"  {name:<42} {seconds * 1e3:8.1f} ms  ({seconds / args.batch * 1e3:.2f} ms per row)")
        print(
            f"  end to end, {args.images} images x {args.buckets} buckets = {pairs} (example, "
            "timestep) pairs:"
        )
        for name, seconds in e2e.items():
            print(f"    {name:<12} {seconds:7.2f} s  ({seconds / pairs * 1e3:.3f} ms per pair)")
        print(
            f"  features: {pairs / e2e['features']:.1f} gradient-examples/s = {per_pair_ms:.2f} ms per "
            "(example, timestep) "
            f"= {statistics.median(ratios):.2f}x the training step per sample (repeats: "
            f"{', '.join(f'{r:.2f}' for r in ratios)})"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
