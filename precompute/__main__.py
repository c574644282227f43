"""precompute CLI: `train`, `featurize`, `evaluate`. Run `python -m precompute COMMAND --help`."""

from __future__ import annotations

import argparse
import logging
import sys

from explorer.device import DEVICES
from explorer.errors import ExplorerError
from explorer.model_args import add_model_arguments
from precompute.cli_types import flag_hint, lambda_rule, non_negative_int, positive_float, positive_int
from precompute.evaluate_cli import add_evaluate
from precompute.train_cli import add_train


def add_featurize(commands) -> None:
    from explorer.features import PRECISIONS, FeatureSpec
    from explorer.index import STORAGES
    from explorer.index_methods import METHODS
    from explorer.projector import PROJECTORS
    from explorer.whitening import DEFAULT_RELATIVE_LAMBDA

    spec = FeatureSpec()
    parser = commands.add_parser("featurize", help="per-example projected gradients -> an index directory")
    add_model_arguments(parser, None, required=True)
    parser.add_argument(
        "--data", required=True, help="mnist5k, digits, or a folder of images in class subfolders"
    )
    parser.add_argument("--out", required=True, help="index directory to write")
    parser.add_argument(
        "--split",
        choices=("train", "all"),
        default="train",
        help="train: the fixed 90%% training split the model was trained on (default); all: every image",
    )
    parser.add_argument(
        "--output",
        choices=("loss", "square", "mean", "l1", "l2"),
        default=spec.output,
        help="output function (default mean: D-TRAK's best on the LDS benchmark, docs/evaluation.md)",
    )
    parser.add_argument("--buckets", type=positive_int, default=spec.buckets)
    parser.add_argument("--timesteps-per-bucket", type=positive_int, default=spec.timesteps_per_bucket)
    parser.add_argument("--noise-draws", type=positive_int, default=spec.noise_draws)
    parser.add_argument("--noise-seed", type=non_negative_int, default=spec.noise_seed)
    parser.add_argument("--proj-dim", type=positive_int, default=spec.proj_dim)
    parser.add_argument(
        "--projector",
        choices=PROJECTORS,
        default=spec.projector,
        help="countsketch / gaussian: exact per-example gradients (vmap), then projected; kronecker: "
        "layer-wise projection of activations and output gradients, no per-example gradients formed "
        "(faster; docs/benchmarks/featurize_speed.md)",
    )
    parser.add_argument("--proj-seed", type=non_negative_int, default=spec.proj_seed)
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=spec.precision,
        help="kronecker only: bf16 runs the forward and backward under bfloat16 autocast: ~1.4x faster "
        "on CPUs with AVX512-BF16 or AMX, but it loses the high-timestep attributions (t = 950: "
        "agreement with exact scores ~0.6-0.75 instead of ~0.995), so only for low timesteps or "
        "timestep-averaged outputs (bench/precision_agreement.py); mixed: bf16 below --bf16-below, "
        "or where --calibrate measures it safe, fp32 above; default fp32",
    )
    parser.add_argument(
        "--bf16-below",
        type=non_negative_int,
        default=0,
        metavar="T",
        help="with --precision mixed: timesteps t < T run in bf16 (0, the default: chosen by --calibrate)",
    )
    parser.add_argument(
        "--params",
        nargs="+",
        default=[],
        metavar="PREFIX",
        help="featurize only the gradient of these parameters (module or parameter names, e.g. up_blocks.2 "
        "conv_norm_out conv_out): faster, at an accuracy cost measured by bench/param_subsets.py",
    )
    parser.add_argument(
        "--calibrate",
        type=non_negative_int,
        default=0,
        metavar="N",
        help="measure where the gradient norm is on N training images first, then keep the heaviest small "
        "tensors as exact coordinates and (kronecker) form the heaviest layers' gradients exactly: "
        "closer to the exact scores at the same k (docs/benchmarks/featurize_speed.md); 0: off (default)",
    )
    parser.add_argument(
        "--normalize",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="L2-normalize stored and query vectors (Diffusion-ReTrac; default on)",
    )
    parser.add_argument(
        "--center",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="subtract each bucket's mean training feature before whitening: removes the gradient "
        "direction every image shares at high noise (default on)",
    )
    parser.add_argument(
        "--das-weights",
        action="store_true",
        help="scale TRAK rows by their residual norm (DAS code's scalar shortcut; --method das: the paper's)",
    )
    parser.add_argument(
        "--method",
        choices=METHODS,
        default="trak",
        help="trak (TRAK / D-TRAK by --output; per step: Journey-TRAK), das, tracin, retrac (need "
        "--checkpoints), ekfac (influence functions); see explorer/index_methods.py",
    )
    parser.add_argument(
        "--checkpoints", help="tracin/retrac: the training run's OUT/checkpoint/history folder"
    )
    parser.add_argument("--num-checkpoints", type=positive_int, default=4, help="tracin/retrac (default 4)")
    parser.add_argument(
        "--damping", type=positive_float, default=1e-3, help="ekfac: lambda / mean eigenvalue (default 1e-3)"
    )
    parser.add_argument("--fit-images", type=positive_int, default=1000, help="ekfac: images the factors see")
    parser.add_argument(
        "--das-kernel",
        choices=("output", "loss"),
        default="output",
        help="das: the kernel from the output function's gradients (default) or the loss gradients' (Fisher)",
    )
    parser.add_argument(
        "--lambda",
        dest="relative_lambda",
        type=lambda_rule,
        default=DEFAULT_RELATIVE_LAMBDA,
        help="ridge lambda relative to the mean eigenvalue of Phi^T Phi (default "
        f"{DEFAULT_RELATIVE_LAMBDA:g}, "
        "chosen on the shipped model's dev split), or gcv: chosen by GCV on held-out training features",
    )
    parser.add_argument(
        "--storage",
        choices=STORAGES,
        default="float32",
        help="float32 (exact), float16 or int8 (FAISS scalar quantizer: 1/2 or 1/4 of the disk)",
    )
    add_index_type(parser)
    parser.add_argument("--chunk-size", type=positive_int, default=64, help="examples per resumable chunk")
    parser.add_argument(
        "--device",
        choices=DEVICES,
        default="cpu",
        help="where the gradients run: auto takes a CUDA GPU or Apple MPS when torch sees one (default: cpu)",
    )
    parser.add_argument(
        "--workers",
        type=positive_int,
        default=None,
        help="featurizing threads, each on its own copy of the model with torch's threads divided among "
        "them (default: 2 where torch has 2 or more threads, else 1)",
    )
    parser.add_argument(
        "--limit", type=positive_int, default=None, help="featurize only the first N images (quick trials)"
    )
    parser.add_argument(
        "--keep-features",
        action="store_true",
        help="also keep the raw projected features, so `reindex` can try other settings without gradients",
    )
    parser.set_defaults(run=run_featurize)

    parser = commands.add_parser(
        "reindex", help="a new index from kept raw features (other normalization, DAS, lambda, storage)"
    )
    parser.add_argument(
        "--features-from", required=True, help="an index directory featurized with --keep-features"
    )
    parser.add_argument("--out", required=True, help="index directory to write")
    parser.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--center", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--das-weights", action="store_true")
    parser.add_argument("--das-kernel", choices=("output", "loss"), help="a das index with this kernel")
    parser.add_argument(
        "--as-retrac",
        action="store_true",
        help="a tracin index's features as ReTrac (unit gradient per checkpoint)",
    )
    parser.add_argument(
        "--lambda",
        dest="relative_lambda",
        type=lambda_rule,
        default=DEFAULT_RELATIVE_LAMBDA,
        help=f"relative ridge lambda (default {DEFAULT_RELATIVE_LAMBDA:g}) or gcv",
    )
    parser.add_argument(
        "--storage",
        choices=STORAGES,
        default="float32",
        help="float32 (exact), float16 or int8 (FAISS scalar quantizer: 1/2 or 1/4 of the disk)",
    )
    add_index_type(parser)
    parser.set_defaults(run=run_reindex)


