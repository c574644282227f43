"""The default-path page: speed, served top-10 and LDS of each featurize path on the shipped model."""

from __future__ import annotations

from bench.reporting.core import commands, load, page, para, source_links, table

FAST_PATH = "fast_path.json"
LDS_FAST = "lds_fast_path.json"
_FEATURIZE = "python -m precompute featurize --model assets/model --data mnist5k --storage int8"
BUILD = (  # the index directories the results compare (assets/index is the shipped one)
    f"{_FEATURIZE} --out runs/mean512-seed1 --proj-seed 1",
    f"{_FEATURIZE} --out runs/kron512-fp32 --projector kronecker --calibrate 16",
    f"{_FEATURIZE} --out runs/kron512 --projector kronecker --calibrate 16 --precision mixed",
    "python -m precompute evaluate shipped-lds --index assets/index runs/mean512-seed1 runs/kron512-fp32 "
    "runs/kron512 --json bench/results/lds_fast_path.json",
)  # the shipped-lds run whose test-split LDS fast_path.json quotes


def _interval(entry: dict) -> str:
    low, high = entry["ci95"]
    return f"{entry['mean']:.3f} [{low:.3f}, {high:.3f}]"


def matches(entry: dict, reference: dict, floor: dict) -> bool:
    """LDS interval overlaps the reference's in both columns and the top-10 overlap is no lower than the
    noise floor's (another projection seed of the default path) at any bucket."""
    lds_ok = all(
        entry["lds"][c]["ci95"][0] <= reference["lds"][c]["ci95"][1]
        and reference["lds"][c]["ci95"][0] <= entry["lds"][c]["ci95"][1]
        for c in ("heldout", "step_trajectory")
    )
    return lds_ok and all(entry["overlap"][t] >= floor["overlap"][t] - 0.02 for t in floor["overlap"])


@page(
    "docs/benchmarks/fast_path.md",
    "Which featurize path is the default",
    "speed, served top-10 and LDS of the count-sketch and kronecker paths on the shipped model",
    FAST_PATH,
    LDS_FAST,
)
def fast_path() -> str:
    r = load(FAST_PATH)
    indexes, reference, floor = r["indexes"], r["indexes"][r["reference"]], r["indexes"][r["noise_floor"]]
    speed = [
        [
            name,
            ", ".join(f"{s:.1f}" for s in v["seconds"]),
            f"{v['median_s']:.1f}",
            f"{v['ratio_to_default']:.2f}x",
        ]
        for name, v in r["speed"].items()
    ]
    rows, verdicts = [], {}
    for directory, entry in indexes.items():
        overlap = list(entry["overlap"].values()) if entry["overlap"] else []
        if directory not in (r["reference"], r["noise_floor"]):
            verdicts[directory] = matches(entry, reference, floor)
        rows.append(
            [
                f"`{directory}`",
                entry["label"],
                _interval(entry["lds"]["heldout"]),
                _interval(entry["lds"]["step_trajectory"]),
                "reference" if not overlap else f"{min(overlap):.2f}-{max(overlap):.2f}",
                "reference"
                if directory == r["reference"]
                else "noise floor"
                if directory == r["noise_floor"]
                else ("yes" if verdicts[directory] else "no"),
            ]
        )
    timesteps = list(floor["overlap"])
    per_bucket = [
        [f"`{d}`", *(f"{e['overlap'][t]:.2f}" for t in timesteps)] for d, e in indexes.items() if e["overlap"]
    ]
    held = [d for d, ok in verdicts.items() if ok]
    verdict = (
        "Matching the default within the intervals and above the noise floor: "
        + ", ".join(f"`{d}`" for d in held)
        + "."
        if held
        else "No candidate path matches the default within the LDS intervals and above the top-10 noise "
        "floor, so the default stays the count-sketch path."
    )
    return "\n\n".join(
        [
            para(f"""`bench/fast_path.py` asks whether a faster featurize path can be the default. Speed:
            whole `precompute featurize --limit {r["limit"]}` processes of each path on mnist5k, paths
            alternating within each repeat (model load and calibration included). Accuracy: the test-split LDS
            of the shipped-model benchmark (held-out digits, and per-step against the trajectory-tied truth,
            bootstrap intervals) and, per bucket, the overlap of each index's top-10 positive influencers with
            the reference's for the 250 test-split held-out digits. The noise floor is the default path with
            another projection seed: an overlap that low comes from re-drawing the projection alone. A path
            matches when both LDS intervals overlap the reference's and its top-10 overlap is within 0.02 of
            the noise floor's or above at every bucket."""),
            commands(*BUILD, r["command"]),
            table(
                ["path", f"seconds per repeat (--limit {r['limit']})", "median s", "speed vs default"], speed
            ),
            table(
                [
                    "index",
                    "method",
                    "LDS held-out (test)",
                    "LDS per step, trajectory-tied",
                    "top-10 overlap",
                    "matches",
                ],
                rows,
            ),
            "Top-10 overlap with the reference per bucket (train timestep):",
            table(["index", *timesteps], per_bucket),
            para(verdict),
            f"Results: {source_links([FAST_PATH, LDS_FAST])}.",
        ]
    )
