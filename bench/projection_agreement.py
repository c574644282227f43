"""How well projected scores rank training images like the exact, unprojected scores.

    flock /tmp/cpu.lock python -m bench.projection_agreement            # shipped model, k 512 and 2048

On a subsample (--train training images, --queries held-out images, one bucket) of mnist5k with
the shipped model, the exact per-example gradients G (N, d) and g_q come from the vmap path, and
exact scores are computed in kernel form (no d x d matrix): with K = G G^T,

    inner product   s_q = G g_q
    TRAK            s_q = (K + lambda I)^-1 G g_q  = G (G^T G + lambda I)^-1 g_q,  lambda = rel * trace(K) / N
    TRAK + ReTrac   s_q,i / ||whitened g_i||,      ||whitened g_i||^2 = [K (K + lambda I)^-1]_ii

The same formulas on the projected features Phi (N, k) give each projector's scores (lambda
relative to the same trace(Phi Phi^T) / N). The agreement is Spearman(exact s_q, projected s_q)
over the training images, averaged over the queries; each projector runs with --seeds seeds.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from bench.fidelity import exact_gradients
from explorer.data import load_builtin, to_model_range, train_heldout_split
from explorer.features import FeatureComputer, FeatureSpec
from explorer.model import load_model
from explorer.projector import make_projector

ROOT = Path(__file__).resolve().parents[1]


def scores(train: np.ndarray, query: np.ndarray, kind: str, relative_lambda: float) -> np.ndarray:
    """train (N, d), query (Q, d) float64 -> (Q, N) scores of one kind (see the module docstring)."""
    kernel, cross = train @ train.T, query @ train.T  # (N, N), (Q, N)
    if kind == "inner product":
        return cross
    n = len(train)
    solve = np.linalg.inv(kernel + relative_lambda * np.trace(kernel) / n * np.eye(n))  # symmetric
    out = cross @ solve
    if kind == "TRAK + ReTrac":
        out = out / np.sqrt(np.clip(np.diag(kernel @ solve), 1e-300, None))[None, :]
    return out


def agreement(exact: np.ndarray, approx: np.ndarray) -> float:
    return float(np.mean([spearmanr(e, a)[0] for e, a in zip(exact, approx)]))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=str(ROOT / "assets" / "model"))
    parser.add_argument("--train", type=int, default=200)
    parser.add_argument("--queries", type=int, default=24)
    parser.add_argument("--bucket", type=int, default=3, help="bucket of 10 (t = 350 by default)")
    parser.add_argument("--output", default="square")
    parser.add_argument("--dims", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--lambdas", type=float, nargs="+", default=[0.01, 1.0], help="relative lambda for TRAK"
    )
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    train, heldout = train_heldout_split(load_builtin("mnist5k", model.sample_size))
    images = torch.from_numpy(
        to_model_range(np.concatenate([train.images[: args.train], heldout.images[: args.queries]]))
    )
    buckets = torch.full((len(images),), args.bucket)

    # 1. exact per-example gradients (vmap reference), flattened: (N + Q, d)
    reference = FeatureComputer(model, FeatureSpec(output=args.output, projector="countsketch", proj_dim=1))
    started = time.perf_counter()
    flat = torch.from_numpy(exact_gradients(reference, images, buckets))  # (N + Q, d) float32
    print(
        f"exact gradients: {tuple(flat.shape)} in {time.perf_counter() - started:.1f} s; t = "
        f"{reference.timesteps[args.bucket]}, output {args.output}, {args.queries} queries x "
        f"{args.train} training images"
    )

    kinds = [("inner product", 0.0)] + [
        (kind, lam) for lam in args.lambdas for kind in ("TRAK", "TRAK + ReTrac")
    ]
    exact64 = flat.double().numpy()
    exact = {
        (kind, lam): scores(exact64[: args.train], exact64[args.train :], kind, lam) for kind, lam in kinds
    }
    header = "".join(
        f"{kind + (f' l={lam:g}' if kind != 'inner product' else ''):>24}" for kind, lam in kinds
    )
    print(f"\nSpearman vs exact scores, mean over queries (median over {args.seeds} seeds, [min, max])")
    print(f"{'projector':<12}{'k':>6}{header}")
    for dim in args.dims:
        for projector in ("countsketch", "kronecker"):
            values: dict[tuple[str, float], list[float]] = {key: [] for key in kinds}
            for seed in range(args.seeds):
                spec = FeatureSpec(output=args.output, projector=projector, proj_dim=dim, proj_seed=seed)
                if projector == "kronecker":
                    phi = FeatureComputer(model, spec).features(images, buckets)
                else:  # project the exact gradients already computed (the vmap cost is the same for every
                    # seed)
                    sketch = make_projector(projector, flat.shape[1], dim, seed)
                    phi = torch.cat([sketch.project([flat[s : s + 32]]) for s in range(0, len(flat), 32)])
                phi64 = phi.double().numpy()
                for kind, lam in kinds:
                    values[(kind, lam)].append(
                        agreement(
                            exact[(kind, lam)], scores(phi64[: args.train], phi64[args.train :], kind, lam)
                        )
                    )
            cells = "".join(
                f"{statistics.median(v):>8.3f} [{min(v):.3f},{max(v):.3f}]" for v in values.values()
            )
            print(f"{projector:<12}{dim:>6}{cells}")


if __name__ == "__main__":
    main()
