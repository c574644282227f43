"""Scale-out of precompute featurize: 1 process against torchrun ranks, and a simulated large build.

    python -m bench.shard_scale ranks --limit 256 --json bench/results/shard_scale.json
    python -m bench.shard_scale synthetic --rows 1000000 --json bench/results/shard_scale.json

`ranks`: the shipped model and data featurized with the shipped spec by one process with all cores' threads
and by `torchrun --nproc-per-node R` ranks with cores/R threads each (the same total cores), whole-process
wall time and each rank's peak RSS (from the featurize report line).
`synthetic`: a build of --rows training rows through the shard path without gradients: 2 ranks each write
seeded synthetic chunk files (a common direction plus noise, as raw features look at high noise), then sum
the kernels and rank 0 writes an int8 flat index; per rank the seconds of each phase and the peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.results_file import write_case

ROOT = Path(__file__).resolve().parents[1]

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
REPORT_LINE = re.compile(r"(?:rank (\d+) of \d+: )?featurized .*?peak RSS ([0-9.]+) GB")


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def run_ranks(args) -> dict:
    cores = os.cpu_count() or 1
    featurize = ["precompute", "featurize", "--model", "assets/model", "--data", "mnist5k"]
    featurize += ["--split", "train", "--limit", str(args.limit), "--storage", "int8"]
    result = {"limit": args.limit, "cores": cores, "runs": {}}
    for ranks in args.ranks:
        with tempfile.TemporaryDirectory() as tmp:
            out = ["--out", str(Path(tmp) / "index")]
            threads = max(1, cores // ranks)
            command = [sys.executable, "-m", *featurize, *out]
            if ranks > 1:
                command = [*TORCHRUN, "--nproc-per-node", str(ranks), "-m", *featurize, *out]
            env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
            started = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
            seconds = time.perf_counter() - started
            if done.returncode != 0:
                raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
            rss = {int(m.group(1) or 0): float(m.group(2)) for m in REPORT_LINE.finditer(done.stdout)}
            result["runs"][str(ranks)] = {
                "ranks": ranks,
                "threads_per_rank": threads,
                "seconds": round(seconds, 1),
                "peak_rss_gb_per_rank": [rss[r] for r in sorted(rss)],
                "command": ("torchrun --standalone --nproc-per-node " + str(ranks) if ranks > 1 else "python")
                + " -m "
                + " ".join(featurize),
            }
            print(f"{ranks} rank(s) x {threads} thread(s): {seconds:.1f} s, peak RSS {rss} GB", flush=True)
    one = result["runs"].get("1")
    for entry in result["runs"].values():
        entry["speedup_over_1"] = round(one["seconds"] / entry["seconds"], 2) if one else None
    return result


def run_synthetic(args) -> dict:
    """The launcher: starts 2 ranks of this script's `synthetic-rank` mode and collects their reports."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "ranks.jsonl"
        command = [*TORCHRUN, "--nproc-per-node", "2", __file__, "synthetic-rank", "--rows", str(args.rows)]
        command += [
            "--dim",
            str(args.dim),
            "--buckets",
            str(args.buckets),
            "--work",
            tmp,
            "--report",
            str(report),
            "--index-type",
            args.index_type,
            *(["--ivf-on-disk"] if args.ivf_on_disk else []),
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"synthetic build failed:\n{done.stderr[-3000:]}")
        ranks = sorted(
            (json.loads(line) for line in report.read_text().splitlines()), key=lambda r: r["rank"]
        )
    result = {"rows": args.rows, "dim": args.dim, "buckets": args.buckets, "seconds": round(seconds, 1)}
    result.update(ranks=ranks, index_type=args.index_type, ivf_on_disk=args.ivf_on_disk)
    options = f" --index-type {args.index_type}" + (" --ivf-on-disk" if args.ivf_on_disk else "")
    result["command"] = f"python -m bench.shard_scale synthetic --rows {args.rows} --dim {args.dim}{options}"
    print(json.dumps(result, indent=2))
    return result


