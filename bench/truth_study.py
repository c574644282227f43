"""Truth study: the share of signal (ICC) and the LDS ceiling of every ground-truth recipe, and its cost.

    python -m precompute evaluate truth --subsets 4 --stops 600 1250   # the models (resumable, 2 processes)
    python -m bench.truth_study --json bench/results/truth_study.json   # this summary
    python -m bench.report                                             # docs/benchmarks/truth_study.md

A recipe is a training length (a stop) and a number m of shared seeds that the truth averages. For every
stop, the subsets measured with every seed give a (subsets, seeds, queries) truth per kind of query and per
number of evaluation draws (the files' nested `*_levels`); precompute.evaluation.ceiling splits it into subset
signal and seed noise (ICC) and turns the ICC into the LDS a perfect method could reach against an m-seed
mean.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from precompute.evaluation.ceiling import ceiling, complete_subsets, leave_one_seed_out, signal_share
from precompute.evaluation.shipped.ground_truth import draw_levels
from precompute.evaluation.shipped.truth import Queries

KINDS = {  # name in the summary -> (level array in the files, what it is)
    "heldout": ("whole_levels", "whole image, held-out digits: loss over (t, eps) pairs in every bucket"),
    "generated": ("whole_levels", "whole image, generated finals: the same loss"),
    "step_proxy": ("proxy_levels", "per step, Journey-TRAK: x0hat re-noised inside the step's bucket"),
    "step_trajectory": ("trajectory_levels", "per step, tied to the trajectory: x_t against its completions"),
}
SEED_COUNTS = (1, 3, 5)
TARGET_CEILING = 0.5  # the ceiling the truth as used must reach (issue 31) on its primary columns
PRIMARY = ("heldout", "step_proxy")
SUBSETS = 64  # the benchmark's subsets: what a recipe costs to build in full
DECIDING_SUBSETS = 4  # a stop with fewer subsets measured with every seed is reported, not chosen from


def load_stop(folder: Path) -> dict:
    """Every file of one stop: {(subset, seed): arrays}."""
    runs = {}
    for path in sorted(folder.glob("subset_*_seed*.npz")):
        with np.load(path) as data:
            runs[int(data["subset"]), int(data["seed"])] = {key: data[key] for key in data.files}
    return runs


def kind_truth(runs: dict, subsets: list[int], seeds: list[int], kind: str, heldout: int) -> np.ndarray:
    """(S, m, Q, L): the truth of one kind at every draw level."""
    key = KINDS[kind][0]
    rows = np.stack([np.stack([runs[j, seed][key] for seed in seeds]) for j in subsets]).astype(np.float64)
    if kind == "heldout":
        rows = rows[:, :, :heldout]
    elif kind == "generated":
        rows = rows[:, :, heldout:]
    return rows.reshape(len(subsets), len(seeds), -1, rows.shape[-1])  # per-step (G, J) -> G J queries


def jackknife_se(truth: np.ndarray) -> float | None:
    """Jackknife standard error over subsets of the pooled ICC of a (S, m, Q) truth: the queries share the
    subsets, so the subsets, not the queries, bound how well the ICC is known (None below 4 subsets)."""
    subsets = truth.shape[0]
    if subsets < 4:
        return None
    leave_out = np.array([signal_share(np.delete(truth, j, axis=0)).pooled for j in range(subsets)])
    return float(np.sqrt((subsets - 1) / subsets * ((leave_out - leave_out.mean()) ** 2).sum()))


def summarize_stop(runs: dict, heldout: int, config: dict) -> dict:
    keys = np.array(list(runs))  # (models, 2): subset, seed
    subsets, seeds = complete_subsets(keys[:, 0], keys[:, 1])
    draws = {
        "heldout": draw_levels(config["pairs_per_bucket"]),
        "generated": draw_levels(config["pairs_per_bucket"]),
        "step_proxy": draw_levels(config["proxy_pairs"]),
        "step_trajectory": draw_levels(config["completions"]),
    }
    train = [float(run["train_cpu_seconds"]) for run in runs.values()]
    measure = [float(run["measure_cpu_seconds"]) for run in runs.values()]
    out = {
        "subsets": subsets,
        "seeds": seeds,
        "models": len(runs),
        "train_cpu_seconds": float(np.median(train)),
        "measure_cpu_seconds": float(np.median(measure)),
        "kinds": {},
    }
    if len(subsets) < 2 or len(seeds) < 2:
        return out
    for kind in KINDS:
        truth = kind_truth(runs, subsets, seeds, kind, heldout)
        levels = []
        for level, count in enumerate(draws[kind]):
            share = signal_share(truth[..., level])
            levels.append(
                {
                    "draws": count,
                    "icc_pooled": share.pooled,
                    "icc_median": share.median,
                    "ceiling": {str(m): float(ceiling(share.pooled, m)) for m in SEED_COUNTS},
                }
            )
        entry = {"levels": levels, "icc_jackknife_se": jackknife_se(truth[..., -1])}
        if len(subsets) >= 3:  # a Spearman over fewer subsets says nothing
            entry["leave_one_seed_out"] = float(np.nanmean(leave_one_seed_out(truth[..., -1])))
        out["kinds"][kind] = entry
    return out


def recipes(stops: dict) -> list[dict]:
    """Every (stop, seeds averaged) recipe with its ceilings on the primary columns and its CPU hours for the
    whole benchmark; `meets` says whether every primary ceiling reaches TARGET_CEILING."""
    out = []
    for stop, entry in stops.items():
        if not entry["kinds"] or len(entry["subsets"]) < DECIDING_SUBSETS:
            continue
        per_model = entry["train_cpu_seconds"] + entry["measure_cpu_seconds"]
        for m in SEED_COUNTS:
            ceilings = {k: entry["kinds"][k]["levels"][-1]["ceiling"][str(m)] for k in PRIMARY}
            out.append(
                {
                    "steps": int(stop),
                    "seeds": m,
                    "ceilings": ceilings,
                    "cpu_hours": SUBSETS * m * per_model / 3600,
                    "meets": all(v >= TARGET_CEILING for v in ceilings.values()),
                }
            )
    return out


def choose(candidates: list[dict]) -> dict | None:
    """The cheapest recipe that meets the target with >= 3 seeds; else the one with the highest lowest
    primary ceiling."""
    meeting = [r for r in candidates if r["meets"] and r["seeds"] >= 3]
    if meeting:
        return min(meeting, key=lambda r: r["cpu_hours"])
    return max(candidates, key=lambda r: min(r["ceilings"].values()), default=None)


def study(results: Path) -> dict:
    config = json.loads((results / "config.json").read_text())["truth"]
    heldout = len(Queries.load(results / "queries.npz").heldout_ids)
    stops = {}
    for folder in sorted(results.glob("steps_*")):
        runs = load_stop(folder)
        if runs:
            stops[str(int(folder.name.split("_")[1]))] = summarize_stop(runs, heldout, config)
    candidates = recipes(stops)
    return {
        "config": config,
        "heldout_queries": heldout,
        "stops": stops,
        "recipes": candidates,
        "chosen": choose(candidates),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="bench/results/truth_mnist5k", help="the ground-truth folder")
    parser.add_argument("--json", default="bench/results/truth_study.json")
    args = parser.parse_args(argv)
    summary = study(Path(args.results))
    summary["command"] = "python -m bench.truth_study --json " + args.json
    Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    for stop, entry in summary["stops"].items():
        for kind, values in entry.get("kinds", {}).items():
            top = values["levels"][-1]
            print(
                f"steps {stop:>5} {kind:16} ICC {top['icc_pooled']:.3f} (median {top['icc_median']:.3f}) "
                f"ceiling m=1/3/5 {'/'.join(f'{v:.2f}' for v in top['ceiling'].values())}"
            )
    print(f"chosen recipe: {summary['chosen']}")
    print(f"written {args.json}")


if __name__ == "__main__":
    main()