def add_index_type(parser) -> None:
    parser.add_argument(
        "--index-type",
        choices=("flat", "ivf"),
        default="flat",
        help="flat: exact search (default); ivf: inverted lists for large training sets (~1M rows), "
        "nlist ~ sqrt(N) and nprobe calibrated for recall@10 >= 0.95, both recorded in meta.json",
    )
    parser.add_argument(
        "--ivf-nlist", type=positive_int, default=None, help="IVF lists (default: the rule, ~sqrt(N))"
    )
    parser.add_argument(
        "--ivf-nprobe",
        type=positive_int,
        default=None,
        help="IVF lists scanned per query (default: calibrated per bucket)",
    )
    parser.add_argument(
        "--ivf-on-disk",
        action="store_true",
        help="IVF: keep the inverted lists in bucket_BB.ivfdata files, memory-mapped when served (indexes "
        "larger than memory)",
    )


def run_featurize(args) -> None:
    import numpy as np
    import torch

    from explorer.data import load_dataset, to_model_range, train_heldout_split
    from explorer.features import FeatureSpec
    from precompute.calibration import calibrate, calibration_rows
    from precompute.collective import Collective
    from precompute.featurize import FeaturizeOptions, featurize
    from precompute.method_build import MethodOptions

    collective = Collective.from_env()  # torchrun's ranks, or one process
    model = _featurize_model(args)
    dataset = load_dataset(args.data, model.image_size, model.image_channels)
    if args.split == "train":
        dataset, _ = train_heldout_split(dataset)
    if args.limit is not None:
        dataset = dataset.subset(np.arange(min(args.limit, len(dataset))), f"first{args.limit}")
    spec = FeatureSpec(
        output=args.output,
        buckets=args.buckets,
        timesteps_per_bucket=args.timesteps_per_bucket,
        noise_draws=args.noise_draws,
        noise_seed=args.noise_seed,
        projector=args.projector,
        proj_dim=args.proj_dim,
        proj_seed=args.proj_seed,
        params=tuple(args.params),
        precision=args.precision,
        bf16_below=args.bf16_below,
    )
    if args.calibrate:
        rows = calibration_rows(args.calibrate, len(dataset))
        calibration = calibrate(
            model, spec, torch.from_numpy(to_model_range(dataset.images[rows])), args.chunk_size
        )
        spec = calibration.spec
        print(calibration.summary())
    options = FeaturizeOptions(
        normalize=args.normalize,
        center=args.center,
        das_weights=args.das_weights,
        relative_lambda=args.relative_lambda,
        storage=args.storage,
        chunk_size=args.chunk_size,
        keep_features=args.keep_features,
        index_type=args.index_type,
        ivf_nlist=args.ivf_nlist,
        ivf_nprobe=args.ivf_nprobe,
        ivf_on_disk=args.ivf_on_disk,
        workers=args.workers,
        method=MethodOptions(
            name=args.method,
            checkpoints=args.checkpoints,
            num_checkpoints=args.num_checkpoints,
            relative_damping=args.damping,
            fit_images=args.fit_images,
            das_kernel=args.das_kernel,
        ),
    )
    try:
        report = featurize(model, dataset, args.out, spec, options, collective)
    finally:
        collective.close()
    rank = f"rank {collective.rank} of {collective.world_size}: " if collective.world_size > 1 else ""
    done = f"index written to {report.directory}" if report.complete else "the index is not complete yet"
    line = (
        f"{rank}featurized {len(dataset)} images x {spec.buckets} buckets: {report.pairs} gradients in "
        f"{report.seconds:.1f} s "
        f"= {report.pairs_per_second:.1f} gradient-examples/s "
        f"({report.pairs_per_second / spec.buckets:.1f} images/s); peak RSS {_peak_rss_gb():.2f} GB; {done}"
    )
    sys.stdout.write(line + "\n")  # one write: the ranks of a torchrun share this stream
    sys.stdout.flush()


