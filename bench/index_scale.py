"""Search at scale: flat vs IVF vs HNSW inner-product indexes on 100k and 1M unit vectors.

    python -m bench.index_scale                            # three data models, 100k and 1M, k = 512
    python -m bench.index_scale --sizes 100000 --data mixture --dim 256

For each data model and size N it builds an exact IndexFlatIP, IndexIVFFlat (inner product,
nlist = f sqrt(N) for each --nlist-factors f, built as `--index-type ivf` builds them; at the
explorer's nlist rule also with nprobe for q and for -q calibrated as `--index-type ivf` does,
"rule: nlist L nprobe P / P-") and IndexHNSWFlat (METRIC_INNER_PRODUCT), and
reports build time (faiss threads: --build-threads), the median and p95 latency of single queries
(one query vector, top-10, faiss threads 1 as in the explorer) and recall@10 against the exact flat
search, for the query q (positive influencers) and for -q (negative influencers, which the explorer
finds by searching with -q), over --queries held-out query vectors drawn from the same model.

Data models (vectors are L2-normalized at the end, as the explorer's ReTrac-normalized index is):
- mixture: a Gaussian mixture of --components components; the component means are drawn from an
  anisotropic Gaussian whose covariance has a power-law spectrum (eigenvalue i^-0.75 in a random
  basis) and are normalized; each vector is its component mean plus isotropic noise of norm ~0.9
  (two vectors of one component have cosine ~0.55).
- gaussian: one anisotropic Gaussian with that power-law covariance, no clusters: a continuum,
  where the 10 nearest rows of a query are not one tight cluster, the hard case for ANN indexes.
- shipped: the whitened, normalized vectors of one bucket of the shipped index (assets/index, 4,500
  rows, k = 512; --bucket, default 0, the least structured) tiled to N rows, each a random shipped
  row plus isotropic noise of norm --noise (default 1.0, cosine ~0.7 to its source row): a kernel
  density estimate of the real vectors (~220 noisy copies per real row at 1M).
How they compare with the real vectors, on 4,500-row samples at k = 512 (participation ratio of
the spectrum; mean cosine of the nearest / 10th-nearest other row):
  shipped index bucket 0 (t=50): 170; 0.59 / 0.41     bucket 5 (t=550): 5; 0.95 / 0.91
  mixture: 219; 0.45 / 0.18                           gaussian: 102; 0.31 / 0.26
so both synthetic models have less neighbour structure than any bucket of the shipped index.
None is the real distribution of 1M training gradients (no such index exists here); uniform
random vectors, which have no neighbour structure, would make every ANN index look bad.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import time
from pathlib import Path

import faiss
import numpy as np

from explorer.ivf import add_rows, build_ivf, calibrate_nprobe, nlist_rule

ROOT = Path(__file__).resolve().parents[1]


def normalize(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def power_law_gaussian(dim: int, rng: np.random.Generator):
    """f(n, rng) -> (n, dim) draws of N(0, B diag(i^-0.75) B^T) with a random orthonormal basis B."""
    basis, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    mixing = (basis * (np.arange(1, dim + 1) ** -0.375)).T.astype(
        np.float32
    )  # (dim, dim): diag(sqrt eig) B^T

    def draw(n: int, generator: np.random.Generator) -> np.ndarray:
        return generator.standard_normal((n, dim), dtype=np.float32) @ mixing

    return draw


def gaussian_model(dim: int, seed: int):
    """A sampler of unit vectors from the one anisotropic Gaussian described above."""
    draw = power_law_gaussian(dim, np.random.default_rng(seed))

    def sample(n: int, rng: np.random.Generator) -> np.ndarray:
        out = np.empty((n, dim), dtype=np.float32)
        for start in range(0, n, 100_000):
            out[start : start + min(100_000, n - start)] = draw(min(100_000, n - start), rng)
        return normalize(out)

    return sample


def mixture_model(dim: int, components: int, seed: int):
    """A sampler f(n, rng) -> (n, dim) float32 unit vectors of the Gaussian mixture described above."""
    rng = np.random.default_rng(seed)
    means = normalize(power_law_gaussian(dim, rng)(components, rng))  # (C, dim)

    def sample(n: int, rng: np.random.Generator) -> np.ndarray:
        out = np.empty((n, dim), dtype=np.float32)
        for start in range(0, n, 100_000):  # in blocks: float64 temporaries stay small
            size = min(100_000, n - start)
            noise = rng.standard_normal((size, dim), dtype=np.float32) * np.float32(0.9 / math.sqrt(dim))
            out[start : start + size] = means[rng.integers(components, size=size)] + noise
        return normalize(out)

    return sample


def shipped_model(bucket: int, noise: float):
    """A sampler of shipped-index rows plus isotropic noise of norm ~`noise`, normalized."""
    from explorer.index import AttributionIndex

    rows = AttributionIndex.load(ROOT / "assets/index").vectors(bucket).astype(np.float32)  # (4500, k)
    dim = rows.shape[1]

    def sample(n: int, rng: np.random.Generator) -> np.ndarray:
        out = np.empty((n, dim), dtype=np.float32)
        for start in range(0, n, 100_000):
            size = min(100_000, n - start)
            out[start : start + size] = rows[rng.integers(len(rows), size=size)] + rng.standard_normal(
                (size, dim), dtype=np.float32
            ) * np.float32(noise / math.sqrt(dim))
        return normalize(out)

    return sample, dim


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(
        np.mean([len(set(f.tolist()) & set(e.tolist())) / exact.shape[1] for f, e in zip(found, exact)])
    )


def single_query_latency(index: faiss.Index, queries: np.ndarray, top: int) -> tuple[list[float], np.ndarray]:
    """Milliseconds of each single-query search (faiss threads 1) and the ids found, (Q, top)."""
    faiss.omp_set_num_threads(1)
    times, found = [], np.empty((len(queries), top), dtype=np.int64)
    for row, query in enumerate(queries):
        started = time.perf_counter()
        _, ids = index.search(query[None], top)
        times.append((time.perf_counter() - started) * 1e3)
        found[row] = ids[0]
    return times, found


def evaluate(
    index: faiss.Index,
    queries: np.ndarray,
    exact: dict[int, np.ndarray],
    top: int,
    nprobe: tuple[int, int] | None = None,
) -> dict:
    """Latency and recall@10 for q and -q; an IVF index searches them with nprobe = (for q, for -q) if
    given."""
    if nprobe is not None:
        index.nprobe = nprobe[0]
    times_pos, found_pos = single_query_latency(index, queries, top)
    if nprobe is not None:
        index.nprobe = nprobe[1]
    times_neg, found_neg = single_query_latency(index, -queries, top)
    times = times_pos + times_neg
    return {
        "median_ms": statistics.median(times),
        "p95_ms": float(np.percentile(times, 95)),
        "median_ms_pos": statistics.median(times_pos),
        "median_ms_neg": statistics.median(times_neg),
        "recall_pos": recall(found_pos, exact[1]),
        "recall_neg": recall(found_neg, exact[-1]),
    }


def run_size(name: str, sample, n: int, args, rows: list[dict]) -> None:
    rng = np.random.default_rng(args.seed)
    started = time.perf_counter()
    data = sample(n, rng)  # (N, k)
    queries = sample(args.queries, np.random.default_rng(args.seed + 1))  # held out: fresh draws
    dim = data.shape[1]
    print(f"\n{name}: N = {n:,} x k = {dim} generated in {time.perf_counter() - started:.1f} s", flush=True)

    def report(kind: str, params: str, build_s: float, result: dict) -> None:
        row = {
            "data": name,
            "n": n,
            "dim": dim,
            "index": kind,
            "params": params,
            "build_s": build_s,
            **result,
        }
        rows.append(row)
        if args.json:  # after every row: a run that dies keeps what it measured
            Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
        print(
            f"  {kind:5s} {params:32s} build {build_s:7.1f} s   median q {result['median_ms_pos']:6.2f} ms, "
            f"-q {result['median_ms_neg']:6.2f} ms   "
            f"p95 {result['p95_ms']:7.2f} ms   recall@10 +{result['recall_pos']:.3f} "
            f"-{result['recall_neg']:.3f}",
            flush=True,
        )

    faiss.omp_set_num_threads(args.build_threads)
    started = time.perf_counter()
    flat = faiss.IndexFlatIP(dim)
    flat.add(data)
    flat_build = time.perf_counter() - started
    exact = {sign: flat.search(sign * queries, args.top)[1] for sign in (1, -1)}  # ground truth, all threads
    flat_queries = queries[: args.flat_queries]
    report(
        "flat",
        "exact",
        flat_build,
        evaluate(flat, flat_queries, {s: e[: args.flat_queries] for s, e in exact.items()}, args.top),
    )
    del flat

    for factor in args.nlist_factors:
        nlist = max(1, round(factor * math.sqrt(n)))
        faiss.omp_set_num_threads(args.build_threads)
        started = time.perf_counter()
        ivf = build_ivf(data, "float32", nlist)  # what `--index-type ivf` builds: k-means on 64 rows per list
        add_rows(ivf, data)
        build = time.perf_counter() - started
        for nprobe in args.nprobe:
            if nprobe > nlist:
                continue
            ivf.nprobe = nprobe
            report("ivf", f"nlist {nlist} nprobe {nprobe}", build, evaluate(ivf, queries, exact, args.top))
        if nlist == nlist_rule(
            n
        ):  # the explorer's own choice: calibrate nprobe on the index's rows, then measure
            started = time.perf_counter()
            chosen = calibrate_nprobe(ivf, data)
            print(f"  calibration ({time.perf_counter() - started:.1f} s): {chosen}", flush=True)
            report(
                "ivf",
                f"rule: nlist {nlist} nprobe {chosen[1][0]} / {chosen[-1][0]}",
                build,
                evaluate(ivf, queries, exact, args.top, (chosen[1][0], chosen[-1][0])),
            )
        del ivf

    if args.hnsw_m and n <= args.hnsw_max_n:
        faiss.omp_set_num_threads(args.build_threads)
        started = time.perf_counter()
        hnsw = faiss.IndexHNSWFlat(dim, args.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = args.ef_construction
        hnsw.add(data)
        build = time.perf_counter() - started
        for ef in args.ef_search:
            hnsw.hnsw.efSearch = ef
            report("hnsw", f"M {args.hnsw_m} efSearch {ef}", build, evaluate(hnsw, queries, exact, args.top))
        del hnsw
    del data


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument(
        "--data",
        nargs="+",
        choices=("mixture", "gaussian", "shipped"),
        default=["mixture", "gaussian", "shipped"],
    )
    parser.add_argument(
        "--dim", type=int, default=512, help="k of mixture and gaussian (shipped: the shipped index's k, 512)"
    )
    parser.add_argument("--components", type=int, default=4096, help="mixture components")
    parser.add_argument("--bucket", type=int, default=0, help="shipped-index bucket to tile (0: the hardest)")
    parser.add_argument("--noise", type=float, default=1.0, help="norm of the noise added to shipped rows")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--flat-queries", type=int, default=50, help="queries timed on the (slow) flat index")
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument(
        "--nlist-factors", type=float, nargs="+", default=[1.0, 4.0], help="nlist = f sqrt(N)"
    )
    parser.add_argument("--nprobe", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256, 512, 1024])
    parser.add_argument("--hnsw-m", type=int, default=32, help="0: no HNSW")
    parser.add_argument(
        "--hnsw-max-n", type=int, default=100_000, help="HNSW only up to this N (its 1M build takes ~10 min)"
    )
    parser.add_argument("--ef-construction", type=int, default=80)
    parser.add_argument("--ef-search", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--build-threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()

    rows: list[dict] = []
    for name in args.data:
        if name == "mixture":
            sample, label = (
                mixture_model(args.dim, args.components, args.seed),
                f"mixture (C={args.components})",
            )
        elif name == "gaussian":
            sample, label = gaussian_model(args.dim, args.seed), "gaussian (continuous)"
        else:
            sample, _ = shipped_model(args.bucket, args.noise)
            label = f"shipped b{args.bucket} + noise {args.noise:g}"
        for n in args.sizes:
            run_size(label, sample, n, args, rows)

    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(
        f"\nsingle-query latency with faiss threads 1 (builds with {args.build_threads}); "
        f"{args.queries} queries "
        f"(flat: {args.flat_queries}), each searched as q and -q; peak RSS {peak_gib:.1f} GiB\n"
    )
    print(
        "| data | N | k | index | parameters | build s | median ms, q / -q | p95 ms (both) | recall@10 "
        "(q) | recall@10 (-q) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['data']} | {row['n']:,} | {row['dim']} | {row['index']} | {row['params']} | "
            f"{row['build_s']:.1f} | "
            f"{row['median_ms_pos']:.2f} / {row['median_ms_neg']:.2f} | {row['p95_ms']:.2f} | "
            f"{row['recall_pos']:.3f} | "
            f"{row['recall_neg']:.3f} |"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"args": vars(args), "peak_rss_gib": peak_gib, "rows": rows}, indent=2)
        )


if __name__ == "__main__":
    main()
