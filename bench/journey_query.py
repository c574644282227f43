"""The per-step query against Journey-TRAK's (arXiv 2312.06205): where the explorer deviates, measured.

    python -m bench.journey_query --index assets/index runs/loss512

Journey-TRAK's query at step t (its code: the DDPM loss of x0hat_t re-noised with fresh noise at t) differs
from the explorer's in two ways: the explorer re-noises x0hat at its *bucket's* timestep (the training
features exist only there) and with the bucket's *shared* noise draw. Each variant below is scored as a
per-step LDS on the shipped-model benchmark (precompute.evaluation.shipped.lds: test-split models and
trajectories, bootstrap intervals), against the trajectory-tied truth and the re-noised-x0hat proxy:
- served: x0hat at the bucket's timestep, shared noise (what the explorer serves);
- own t: x0hat at the step's own timestep, shared noise;
- own t, fresh noise: x0hat at its own timestep with a seeded fresh draw per query (Journey-TRAK as written);
- trajectory: the trajectory's own x_t at its own t, with the noise eps* that maps the final image to x_t.
Training features are the index's in every case. Writes --json (default bench/results/journey_query.json).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from explorer.features import FeatureComputer, bucket_of_timestep
from explorer.index import AttributionIndex
from explorer.model import load_model
from explorer.noising import joining_noise
from explorer.scoring import blocked_predictions
from precompute.evaluation.metrics import lds_interval
from precompute.evaluation.shipped.lds import split
from precompute.evaluation.shipped.truth import QUERIES_NAME, Queries, TruthConfig, load_truth

ROOT = Path(__file__).resolve().parents[1]

VARIANTS = ("served", "own t", "own t, fresh noise", "trajectory")


def features_at(computer: FeatureComputer, x0: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor):
    """(P, k) projected gradients of the output at explicit (x0, t, noise) per query: x_t = sqrt(abar) x0 +
    sqrt(1 - abar) noise (DDPM eq. 4), one draw each."""
    if computer.projector is None:
        raise SystemExit("this bench featurizes with count-sketch or Gaussian indexes, not kronecker")
    grads = computer._per_example_grad(computer.params, x0, timesteps[:, None], noise[:, None])
    return computer.projector.project([grads[name] for name in computer.names]).numpy()


def step_queries(computer: FeatureComputer, queries: Queries, buckets: int, T: int) -> dict[str, np.ndarray]:
    """{variant: (G J, k) raw features} and the bucket of each step query."""
    timesteps = torch.from_numpy(queries.timesteps.ravel().astype(np.int64))
    bucket = torch.tensor([bucket_of_timestep(int(t), buckets, T) for t in timesteps])
    x0hat = torch.from_numpy(queries.x0hat).flatten(0, 1)
    shared = computer.noise[bucket][:, 0]  # (P, C, H, W): the bucket's first draw
    fresh = torch.randn(shared.shape, generator=torch.Generator().manual_seed(0))
    abar = computer.abar[timesteps].view(-1, 1, 1, 1)
    finals = torch.from_numpy(np.repeat(queries.finals, queries.timesteps.shape[1], axis=0))
    xt = torch.from_numpy(queries.xt).flatten(0, 1)
    eps_star = joining_noise(xt, finals, abar)
    bucket_t = torch.tensor([computer.timesteps[int(b)][0] for b in bucket])
    return {
        "served": computer.features(x0hat, bucket).numpy(),
        "own t": features_at(computer, x0hat, timesteps, shared),
        "own t, fresh noise": features_at(computer, x0hat, timesteps, fresh),
        "trajectory": features_at(computer, finals, timesteps, eps_star),
        "_buckets": bucket.numpy(),
        "_bucket_t": bucket_t.numpy(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="assets/model")
    parser.add_argument("--index", nargs="+", default=["assets/index"])
    parser.add_argument("--truth", default="bench/results/lds_mnist5k")
    parser.add_argument("--json", default="bench/results/journey_query.json")
    args = parser.parse_args()

    model = load_model(args.model)
    truth_dir = Path(args.truth)
    config_json = json.loads((truth_dir / "config.json").read_text())["truth"]
    config = TruthConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in config_json.items()})
    queries = Queries.load(truth_dir / QUERIES_NAME)
    out = {"command": "python -m bench.journey_query " + " ".join(sys.argv[1:]), "indexes": {}}
    for directory in args.index:
        index = AttributionIndex.load(directory, model_hash=model.weights_hash)
        table = load_truth(truth_dir, index.meta.count)
        parts = split(table, queries, config)
        models, gen = parts.models["test"], parts.generated["test"]
        computer = FeatureComputer(model, index.meta.spec)
        raw = step_queries(computer, queries, index.buckets, index.meta.num_train_timesteps)
        buckets = raw["_buckets"]
        G, J = queries.timesteps.shape
        result = {"label": index.label}
        for variant in VARIANTS:
            vectors = index.query_vectors(raw[variant], buckets)
            predicted = np.empty((len(table.masks), len(buckets)))
            for b in np.unique(buckets):
                rows = np.flatnonzero(buckets == b)
                predicted[:, rows] = blocked_predictions(table.masks, index.vectors(int(b)), vectors[rows])
            g = predicted.reshape(len(table.masks), G, J)[models][:, gen]
            clusters = np.repeat(gen, J)
            result[variant] = {
                truth: lds_interval(
                    table.rows[truth][models][:, gen].reshape(len(models), -1),
                    g.reshape(len(models), -1),
                    clusters,
                )
                for truth in ("step_trajectory", "step_proxy")
            }
            print(
                f"{directory} {variant}: "
                + ", ".join(f"{k} {v['mean']:.3f}" for k, v in result[variant].items())
            )
        result["timestep_offset"] = float(np.abs(queries.timesteps.ravel() - raw["_bucket_t"]).mean())
        out["indexes"][directory] = result
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
