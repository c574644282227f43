"""Featurization throughput and fidelity: ours (explorer.features) vs traker 0.3.2, both on CPU.

    pip install -r bench/requirements-bench.txt        # traker, bench-only (torch stays 2.13.0 CPU)
    python -m bench.featurize_vs_traker                # N=256, 24 queries, 3 runs, countsketch
    python -m bench.featurize_vs_traker --projector kronecker --runs 5
    python -m bench.featurize_vs_traker --projector kronecker --calibrate 16 --seeds 5 --runs 5
    --default-n 8   # the README's figures

Both sides featurize the same N training images of the shipped model (assets/model, mnist5k
train split) with the same quantity: the gradient of D-TRAK's `square` output averaged over the
same 10 timesteps (t = 50, 150, ..., 950) with the same shared noise, projected to k = 2048.

1. traker: a diffusion model-output class (DiffusionSquareOutput below, a subclass of traker's
   AbstractModelOutput) built from our FeatureComputer's timesteps and noise bank, so the two sides
   cannot drift apart; its gradient is checked against ours before anything is timed.
   - "default": what TRAKer(device="cpu") does by itself: float16 store, a BasicProjector with
     traker's block size of 100 columns (the Gaussian blocks are regenerated on every call), the
     model as a trained nn.Module (parameters requiring grad). On this CPU (AVX2, no fp16 matmul)
     its float16 projection costs ~18 s per image, so it is timed on --default-n images in one
     featurize call, and its Spearman agreement is not measured (it would take ~1.5 h; its
     projection is the same dense Gaussian as "best", stored in float16).
   - "best": every CPU option traker offers set for speed: float32 (this CPU has no fast fp16
     matmul), the model frozen and in eval mode, one BasicProjector block of all k columns
     (generated once, outside the timed region: its setup time is printed separately), and
     --traker-batch images per featurize call.
   - "best, bf16 autocast" (--traker-bf16): "best" with its model run under torch.autocast(bfloat16),
     the arithmetic ours uses with --precision bf16 or mixed; not a traker setting, timed so that the part
     of our speed-up that is precision alone can be read off, and ours is also compared with the faster
     of traker's two arithmetics in each repeat.
2. ours: Featurizer(FeatureSpec(output="square", buckets=1, timesteps_per_bucket=10,
   proj_dim=2048, projector=--projector, precision=--precision), workers=--workers).features(images,
   bucket 0), on --workers threads (precompute featurize's default: 2 on 2 cores, each single-threaded,
   against traker's one call at a time on all of torch's threads); with --calibrate n the spec is first
   calibrated on n of the N training images (precompute.featurize.calibration, counted in our setup, as are
   the workers' model copies). --workers-baseline 1 also times ours on one worker in the same repeats,
   so the part of the speed-up that is the worker threads can be read off.

Cost against training: each repeat also times --train-steps AdamW steps of a trainable copy of the
model at --train-batch samples (bench/featurize_profile.py's training step), and ours is reported per
(example, timestep), i.e. its seconds / (N x 10), relative to the training step's seconds per sample
(the median of the within-repeat ratios), as the issue that asked for this bench measures it.

Throughput is images/s of the featurize calls alone (median of --runs runs, interleaved: each
repeat times every method once, after one untimed warm-up call of each on a few images; the
speed-up is the median of the within-repeat ratios). Fidelity: for each
of --queries held-out images, the Spearman correlation between its projected scores against the
N training images (inner products, and cosines as the explorer's normalized index uses) and the
exact scores from the full, unprojected per-example gradients; mean over queries. Which projection
seed is drawn moves these means by more than the methods differ (0.991-0.998 for a dense Gaussian
over seeds 0-2 on the inner product), so --seeds s repeats the agreement with seeds 0..s-1 for
traker best (its BasicProjector seed) and ours (proj_seed) and reports the average (--first-seed f: seeds
f..f+s-1, a second sample).
"""

from __future__ import annotations

