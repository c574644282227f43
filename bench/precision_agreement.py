"""Agreement with exact scores of kronecker features in fp32 and in bf16, one timestep at a time.

    flock /tmp/cpu.lock python -m bench.precision_agreement                       # shipped spec: mean, k
    = 512
    flock /tmp/cpu.lock python -m bench.precision_agreement --output square --proj-dim 2048

For the shipped model, N mnist5k training images and Q held-out queries, a calibrated kronecker spec
with --buckets buckets of one timestep each; for each bucket in --bucket-ids: the Spearman agreement
(explorer's fidelity measure, as bench/featurize_vs_traker.py uses it) of the fp32 and bf16 features'
scores with the exact scores from full unprojected fp32 gradients, and how far bf16 moves the features
relative to what distinguishes the examples: ||bf16 - fp32|| / ||fp32 - mean over the N examples||,
median over examples. At high timesteps x_t is mostly the shared noise, so the per-example gradients
differ from their mean by a small fraction of their norm, and bfloat16 rounding, whose error scales
with the full norm, can exceed that difference.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import torch

from bench.fidelity import agreement, exact_gradients
from explorer.data import load_dataset, to_model_range, train_heldout_split
from explorer.features import FeatureComputer, FeatureSpec
from explorer.model import load_model
from precompute.featurize.calibration import calibrate

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=str(ROOT / "assets/model"))
    parser.add_argument("--output", default="mean")
    parser.add_argument("--proj-dim", type=int, default=512)
    parser.add_argument("--buckets", type=int, default=10)
    parser.add_argument("--bucket-ids", type=int, nargs="+", default=[0, 5, 9])
    parser.add_argument("--n", type=int, default=256, help="training images scored")
    parser.add_argument("--queries", type=int, default=24)
    parser.add_argument("--calibrate", type=int, default=16)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = load_model(args.model)
    train_set, heldout = train_heldout_split(load_dataset("mnist5k", model.sample_size))
    train = torch.from_numpy(to_model_range(train_set.images[: args.n]))
    queries = torch.from_numpy(to_model_range(heldout.images[: args.queries]))
    spec = FeatureSpec(
        output=args.output, buckets=args.buckets, projector="kronecker", proj_dim=args.proj_dim
    )
    spec = calibrate(model, spec, train[: args.calibrate]).spec
    computers = {
        precision: FeatureComputer(model, dataclasses.replace(spec, precision=precision))
        for precision in ("fp32", "bf16")
    }
    timesteps = computers["fp32"].timesteps
    print(
        f"{args.output}, k = {args.proj_dim}, calibrated kronecker, N = {args.n}, {args.queries} "
        "queries; Spearman of "
        "scores with exact scores (inner product / cosine)\n"
    )
    print("| bucket (t) | fp32 | bf16 | bf16 move / example-specific part |")
    print("|---|---|---|---|")
    for bucket in args.bucket_ids:
        ids_train, ids_queries = torch.full((args.n,), bucket), torch.full((args.queries,), bucket)
        exact_train = exact_gradients(computers["fp32"], train, ids_train)
        exact_queries = exact_gradients(computers["fp32"], queries, ids_queries)
        cells, features = [], {}
        for precision, computer in computers.items():
            phi_train = computer.features(train, ids_train).numpy()
            features[precision] = phi_train
            scores = agreement(
                phi_train, computer.features(queries, ids_queries).numpy(), exact_train, exact_queries
            )
            cells.append(f"{scores['inner']['mean']:.4f} / {scores['cosine']['mean']:.4f}")
        specific = np.linalg.norm(features["fp32"] - features["fp32"].mean(0), axis=1)
        moved = np.linalg.norm(features["bf16"] - features["fp32"], axis=1)
        print(
            f"| {bucket} ({timesteps[bucket][0]}) | {cells[0]} | {cells[1]} | "
            f"{np.median(moved / specific):.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
