"""What precompute.featurize.allocator's malloc settings change: `precompute featurize` with and without them,
alternating.

    flock /tmp/cpu.lock python -m bench.allocator_ab                           # default count-sketch, 256
    images
    flock /tmp/cpu.lock python -m bench.allocator_ab --projector kronecker --rounds 6

Each round runs the same featurize command twice in fresh processes, once with EXPLORER_MALLOC_TUNING=0
(glibc's defaults) and once without (the settings applied), in alternating order, and reads from each
process its featurization seconds (featurize's own report), peak RSS, minor page faults and system CPU
time. Prints every round and the medians; the speed-up is the median of the within-round ratios.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.results_file import write_case

ROOT = Path(__file__).resolve().parents[1]

# Runs the precompute CLI in this process, then reports its resource use on the last line.
CHILD = """
import resource, sys
from precompute.__main__ import main
code = main(sys.argv[1:])
usage = resource.getrusage(resource.RUSAGE_SELF)
print(f"RUSAGE {usage.ru_maxrss} {usage.ru_minflt} {usage.ru_stime}")
sys.exit(code)
"""


def featurize_once(args, tuned: bool, out: Path) -> dict:
    command = [
        sys.executable,
        "-c",
        CHILD,
        "featurize",
        "--model",
        args.model,
        "--data",
        "mnist5k",
        "--out",
        str(out),
        "--projector",
        args.projector,
        "--limit",
        str(args.images),
    ]
    if args.calibrate:
        command += ["--calibrate", str(args.calibrate)]
    command += shlex.split(args.featurize_args)
    env = {**os.environ, "EXPLORER_MALLOC_TUNING": "1" if tuned else "0"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"featurize failed:\n{result.stderr[-2000:]}")
    seconds = float(re.search(r"gradients in ([0-9.]+) s", result.stdout).group(1))
    rss_kb, faults, system = re.search(r"RUSAGE (\d+) (\d+) ([0-9.]+)", result.stdout).groups()
    return {
        "seconds": seconds,
        "peak_rss_gb": int(rss_kb) / 1e6,
        "page_faults": int(faults),
        "system_s": float(system),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=str(ROOT / "assets/model"))
    parser.add_argument("--projector", default="countsketch")
    parser.add_argument("--calibrate", type=int, default=0, help="featurize --calibrate N (0: off)")
    parser.add_argument(
        "--images", type=int, default=256, help="featurize --limit: training images x all buckets"
    )
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument(
        "--featurize-args",
        default="",
        help='more featurize options, e.g. "--output square --buckets 1 '
        '--timesteps-per-bucket 10 --proj-dim 2048" (the traker bench\'s spec) or "--workers 1"',
    )
    parser.add_argument("--json", default=None, help="also write the results here, under cases[--case]")
    parser.add_argument(
        "--case", default=None, help="the configuration's name in --json (default: --projector)"
    )
    args = parser.parse_args()

    runs = {"defaults": [], "tuned": []}
    with tempfile.TemporaryDirectory() as scratch:
        for round_ in range(args.rounds):
            order = (False, True) if round_ % 2 == 0 else (True, False)
            for tuned in order:
                name = "tuned" if tuned else "defaults"
                runs[name].append(featurize_once(args, tuned, Path(scratch) / f"{name}{round_}"))
                run = runs[name][-1]
                print(
                    f"round {round_ + 1}, {name}: {run['seconds']:.1f} s, peak RSS "
                    f"{run['peak_rss_gb']:.2f} GB, "
                    f"{run['page_faults']} page faults, {run['system_s']:.1f} s system",
                    flush=True,
                )

    speedup = statistics.median(d["seconds"] / t["seconds"] for d, t in zip(runs["defaults"], runs["tuned"]))
    print(
        f"\nprecompute featurize --projector {args.projector} --limit {args.images}"
        f"{f' --calibrate {args.calibrate}' if args.calibrate else ''} {args.featurize_args}, "
        f"{args.rounds} alternating "
        "rounds (medians)\n"
    )
    print("| malloc | featurize s | peak RSS GB | page faults | system s |")
    print("|---|---|---|---|---|")
    for name, label in (
        ("defaults", "glibc defaults (EXPLORER_MALLOC_TUNING=0)"),
        ("tuned", "precompute.featurize.allocator"),
    ):
        print(
            f"| {label} | {statistics.median(r['seconds'] for r in runs[name]):.1f} | "
            f"{statistics.median(r['peak_rss_gb'] for r in runs[name]):.2f} | "
            f"{statistics.median(r['page_faults'] for r in runs[name]):.0f} | "
            f"{statistics.median(r['system_s'] for r in runs[name]):.1f} |"
        )
    print(f"\ntuned / defaults: {speedup:.2f}x faster (median of the within-round ratios)")
    if args.json:
        args.case = args.case or args.projector
        write_case(args.json, args.case, {"args": vars(args), "runs": runs, "speedup": speedup})


if __name__ == "__main__":
    main()