import dataclasses
import resource
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from bench.featurize_profile import seconds_per_sample, training_step
from bench.fidelity import agreement, exact_gradients, over_seeds
from bench.results_file import write_case
from bench.traker_side import (
    DiffusionSquareOutput,
    check_same_quantity,
    ours_featurize,
    parse_args,
    print_cost,
    print_table,
    traker_featurize,
)
from explorer.data import load_dataset, to_model_range, train_heldout_split
from explorer.features import FeatureSpec
from explorer.model import load_model
from precompute.featurize.calibration import calibrate
from precompute.featurize.workers import Featurizer

ROOT = Path(__file__).resolve().parents[1]

try:
    from trak.projectors import BasicProjector, ProjectionType
except ImportError:
    raise SystemExit("this bench needs traker: pip install -r bench/requirements-bench.txt") from None


def peak_rss_gb() -> float:
    """This process's peak resident memory so far, in GB (Linux reports ru_maxrss in KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


def main() -> None:
    args = parse_args(__doc__)

    torch.manual_seed(0)
    model = load_model(args.model)
    train_set, heldout = train_heldout_split(load_dataset("mnist5k", model.sample_size))
    train = torch.from_numpy(to_model_range(train_set.images[: args.n]))  # (N, 1, 16, 16)
    queries = torch.from_numpy(to_model_range(heldout.images[: args.queries]))  # (Q, 1, 16, 16)
    spec = FeatureSpec(
        output="square",
        buckets=1,
        timesteps_per_bucket=10,
        proj_dim=args.proj_dim,
        projector=args.projector,
        precision=args.precision,
    )
    started = time.perf_counter()
    if args.calibrate:
        calibration = calibrate(model, spec, train[: args.calibrate], chunk_size=args.chunk)
        spec = calibration.spec
        print(calibration.summary(), flush=True)
    computer = Featurizer(model, spec, chunk_size=args.chunk, workers=args.workers)
    our_setup = time.perf_counter() - started
    # traker's output is built from our FeatureComputer's timesteps and noise bank (bucket 0 of 1).
    output = DiffusionSquareOutput(
        computer.computer.draw_timesteps[0], computer.computer.noise[0], model.scheduler.alphas_cumprod
    )
    unet = model.unet
    print(
        f"timesteps {computer.computer.draw_timesteps[0].tolist()}, noise bank "
        f"{tuple(computer.computer.noise[0].shape)}; "
        f"{computer.num_params:,} parameters; torch threads {torch.get_num_threads()}",
        flush=True,
    )
    mismatch = check_same_quantity(unet, output, computer, train[:3])
    print(f"traker output gradient vs ours, max relative difference: {mismatch:.2e}", flush=True)
    if mismatch > 1e-4:
        raise SystemExit(
            "the traker model output does not compute the same gradient as ours: fix it before timing"
        )

    exact = exact_gradients(computer.computer, torch.cat([train, queries]))  # (N + Q, d)
    exact_train, exact_queries = exact[: args.n], exact[args.n :]
    del exact

    def traker_projector(seed: int) -> BasicProjector:
        return BasicProjector(
            grad_dim=computer.num_params,
            proj_dim=args.proj_dim,
            seed=seed,
            proj_type=ProjectionType.normal,
            device="cpu",
            block_size=args.proj_dim,
            dtype=torch.float32,
        )

    def traker_other_seed(seed: int, output=output) -> tuple[np.ndarray, np.ndarray]:
        other = traker_projector(seed)
        try:
            return traker_featurize(
                unet, output, train, queries, args.proj_dim, args.traker_batch, half=False, projector=other
            )[1:]
        finally:  # its matrix is d x k float32 (8.6 GB at k = 2048): one alive at a time
            other.free_memory()

    def ours_other_seed(seed: int) -> tuple[np.ndarray, np.ndarray]:
        other = Featurizer(
            model,
            dataclasses.replace(computer.spec, proj_seed=seed),
            chunk_size=args.chunk,
            workers=args.workers,
        )
        return ours_featurize(other, train, queries)[1:]

    # Each method: (name, settings, setup seconds, run() -> (seconds, train features, query features) with
    # projection seed 0, other_seed(seed) -> (train, query features) or None, images timed).
    methods = []
    if not args.skip_default:
        trainable = load_model(args.model).unet.requires_grad_(
            True
        )  # as a trained nn.Module comes out of training
        methods.append(
            (
                "traker default",
                f"fp16, BasicProjector 100-col blocks regenerated per call, {args.default_n} images "
                "in one call, params require grad",
                0.0,
                lambda: traker_featurize(
                    trainable,
                    output,
                    train[: args.default_n],
                    queries[:0],
                    args.proj_dim,
                    args.default_n,
                    half=True,
                ),
                None,
                args.default_n,
            )
        )
    started = time.perf_counter()
    projector = traker_projector(0)
    traker_setup = time.perf_counter() - started
    unet.eval().requires_grad_(False)
    methods.append(
        (
            "traker best",
            f"fp32, one {args.proj_dim}-col BasicProjector block built once, batch {args.traker_batch}, "
            "model frozen + eval",
            traker_setup,
            lambda: traker_featurize(
                unet,
                output,
                train,
                queries,
                args.proj_dim,
                args.traker_batch,
                half=False,
                projector=projector,
            ),
            traker_other_seed,
            args.n,
        )
    )
    if args.traker_bf16:
        output_bf16 = DiffusionSquareOutput(
            computer.computer.draw_timesteps[0],
            computer.computer.noise[0],
            model.scheduler.alphas_cumprod,
            bf16=True,
        )
        methods.append(
            (
                "traker best, bf16 autocast",
                "as traker best, its model under torch.autocast(bfloat16) (not a traker setting)",
                traker_setup,
                lambda: traker_featurize(
                    unet,
                    output_bf16,
                    train,
                    queries,
                    args.proj_dim,
                    args.traker_batch,
                    half=False,
                    projector=projector,
                ),
                lambda seed: traker_other_seed(seed, output_bf16),
                args.n,
            )
        )
    calibrated = f", calibrated on {args.calibrate} of the N images" if args.calibrate else ""
    if computer.spec.precision == "mixed":
        calibrated += f", bf16 below t = {computer.spec.bf16_below}"
    if (
        args.workers_baseline
    ):  # the same computation on fewer threads, timed in the same repeats: the workers' share
        baseline = Featurizer(model, computer.spec, chunk_size=args.chunk, workers=args.workers_baseline)
        methods.append(
            (
                f"ours on {args.workers_baseline} worker thread(s)",
                f"as ours, workers={args.workers_baseline}",
                our_setup,
                lambda: ours_featurize(baseline, train, queries),
                None,
                args.n,
            )
        )
    methods.append(
        (
            f"ours ({args.projector}{', calibrated' if args.calibrate else ''}"
            f"{', ' + args.precision if args.precision != 'fp32' else ''})",
            f"FeatureComputer, chunk {args.chunk}, {args.workers} worker thread(s){calibrated}",
            our_setup,
            lambda: ours_featurize(computer, train, queries),
            ours_other_seed,
            args.n,
        )
    )

    # Timed runs interleaved (every method and the training step once per repeat): the machine's speed
    # drifts by ~1.5x over minutes, so ratios are taken within a repeat and their median is reported.
    step = training_step(model, torch.from_numpy(to_model_range(train_set.images)), args.train_batch)
    step()  # warm-up
    # One untimed call of every method but traker default (~12 s per image, ~500x off) on a few images first:
    # first
    # calls build oneDNN's kernels for their shapes and thread counts (ours' first repeat ran 1-15% slow
    # without).
    few = train[: max(args.traker_batch, 16)]
    warm_ups = [
        lambda: traker_featurize(
            unet, output, few, queries[:0], args.proj_dim, args.traker_batch, half=False, projector=projector
        ),
        lambda: computer.features(few, torch.zeros(len(few), dtype=torch.long)),
    ]
    if args.traker_bf16:
        warm_ups.append(
            lambda: traker_featurize(
                unet,
                output_bf16,
                few,
                queries[:0],
                args.proj_dim,
                args.traker_batch,
                half=False,
                projector=projector,
            )
        )
    if args.workers_baseline:
        warm_ups.append(lambda: baseline.features(few, torch.zeros(len(few), dtype=torch.long)))
    for warm_up in warm_ups:
        warm_up()
    train_per_sample = []  # seconds per sample of one AdamW step, one entry per repeat
    times = {name: [] for name, *_ in methods}
    features = {}
    for repeat in range(args.runs):
        train_per_sample.append(seconds_per_sample(step, args.train_steps, args.train_batch))
        print(
            f"  repeat {repeat + 1}, AdamW training step: {train_per_sample[-1] * 1e3:.3f} ms per sample",
            flush=True,
        )
        for name, _, _, run, _, n in methods:
            seconds, phi_train, phi_queries = run()
            times[name].append(seconds)
            features[name] = (phi_train, phi_queries)
            print(f"  repeat {repeat + 1}, {name}: {n / seconds:.3f} images/s", flush=True)

    # The fidelity stage builds one traker projection matrix per seed (d x k float32, 8.6 GB at k = 2048):
    # the timed one goes first, so at most one is alive (with three, the default run was OOM-killed at 24 GB).
    projector.free_memory()
    peak_before_fidelity_gb = peak_rss_gb()
    rows = []
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    for name, settings, setup_s, _, other_seed, n in methods:
        per_seed = []
        for seed in seeds if len(features[name][1]) else ():
            if seed == 0:  # the timed runs' features
                per_seed.append(agreement(*features[name], exact_train, exact_queries))
            elif other_seed:
                per_seed.append(agreement(*other_seed(seed), exact_train, exact_queries))
                print(f"  {name}: agreement with projection seed {seed} measured", flush=True)
        rows.append(
            {
                "method": name,
                "settings": settings,
                "setup_s": round(setup_s, 2),
                "n": n,
                "images_per_s": [round(n / t, 4) for t in times[name]],
                "median_images_per_s": n / statistics.median(times[name]),
                "spearman": over_seeds(per_seed) if per_seed else None,
            }
        )
    ours_name, ours_n = methods[-1][0], methods[-1][5]
    ratios = {
        name: statistics.median(
            (ours_n / mine) / (n / theirs) for mine, theirs in zip(times[ours_name], times[name])
        )
        for name, *_, n in methods[:-1]
    }
    if (
        args.traker_bf16
    ):  # when ours runs in bf16, traker's best is whichever of its two arithmetics ran faster
        fastest = [min(pair) for pair in zip(times["traker best"], times["traker best, bf16 autocast"])]
        ratios["traker best, the faster of fp32 and bf16 autocast in each repeat"] = statistics.median(
            (ours_n / mine) / (args.n / theirs) for mine, theirs in zip(times[ours_name], fastest)
        )

    print_table(args, seeds, rows, ratios)
    pairs = ours_n * computer.computer.draw_timesteps.shape[1]  # (example, timestep) pairs per featurize run
    versus_training = [mine / pairs / train for mine, train in zip(times[ours_name], train_per_sample)]
    cost = {
        "ms_per_example_timestep": statistics.median(times[ours_name]) / pairs * 1e3,
        "train_step_ms_per_sample": statistics.median(train_per_sample) * 1e3,
        "train_step_ms_per_sample_runs": [t * 1e3 for t in train_per_sample],
        "relative_to_train_step": statistics.median(versus_training),
        "ratios": versus_training,
    }
    print_cost(args, cost)
    before, end = peak_before_fidelity_gb, peak_rss_gb()
    print(f"peak resident memory: {before:.1f} GB before the fidelity stage, {end:.1f} GB at the end")
    if args.json:
        result = {
            "args": vars(args),
            "rows": rows,
            "ratios": ratios,
            "cost_vs_training": cost,
            "gradient_mismatch": mismatch,
            "peak_rss_gb": {"before_fidelity": before, "end": end},
        }
        write_case(args.json, args.case, result)


if __name__ == "__main__":
    main()
