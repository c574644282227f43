"""Featurizing a subset of the parameters: speed and agreement with the full exact scores.

    flock /tmp/cpu.lock python -m bench.param_subsets --json bench/results/param_subsets.json

The setting of bench/featurize_vs_traker.py (the shipped model, N mnist5k training images, D-TRAK's
`square` output over 10 timesteps, k = 2048): for each parameter subset (`--params` of precompute
featurize) and projector, images/s of FeatureComputer.features (median of --runs, after a warm-up)
and the Spearman agreement of its scores for held-out queries with the exact scores of the FULL
gradient (all parameters, unprojected), averaged over --seeds projection seeds. The gap to the
"all" row is the accuracy cost of leaving parameters out; the subset's share of the squared
gradient norm (precompute.featurize.calibration.gradient_shares on the first 16 images) says how much of the
gradient it holds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch

from bench.fidelity import agreement, exact_gradients, over_seeds
from explorer.data import load_dataset, to_model_range, train_heldout_split
from explorer.features import FeatureComputer, FeatureSpec
from explorer.model import load_model
from precompute.featurize.calibration import gradient_shares

ROOT = Path(__file__).resolve().parents[1]

SUBSETS = {
    "all": (),
    "decoder (up_blocks, conv_norm_out, conv_out)": ("up_blocks", "conv_norm_out", "conv_out"),
    "last level (up_blocks.2, conv_norm_out, conv_out)": ("up_blocks.2", "conv_norm_out", "conv_out"),
    "conv_out": ("conv_out",),
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=str(ROOT / "assets/model"))
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--queries", type=int, default=24)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--proj-dim", type=int, default=2048)
    parser.add_argument("--projectors", nargs="+", default=["countsketch", "kronecker"])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    model = load_model(args.model)
    train_set, heldout = train_heldout_split(load_dataset("mnist5k", model.sample_size))
    train = torch.from_numpy(to_model_range(train_set.images[: args.n]))
    queries = torch.from_numpy(to_model_range(heldout.images[: args.queries]))
    base = FeatureSpec(output="square", buckets=1, timesteps_per_bucket=10, proj_dim=args.proj_dim)
    reference = FeatureComputer(model, base)
    exact = exact_gradients(reference, torch.cat([train, queries]))  # (N + Q, d): the full gradients
    shares = gradient_shares(reference, train[:16])
    zeros = torch.zeros(args.n, dtype=torch.long)
    rows = []
    for label, prefixes in SUBSETS.items():
        for projector in args.projectors:
            spec = dataclasses.replace(base, projector=projector, params=prefixes)
            computer = FeatureComputer(model, spec)
            computer.features(train[:8], zeros[:8])  # warm-up
            times, per_seed = [], []
            for _ in range(args.runs):
                started = time.perf_counter()
                phi = computer.features(train, zeros).numpy()
                times.append(time.perf_counter() - started)
            for seed in range(args.seeds):
                seeded = (
                    computer
                    if seed == 0
                    else FeatureComputer(model, dataclasses.replace(spec, proj_seed=seed))
                )
                phi = seeded.features(train, zeros).numpy()
                phi_q = seeded.features(queries, torch.zeros(len(queries), dtype=torch.long)).numpy()
                per_seed.append(agreement(phi, phi_q, exact[: args.n], exact[args.n :]))
            share = sum(shares[name] for name in computer.names)
            rows.append(
                {
                    "subset": label,
                    "params": list(prefixes),
                    "projector": projector,
                    "num_params": computer.num_params,
                    "norm_share": share,
                    "images_per_s": [args.n / t for t in times],
                    "median_images_per_s": args.n / statistics.median(times),
                    "spearman": over_seeds(per_seed),
                }
            )
            print(f"  {label}, {projector}: {rows[-1]['median_images_per_s']:.1f} images/s", flush=True)

    print(
        f"\nN = {args.n}, {args.queries} queries, square over 10 timesteps, k = {args.proj_dim}, "
        f"{args.runs} runs, "
        f"agreement with the full exact scores averaged over {args.seeds} seeds\n"
    )
    print(
        "| parameters | projector | parameters featurized | share of the squared gradient norm | "
        "images/s (median) "
        "| Spearman, inner product | Spearman, cosine |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        s = row["spearman"]
        print(
            f"| {row['subset']} | {row['projector']} | {row['num_params']:,} | {row['norm_share']:.1%} | "
            f"{row['median_images_per_s']:.1f} | {s['inner']['mean']:.4f} | {s['cosine']['mean']:.4f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
