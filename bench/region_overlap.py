"""Region attribution on the shipped model: do two disjoint regions of one generated digit get different
influencers? For each generated digit and step, the top-k positive lists of the whole image (W) and of two
disjoint halves (A, B: top/bottom and left/right) are compared by their overlap |X & Y| / k.

    python -m bench.region_overlap                       # 16 digits x 5 steps, top-10, shipped assets

Prints and writes the mean overlaps per split and step (--json, default bench/results/region_overlap.json).
The claim it checks: overlap(A, B) < min(overlap(W, A), overlap(W, B)); a_across is the overlap of region A's
lists on consecutive digits (a region list that ignores the digit gives 1).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from explorer.attribution import Explorer

ROOT = Path(__file__).resolve().parents[1]


def overlap(a, b) -> float:
    return len(set(a.tolist()) & set(b.tolist())) / len(a)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="assets/model")
    parser.add_argument("--index", default="assets/index")
    parser.add_argument(
        "--seeds", type=int, default=16, help="generated digits (sampler seeds 3000, 3001, ...)"
    )
    parser.add_argument(
        "--steps", type=int, nargs="+", default=[0, 10, 25, 40, 49], help="sampler steps of 50"
    )
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--json", default="bench/results/region_overlap.json")
    args = parser.parse_args()

    explorer = Explorer.from_dirs(args.model, [args.index])
    size = explorer.model.sample_size
    half = size // 2
    splits = {
        "top/bottom": ((0, 0, size, half), (0, half, size, size)),
        "left/right": ((0, 0, half, size), (half, 0, size, size)),
    }
    rows = {
        name: {str(s): {"a_b": [], "whole_a": [], "whole_b": [], "a_across": []} for s in args.steps}
        for name in splits
    }
    previous = {}  # split -> the last digit's region-A lists, per step
    for seed in range(3000, 3000 + args.seeds):
        whole = explorer.generate(seed, 50, None, args.top_k)
        for name, (box_a, box_b) in splits.items():
            part_a = explorer.reattribute(whole, whole.index_name, args.top_k, box_a)
            part_b = explorer.reattribute(whole, whole.index_name, args.top_k, box_b)
            for step in args.steps:
                w, a, b = (x.steps[step].positive.positions for x in (whole, part_a, part_b))
                cell = rows[name][str(step)]
                cell["a_b"].append(overlap(a, b))
                cell["whole_a"].append(overlap(w, a))
                cell["whole_b"].append(overlap(w, b))
                if name in previous:  # one region on two different digits: a constant list would give 1
                    cell["a_across"].append(overlap(previous[name][step], a))
            previous[name] = {step: part_a.steps[step].positive.positions for step in args.steps}
        print(f"seed {seed} done", flush=True)
    summary = {
        name: {step: {key: float(np.mean(v)) for key, v in cell.items()} for step, cell in per.items()}
        for name, per in rows.items()
    }
    for name, per in summary.items():
        for step, cell in per.items():
            holds = cell["a_b"] < min(cell["whole_a"], cell["whole_b"])
            cells = f"A & B {cell['a_b']:.3f}, W & A {cell['whole_a']:.3f}, W & B {cell['whole_b']:.3f}"
            print(f"{name:10s} step {step:>2}: {cells} -> {'holds' if holds else 'does not hold'}")
    result = {
        "command": "python " + " ".join(sys.argv),
        "digits": args.seeds,
        "top_k": args.top_k,
        "index": explorer.indexes[next(iter(explorer.indexes))].label,
        "splits": summary,
    }
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