def _featurize_model(args):
    """The model of --model, --lora and --lora-scale, checked against --params lora and --calibrate."""
    from explorer.device import resolve_device
    from explorer.lora import require_adapter
    from explorer.model import load_model
    from explorer.spec import LORA

    scale = 1.0 if args.lora_scale is None else args.lora_scale
    model = load_model(args.model, resolve_device(args.device), args.lora, scale)
    if LORA in args.params:
        require_adapter(model)
    if args.calibrate and model.latent is not None:
        raise ExplorerError(
            f"--calibrate measures a pixel model's exact coordinates and bf16 range; {args.model!r} is "
            "a latent text-to-image model: featurize it without --calibrate"
        )
    return model


def _peak_rss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux reports KiB


def run_reindex(args) -> None:
    from precompute.featurize import FeaturizeOptions, reindex

    options = FeaturizeOptions(
        normalize=args.normalize,
        center=args.center,
        das_weights=args.das_weights,
        relative_lambda=args.relative_lambda,
        storage=args.storage,
        index_type=args.index_type,
        ivf_nlist=args.ivf_nlist,
        ivf_nprobe=args.ivf_nprobe,
        ivf_on_disk=args.ivf_on_disk,
    )
    print(
        f"index written to {reindex(args.features_from, args.out, options, args.as_retrac, args.das_kernel)}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m precompute", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    commands = parser.add_subparsers(dest="command", required=True)
    add_train(commands)
    add_featurize(commands)
    add_evaluate(commands)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        args.run(args)
    except ExplorerError as error:
        print(f"error: {error}{flag_hint(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
