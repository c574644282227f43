"""The `featurize` and `reindex` commands of the precompute CLI: their options and what each runs.

The options that say how an index is built from features (normalization, centering, DAS weights, lambda,
storage, index type) are the same for both commands, so they are declared once (`add_index_options`) and
read once (`index_options`).
"""

from __future__ import annotations

import argparse
import sys

from explorer.device import DEVICES
from explorer.errors import ExplorerError
from explorer.model_args import add_model_arguments
from precompute.cli_types import lambda_rule, non_negative_int, positive_float, positive_int


def add_featurize(commands) -> None:
    """The `featurize` and `reindex` subcommands."""
    parser = commands.add_parser("featurize", help="per-example projected gradients -> an index directory")
    _add_data_options(parser)
    _add_feature_options(parser)
    _add_method_options(parser)
    add_index_options(parser)
    _add_run_options(parser)
    parser.set_defaults(run=run_featurize)

    parser = commands.add_parser(
        "reindex", help="a new index from kept raw features (other normalization, DAS, lambda, storage)"
    )
    parser.add_argument(
        "--features-from", required=True, help="an index directory featurized with --keep-features"
    )
    parser.add_argument("--out", required=True, help="index directory to write")
    parser.add_argument("--das-kernel", choices=("output", "loss"), help="a das index with this kernel")
    parser.add_argument(
        "--as-retrac",
        action="store_true",
        help="a tracin index's features as ReTrac (unit gradient per checkpoint)",
    )
    add_index_options(parser)
    parser.set_defaults(run=run_reindex)


def _add_data_options(parser) -> None:
    """Which model, which images, where the index goes."""
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
        "--limit", type=positive_int, default=None, help="featurize only the first N images (quick trials)"
    )


def _add_feature_options(parser) -> None:
    """The fields of the FeatureSpec: output function, buckets, noise, projection, precision, parameters."""
    from explorer.features import PRECISIONS, FeatureSpec
    from explorer.projector import PROJECTORS

    spec = FeatureSpec()
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


def _add_method_options(parser) -> None:
    """The attribution method and the settings only some methods read."""
    from explorer.index_methods import METHODS

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


def add_index_options(parser) -> None:
    """How the index is built from features: the options `featurize` and `reindex` share."""
    from explorer.index import STORAGES
    from explorer.whitening import DEFAULT_RELATIVE_LAMBDA

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


def _add_run_options(parser) -> None:
    """How the featurize runs: chunks, device, threads, what it keeps."""
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
        "--keep-features",
        action="store_true",
        help="also keep the raw projected features, so `reindex` can try other settings without gradients",
    )


def index_options(args, **more):
    """FeaturizeOptions from the options of `add_index_options`, plus `more` (featurize's own fields)."""
    from precompute.featurize.pipeline import FeaturizeOptions

    return FeaturizeOptions(
        normalize=args.normalize,
        center=args.center,
        das_weights=args.das_weights,
        relative_lambda=args.relative_lambda,
        storage=args.storage,
        index_type=args.index_type,
        ivf_nlist=args.ivf_nlist,
        ivf_nprobe=args.ivf_nprobe,
        ivf_on_disk=args.ivf_on_disk,
        **more,
    )


def feature_spec(args):
    """The FeatureSpec of the `_add_feature_options` options (before any calibration)."""
    from explorer.features import FeatureSpec

    return FeatureSpec(
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


def run_featurize(args) -> None:
    from precompute.featurize.collective import Collective
    from precompute.featurize.method_build import MethodOptions
    from precompute.featurize.pipeline import featurize

    collective = Collective.from_env()  # torchrun's ranks, or one process
    model = _featurize_model(args)
    dataset = _featurize_dataset(args, model)
    spec = feature_spec(args)
    if args.calibrate:
        spec = _calibrated(args, model, dataset, spec)
    method = MethodOptions(
        name=args.method,
        checkpoints=args.checkpoints,
        num_checkpoints=args.num_checkpoints,
        relative_damping=args.damping,
        fit_images=args.fit_images,
        das_kernel=args.das_kernel,
    )
    options = index_options(
        args,
        chunk_size=args.chunk_size,
        keep_features=args.keep_features,
        workers=args.workers,
        method=method,
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


def _featurize_dataset(args, model):
    """The images of --data at the model's size: the training split unless --split all, the first --limit."""
    import numpy as np

    from explorer.data import load_dataset, train_heldout_split

    dataset = load_dataset(args.data, model.image_size, model.image_channels)
    if args.split == "train":
        dataset, _ = train_heldout_split(dataset)
    if args.limit is not None:
        dataset = dataset.subset(np.arange(min(args.limit, len(dataset))), f"first{args.limit}")
    return dataset


def _calibrated(args, model, dataset, spec):
    """The spec with --calibrate's exact coordinates and bf16 range, measured on that many training images."""
    import torch

    from explorer.data import to_model_range
    from precompute.featurize.calibration import calibrate, calibration_rows

    rows = calibration_rows(args.calibrate, len(dataset))
    images = torch.from_numpy(to_model_range(dataset.images[rows]))
    calibration = calibrate(model, spec, images, args.chunk_size)
    print(calibration.summary())
    return calibration.spec


def _peak_rss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux reports KiB


def run_reindex(args) -> None:
    from precompute.featurize.pipeline import reindex

    directory = reindex(args.features_from, args.out, index_options(args), args.as_retrac, args.das_kernel)
    print(f"index written to {directory}")
