"""Which index settings keep per-step attributions sound over the whole slider (issue 19's candidates).

    python -m bench.step_candidates --features mean=runs/mean512 loss=runs/loss512 --json
    bench/results/step_candidates.json

Each `--features NAME=DIR` is an index built by `precompute featurize --keep-features` on the shipped
model; every
candidate (output x centering x relative lambda) is scored per bucket from those raw features through
explorer.scoring, on the 500 held-out mnist5k digits queried at each bucket's timestep. The summary is given
on the dev half and on the test half separately; choose on dev (the script marks the dev choice per output and
centering), read the test columns only for the choice.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from explorer.atomic import write_json_atomic
from explorer.data import load_dataset, train_heldout_split
from explorer.index import read_meta
from explorer.model import load_model
from precompute.evaluation.shipped.step_quality import (
    candidate_scores,
    heldout_split,
    query_features,
    step_quality,
)

LAMBDAS = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="assets/model")
    parser.add_argument(
        "--features", nargs="+", required=True, help="NAME=DIR of indexes built with --keep-features"
    )
    parser.add_argument("--cache", default="runs/step_candidates", help="query features are cached here")
    parser.add_argument("--json", default="bench/results/step_candidates.json")
    args = parser.parse_args()

    model = load_model(args.model)
    train, heldout = train_heldout_split(load_dataset("mnist5k", model.sample_size))
    dev = heldout_split(len(heldout))
    groups = {"dev": np.flatnonzero(dev), "test": np.flatnonzero(~dev)}
    results = {
        "command": "python " + " ".join(sys.argv),
        "queries": {g: int(len(r)) for g, r in groups.items()},
        "lambdas": list(LAMBDAS),
        "candidates": {},
        "dev_choice": {},
    }
    for item in args.features:
        name, directory = item.split("=", 1)
        meta = read_meta(Path(directory))
        spec = meta.spec
        started = time.perf_counter()
        query_phi = query_features(
            model, spec, heldout.images, Path(args.cache) / f"{name}_{spec.output}_{spec.proj_dim}.npy"
        )
        train_phi = np.load(Path(directory) / "raw_features.npy", mmap_mode="r")
        print(f"{name}: query features in {time.perf_counter() - started:.0f} s", flush=True)
        for center in (False, True):
            for lam in LAMBDAS:
                key = f"{name}|{'centered' if center else 'plain'}|{lam:g}"
                per_bucket = {}
                for bucket, timesteps in enumerate(meta.timesteps):
                    scores = candidate_scores(np.asarray(train_phi[bucket]), query_phi[bucket], center, lam)
                    quality = step_quality(scores, heldout.labels, train.labels)
                    per_bucket[str(timesteps[0])] = {g: quality.summary(rows) for g, rows in groups.items()}
                results["candidates"][key] = per_bucket
                worst = min(v["dev"]["label_agreement"] for v in per_bucket.values())
                print(
                    f"{key:28s} dev agreement per bucket: "
                    + " ".join(f"{v['dev']['label_agreement']:.2f}" for v in per_bucket.values())
                    + f"  (worst {worst:.2f})",
                    flush=True,
                )
    # the dev choice of lambda per (features, centering), per bucket and one for all buckets
    for prefix in sorted({key.rsplit("|", 1)[0] for key in results["candidates"]}):
        keys = [key for key in results["candidates"] if key.rsplit("|", 1)[0] == prefix]
        buckets = list(results["candidates"][keys[0]])
        dev_mean = {
            key: np.mean([results["candidates"][key][b]["dev"]["label_agreement"] for b in buckets])
            for key in keys
        }
        one = max(keys, key=dev_mean.get)
        per_bucket = {
            b: max(keys, key=lambda key: results["candidates"][key][b]["dev"]["label_agreement"])
            for b in buckets
        }
        results["dev_choice"][prefix] = {
            "one_lambda": {
                "lambda": float(one.rsplit("|", 1)[1]),
                "dev_mean": float(dev_mean[one]),
                "test": {b: results["candidates"][one][b]["test"] for b in buckets},
            },
            "lambda_per_bucket": {
                b: {"lambda": float(key.rsplit("|", 1)[1]), "test": results["candidates"][key][b]["test"]}
                for b, key in per_bucket.items()
            },
        }
    write_json_atomic(Path(args.json), results)
    print(f"written to {args.json}")


if __name__ == "__main__":
    main()