def synthetic_rank(args) -> None:
    """One rank: write this rank's synthetic chunks, then the shard path's kernel sums and index build."""
    import numpy as np

    from explorer.data import Dataset
    from explorer.features import FeatureSpec
    from explorer.index import AttributionIndex, FeatureSource
    from explorer.index_meta import DatasetInfo
    from precompute.featurize.chunks import ChunkFiles
    from precompute.featurize.collective import Collective
    from precompute.featurize.pipeline import PARTIAL_DIR, FeaturizeOptions, build_index

    collective = Collective.from_env()
    out = Path(args.work) / "index"
    chunks = ChunkFiles(out / PARTIAL_DIR / "chunks", args.rows, 10_000, args.buckets, args.dim, das=False)
    if collective.is_main:
        chunks.directory.mkdir(parents=True, exist_ok=True)
    collective.barrier()
    phases, started = {}, time.perf_counter()
    common = np.random.default_rng(0).standard_normal(args.dim)
    for chunk in collective.mine(range(chunks.n_chunks)):
        rows = chunks.rows(chunk)
        rng = np.random.default_rng(1000 + chunk)
        noise = rng.standard_normal((args.buckets, rows.stop - rows.start, args.dim))
        chunks.write(chunk, (10 * common + noise).astype(np.float32), None)
    collective.barrier()
    phases["write_chunks_s"] = round(time.perf_counter() - started, 1)
    spec = FeatureSpec(output="mean", buckets=args.buckets, proj_dim=args.dim)
    zeros = np.zeros((args.rows, 4, 4), dtype=np.uint8)  # images are stored with the index; tiny here
    dataset = Dataset("synthetic", zeros, np.zeros(args.rows, np.int64), np.arange(args.rows), ["0"])
    source = FeatureSource(
        model_hash="synthetic",
        model_path="synthetic",
        dataset=DatasetInfo("synthetic", args.rows, "synthetic", ("0",), 4),
        spec=spec,
        timesteps=tuple((100 * b,) for b in range(args.buckets)),
        num_train_timesteps=1000,
        num_params=args.dim,  # no model: any positive count
    )
    started = time.perf_counter()
    options = FeaturizeOptions(storage="int8", index_type=args.index_type, ivf_on_disk=args.ivf_on_disk)
    build_index(out, source, chunks, dataset, options, collective)
    collective.barrier()
    phases["kernel_and_index_s"] = round(time.perf_counter() - started, 1)
    entry = {"rank": collective.rank, **phases, "peak_rss_gb": round(peak_rss_gb(), 3)}
    if collective.is_main:
        index = AttributionIndex.load(out)
        entry["index_rows"] = int(index.meta.count)
        entry["index_type"] = index.index_type
        if index.meta.ivf is not None:
            entry["ivf"] = {"nlist": index.meta.ivf.nlist, "recall_at_10": index.meta.ivf.recall_at_10}
        entry["index_bytes"] = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    with open(args.report, "a") as handle:
        handle.write(json.dumps(entry) + "\n")
    collective.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    modes = parser.add_subparsers(dest="mode", required=True)
    ranks = modes.add_parser("ranks")
    ranks.add_argument("--limit", type=int, default=256)
    ranks.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    synthetic = modes.add_parser("synthetic")
    worker = modes.add_parser("synthetic-rank")
    for sub in (synthetic, worker):
        sub.add_argument("--index-type", choices=("flat", "ivf"), default="flat")
        sub.add_argument("--ivf-on-disk", action="store_true")
        sub.add_argument("--rows", type=int, default=1_000_000)
        sub.add_argument("--dim", type=int, default=64)
        sub.add_argument("--buckets", type=int, default=2)
    worker.add_argument("--work", required=True)
    worker.add_argument("--report", required=True)
    for sub in (ranks, synthetic):
        sub.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.mode == "synthetic-rank":
        synthetic_rank(args)
        return
    result = run_ranks(args) if args.mode == "ranks" else run_synthetic(args)
    if args.json:
        case = args.mode
        if args.mode == "synthetic" and args.index_type == "ivf":
            case += "_ivf_on_disk" if args.ivf_on_disk else "_ivf"
        write_case(args.json, case, result)


if __name__ == "__main__":
    main()
