"""Which featurize path should be the default? Speed, served top-10 and LDS of each path on the shipped model.

    python -m bench.fast_path --reference assets/index --noise-floor runs/mean512-seed1 \
        --candidates runs/kron512 --lds bench/results/lds_fast_path.json

- speed: `precompute featurize --limit N` of each path, in alternating repeats on the same machine (whole
  process, model load and calibration included), median seconds and the within-repeat ratio to the default;
- served top-10: per bucket, the overlap of each index's top-10 positive list with the reference's (the
  default path, shipped) for the 250 test-split held-out digits (precompute.evaluation.shipped.step_quality's
  split), each index queried with its own feature spec. The noise floor is the same default path with another
  projection seed: an overlap that low is what re-drawing the projection alone gives;
- LDS: the held-out and per-step (trajectory-tied) test-split LDS with bootstrap intervals, read from a
  `precompute evaluate shipped-lds --json` file that scored the same directories.
Writes --json (default bench/results/fast_path.json; the page docs/benchmarks/fast_path.md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from explorer.index import AttributionIndex
from explorer.model import load_model
from precompute.evaluation.shipped.step_quality import heldout_split, query_features, served_scores
from precompute.evaluation.shipped.truth import shipped_split

ROOT = Path(__file__).resolve().parents[1]

PATHS = {  # featurize flags of each path
    "default (countsketch, fp32)": [],
    "kronecker, calibrated, fp32": ["--projector", "kronecker", "--calibrate", "16"],
    "kronecker, calibrated, mixed": ["--projector", "kronecker", "--calibrate", "16", "--precision", "mixed"],
}
TOP = 10


def time_paths(model: str, limit: int, repeats: int) -> dict:
    """{path: [seconds per repeat]}: whole `featurize --limit` processes, paths alternating in each repeat."""
    seconds = {name: [] for name in PATHS}
    for repeat in range(repeats):
        for name, flags in PATHS.items():
            with tempfile.TemporaryDirectory() as scratch:
                command = [
                    sys.executable,
                    "-m",
                    "precompute",
                    "featurize",
                    "--model",
                    model,
                    "--data",
                    "mnist5k",
                ]
                command += ["--out", f"{scratch}/index", "--limit", str(limit), *flags]
                started = time.perf_counter()
                subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
                seconds[name].append(time.perf_counter() - started)
            print(f"repeat {repeat}: {name} {seconds[name][-1]:.1f} s", flush=True)
    return seconds


def overlaps(model, reference: AttributionIndex, others: dict[str, AttributionIndex], cache: Path) -> dict:
    """{name: {timestep: mean top-10 overlap with the reference}} on the test-split held-out digits."""
    _, data = shipped_split("mnist5k", model.sample_size)  # the digits the shipped model never saw
    rows = np.flatnonzero(~heldout_split(len(data.images)))
    images = data.images[rows]

    def top_lists(index: AttributionIndex, name: str) -> list[np.ndarray]:
        spec = json.dumps(index.meta.spec.to_dict(), sort_keys=True)
        key = hashlib.sha256(spec.encode()).hexdigest()[:12]  # the same spec, the same cached features
        phi = query_features(model, index.meta.spec, images, cache / f"fast_path_{key}.npy")
        return [np.argsort(-served_scores(index, phi[b], b), axis=1)[:, :TOP] for b in range(index.buckets)]

    reference_lists = top_lists(reference, "reference")
    out = {}
    for name, index in others.items():
        lists = top_lists(index, name)
        out[name] = {
            str(reference.meta.timesteps[b][0]): float(
                np.mean([len(set(a) & set(c)) / TOP for a, c in zip(reference_lists[b], lists[b])])
            )
            for b in range(reference.buckets)
        }
        print(f"{name}: top-10 overlap with the reference {out[name]}", flush=True)
    return out


def lds_of(lds: dict, directory: str) -> dict:
    """The test-split held-out and per-step LDS of one index directory from a shipped-lds JSON."""
    if directory in lds["methods"]:
        test = lds["methods"][directory]["test"]
        return {column: test[column] for column in ("heldout", "generated", "step_trajectory")}
    raise SystemExit(f"{directory} is not in the LDS file: score it with `precompute evaluate shipped-lds`")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="assets/model")
    parser.add_argument("--reference", default="assets/index", help="the default path's index (shipped)")
    parser.add_argument("--noise-floor", required=True, help="the default path with another --proj-seed")
    parser.add_argument("--candidates", nargs="+", required=True, help="index directories of other paths")
    parser.add_argument("--lds", required=True, help="a shipped-lds --json that scored these directories")
    parser.add_argument("--limit", type=int, default=256, help="images featurized per timed run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache", default="bench/cache")
    parser.add_argument("--json", default="bench/results/fast_path.json")
    args = parser.parse_args()

    model = load_model(args.model)
    load = lambda d: AttributionIndex.load(d, model_hash=model.weights_hash)  # noqa: E731
    directories = [args.noise_floor, *args.candidates]
    overlap = overlaps(model, load(args.reference), {d: load(d) for d in directories}, Path(args.cache))
    lds = json.loads(Path(args.lds).read_text())
    seconds = time_paths(args.model, args.limit, args.repeats)
    default = list(PATHS)[0]
    result = {
        "command": "python -m bench.fast_path " + " ".join(sys.argv[1:]),
        "limit": args.limit,
        "speed": {
            name: {
                "seconds": [round(s, 2) for s in values],
                "median_s": round(statistics.median(values), 2),
                "ratio_to_default": round(
                    statistics.median(d / s for d, s in zip(seconds[default], values)), 2
                ),
            }
            for name, values in seconds.items()
        },
        "indexes": {
            directory: {
                "label": load(directory).label,
                "overlap": overlap.get(directory),
                "lds": lds_of(lds, directory),
            }
            for directory in [args.reference, *directories]
        },
        "reference": args.reference,
        "noise_floor": args.noise_floor,
    }
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
