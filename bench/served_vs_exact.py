"""How far the served index is from exact scores at the query's own timestep (issue 19, item 6).

    python -m bench.served_vs_exact --index assets/index --queries 100 --json
    bench/results/served_vs_exact.json

The served index stores one timestep per bucket (its centre) in its storage (int8 for the shipped one); a
query at
train timestep t is searched in the bucket that holds t. The exact reference featurizes every training
image and
the query at t itself, with the index's own spec and scoring (explorer.scoring: centering, lambda,
normalization),
stored in float32. Per t: mean top-10 overlap of the two lists (positive and negative), over held-out
test-split
digits. t runs over one timestep per bucket, a quarter or three quarters into its range (alternating; never
its centre, where the stored features were taken).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch

from explorer.atomic import write_json_atomic
from explorer.data import load_dataset, to_model_range, train_heldout_split
from explorer.features import FeatureComputer, FeatureSpec, bucket_of_timestep
from explorer.index import AttributionIndex
from explorer.model import load_model
from explorer.scoring import all_scores, fit_bucket
from precompute.evaluation.shipped.step_quality import TOP, heldout_split, served_scores


def features_at(model, spec: FeatureSpec, images: np.ndarray, timestep: int) -> np.ndarray:
    """(P, k) features of uint8 images at exactly `timestep`: a one-bucket spec whose bucket is [t, t + 1)."""
    T = model.num_train_timesteps
    computer = FeatureComputer(model, dataclasses.replace(spec, buckets=T, timesteps_per_bucket=1))
    bucket = torch.full((len(images),), timestep)  # with T buckets, bucket b is timestep b
    return computer.features(torch.from_numpy(to_model_range(images)), bucket).numpy()


def overlap(first: np.ndarray, second: np.ndarray) -> float:
    """Mean share of common rows in two (P, TOP) lists."""
    return float(np.mean([len(set(a) & set(b)) / TOP for a, b in zip(first, second)]))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--index", default="assets/index")
    parser.add_argument("--model", default="assets/model")
    parser.add_argument("--queries", type=int, default=100, help="held-out test-split digits")
    parser.add_argument("--json", default="bench/results/served_vs_exact.json")
    args = parser.parse_args()

    model = load_model(args.model)
    index = AttributionIndex.load(args.index, model_hash=model.weights_hash)
    spec, meta = index.meta.spec, index.meta
    T = model.num_train_timesteps
    train, heldout = train_heldout_split(load_dataset("mnist5k", model.sample_size))
    rows = np.flatnonzero(~heldout_split(len(heldout)))[: args.queries]
    queries = heldout.images[rows]
    width = T // index.buckets
    timesteps = [b * width + (width // 4 if b % 2 == 0 else 3 * width // 4) for b in range(index.buckets)]
    results = {
        "command": "python " + " ".join(sys.argv),
        "index": index.label,
        "storage": meta.storage,
        "queries": int(len(rows)),
        "per_timestep": {},
    }
    served_computer = FeatureComputer(model, spec)
    for t in timesteps:
        started = time.perf_counter()
        bucket = bucket_of_timestep(t, index.buckets, T)
        train_phi = features_at(model, spec, train.images, t)
        query_phi = features_at(model, spec, queries, t)
        scorer, _ = fit_bucket(train_phi, meta.lambdas[bucket].relative, meta.center, index.normalize)
        exact = all_scores(scorer.vectors(train_phi), scorer.vectors(query_phi))  # (P, N)
        # what the explorer serves: the query featurized at its bucket's timestep, searched in the stored rows
        served_phi = served_computer.features(
            torch.from_numpy(to_model_range(queries)), torch.full((len(rows),), bucket)
        )
        served = served_scores(index, served_phi.numpy(), bucket)
        entry = {"bucket": bucket, "bucket_timestep": meta.timesteps[bucket][0]}
        for sign, name in ((1, "positive"), (-1, "negative")):
            entry[f"top{TOP}_overlap_{name}"] = overlap(
                np.argsort(-sign * exact, axis=1)[:, :TOP], np.argsort(-sign * served, axis=1)[:, :TOP]
            )
        entry["seconds"] = round(time.perf_counter() - started, 1)
        results["per_timestep"][str(t)] = entry
        print(t, entry, flush=True)
        write_json_atomic(Path(args.json), results)
    print(f"written to {args.json}")


if __name__ == "__main__":
    main()
