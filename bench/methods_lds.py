"""Every attribution method on the shipped model's LDS benchmark: each method's hyper-parameter chosen on the
dev split (its grid extended until the choice is inside it), reported on the test split, with the seed
papers' claims as paired differences.

    python -m bench.methods_lds --json bench/results/methods_lds.json

The indexes are real index directories (`python app.py --index DIR` serves any of them), int8 like the
served one: TRAK (`loss`) and D-TRAK (`mean`) from the raw features runs/loss512 and runs/mean512 kept,
DAS from runs/das512 (`featurize --method das`), each as published (no centering, no normalization) and
as the explorer scores (centered, normalized), at relative lambdas by `precompute reindex`; DAS's
released-code shortcut (`mean` rows times the residual norm: `reindex --das-weights`, residuals in
runs/mean512); TracIn and ReTrac from runs/tracin512 (`featurize --method tracin --checkpoints` over 4
checkpoints of runs/shipped-history, a rerun of the shipped model's training recipe; ReTrac by `reindex
--as-retrac`, what `featurize --method retrac` computes); EK-FAC influence functions from
runs/ekfac2048-d* (bench/ekfac_damping.py: one index per damping). Scoring reads the index files as the
explorer does (precompute.evaluation.shipped.lds); the per-step column is Journey-TRAK's query (x0hat of the
step).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from safetensors.torch import load_file

from bench.results_file import write_case
from explorer.data import load_dataset, train_heldout_split
from explorer.model import load_model
from precompute.evaluation.metrics import spearman_columns
from precompute.evaluation.shipped.lds import (
    Benchmark,
    baseline_predictions,
    query_cache_name,
    query_features,
    score_index,
)
from precompute.featurize.method_build import unit_blocks

ROOT = Path(__file__).resolve().parents[1]

LAMBDAS = (0.003, 0.03, 0.3)  # the starting grid of every ridge family; extended while the choice is an edge
LAMBDA_LIMITS = (1e-5, 3000.0)
DAMPINGS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # bench/ekfac_damping.py's grid (one gradient pass)
RAW, EXPLORER = "as published (no centering, no normalization)", "centered + normalized (the explorer's)"


def ridge_family(
    method: str,
    paper: str,
    source: str,
    variant: str,
    existing: dict | None = None,
    extra: tuple = (),
    suffix: str = "",
) -> dict:
    flags = [*(["--no-center", "--no-normalize"] if variant == RAW else []), *extra]
    tag = ("raw" if variant == RAW else "cn") + suffix
    return {
        "method": method,
        "paper": paper,
        "variant": variant,
        "parameter": "relative lambda",
        "grid": list(LAMBDAS),
        "extend": True,
        "directory": lambda value: (existing or {}).get(value, f"{source}-{tag}-l{value:g}"),
        "build": lambda value: ["reindex", "--features-from", source, "--lambda", f"{value:g}", *flags],
    }


def fixed(method: str, paper: str, variant: str, directory: str, build: list[str]) -> dict:
    return {
        "method": method,
        "paper": paper,
        "variant": variant,
        "parameter": None,
        "grid": [None],
        "extend": False,
        "directory": lambda value: directory,
        "build": lambda value: build,
    }


FAMILIES = [
    ridge_family("TRAK", "2303.14186", "runs/loss512", RAW),
    ridge_family("TRAK", "2303.14186", "runs/loss512", EXPLORER, {0.03: "runs/loss512"}),
    ridge_family("D-TRAK", "2311.00500", "runs/mean512", RAW),
    ridge_family("D-TRAK", "2311.00500", "runs/mean512", EXPLORER, {0.03: "assets/index"}),
    ridge_family("DAS", "2410.18639", "runs/das512", RAW),
    ridge_family("DAS", "2410.18639", "runs/das512", EXPLORER),
    # the released code's scalar shortcut: D-TRAK `mean` rows times the residual norm (--das-weights)
    ridge_family(
        "DAS (code's residual shortcut)",
        "2410.18639",
        "runs/mean512",
        RAW,
        None,
        ("--das-weights",),
        "-residual",
    ),
    # the GGN's stand-in from the rows' own loss gradients (TRAK's empirical Fisher) instead of the output's
    ridge_family(
        "DAS (Fisher kernel)", "2410.18639", "runs/das512", RAW, None, ("--das-kernel", "loss"), "-fisher"
    ),
    fixed(
        "Diffusion-TracIn",
        "2401.09031",
        RAW,
        "runs/tracin512-int8",
        ["reindex", "--features-from", "runs/tracin512", "--no-center", "--no-normalize"],
    ),
    fixed(
        "Diffusion-ReTrac",
        "2401.09031",
        "per-checkpoint unit gradients, no centering",
        "runs/retrac512-int8",
        ["reindex", "--features-from", "runs/tracin512", "--as-retrac", "--no-center"],
    ),
    {
        "method": "EK-FAC influence",
        "paper": "2410.13850",
        "variant": RAW,
        "parameter": "relative damping",
        "grid": list(DAMPINGS),
        "extend": False,  # the damping acts before the sketch: a new value is a new gradient pass
        "directory": lambda value: f"runs/ekfac2048-d{value:g}",
        "build": None,
    },
]


def build(family: dict, value) -> str:
    directory = family["directory"](value)
    if not (ROOT / directory / "meta.json").is_file():
        if family["build"] is None:
            raise SystemExit(f"{directory} is missing: run bench/ekfac_damping.py first")
        command = [sys.executable, "-m", "precompute", *family["build"](value), "--out", directory]
        subprocess.run([*command, "--storage", "int8"], check=True, cwd=ROOT)
    return directory


def cache_ekfac_queries(bench: Benchmark, model, cache: Path) -> None:
    """Every EK-FAC damping's query features from one rotation of each query gradient
    (bench.ekfac_damping.DampingGrid), into the cache files precompute.evaluation.shipped.lds reads. Waits for
    bench/ekfac_damping.py's indexes if that is still running."""
    from bench.ekfac_damping import DampingGrid
    from explorer.features import FeatureComputer
    from explorer.index import AttributionIndex
    from explorer.index_methods import query_computer

    directories = [ROOT / f"runs/ekfac2048-d{d:g}" for d in DAMPINGS]
    while not all((d / "meta.json").is_file() for d in directories):
        time.sleep(30)
    ekfac = [AttributionIndex.load(d) for d in directories]
    missing = [index for index in ekfac if not (cache / query_cache_name(index)).is_file()]
    if missing:
        first = missing[0]
        spec = first.meta.spec
        projector = query_computer(first.meta.method, spec, first.directory, model).projector
        grid = DampingGrid(projector, [index.meta.method.relative_damping for index in missing])
        wide = dataclasses.replace(spec, proj_dim=spec.proj_dim * len(missing))
        computer = FeatureComputer(model, wide, projector=grid)
        T = model.num_train_timesteps
        raw = query_features(computer, spec.buckets, bench.whole_images, bench.queries, T, None)
        cache.mkdir(parents=True, exist_ok=True)
        k = spec.proj_dim
        for d, index in enumerate(missing):
            np.savez(
                cache / query_cache_name(index),
                whole=raw["whole"][..., d * k : (d + 1) * k],
                steps=raw["steps"][:, d * k : (d + 1) * k],
            )


def cache_retrac_queries(cache: Path) -> None:
    """ReTrac's query features from TracIn's: the same checkpoints' sketches, each block scaled to unit
    norm (precompute.featurize.method_build.unit_blocks)."""
    from explorer.index import AttributionIndex

    for family in FAMILIES:
        if family["method"] in ("Diffusion-TracIn", "Diffusion-ReTrac"):
            build(family, None)
    tracin, retrac = (AttributionIndex.load(ROOT / f"runs/{name}512-int8") for name in ("tracin", "retrac"))
    source, target = cache / query_cache_name(tracin), cache / query_cache_name(retrac)
    hashes = [
        {name: index.meta.file_hashes[name] for name in index.meta.method.files()}
        for index in (tracin, retrac)
    ]
    same = hashes[0] == hashes[1]
    if source.is_file() and not target.is_file() and same:
        parts = len(tracin.meta.method.checkpoints)
        with np.load(source) as data:
            unit = {name: unit_blocks(data[name], parts) for name in ("whole", "steps")}
        np.savez(target, **unit)  # precompute.featurize.method_build.unit_blocks


def history_record() -> dict:
    """What the TracIn / ReTrac checkpoints are: a rerun of the shipped recipe, and how far its final EMA
    weights are from the shipped ones (max over tensors of |a - b| / |b|)."""
    from explorer.index import AttributionIndex

    shipped = load_file(str(ROOT / "assets/model/unet/diffusion_pytorch_model.safetensors"))
    rerun = load_file(str(ROOT / "runs/shipped-history/unet/diffusion_pytorch_model.safetensors"))
    relative = max(float((rerun[k] - v).norm() / v.norm().clamp_min(1e-12)) for k, v in shipped.items())
    tracin = AttributionIndex.load(ROOT / "runs/tracin512-int8").meta
    ekfac = AttributionIndex.load(ROOT / f"runs/ekfac2048-d{DAMPINGS[0]:g}").meta
    return {
        "checkpoint_steps": [c.step for c in tracin.method.checkpoints],
        "checkpoint_dim": tracin.spec.proj_dim // len(tracin.method.checkpoints),
        "final_ema_max_relative_difference": relative,
        "ekfac_fit_images": ekfac.method.fit_images,
        "ekfac_dim": ekfac.spec.proj_dim,
    }


def dev_heldout(bench: Benchmark, predicted) -> float:
    truth, guess, _ = bench.columns(predicted, "dev")["heldout"]
    return float(np.nanmean(spearman_columns(truth, guess)))


def choose(family: dict, bench: Benchmark, model, cache: Path) -> tuple:
    """The family's grid cells (dev held-out LDS), extended past an edge choice; the chosen predictions."""
    grid, scored = sorted(family["grid"], key=lambda v: -1 if v is None else v), {}
    while True:
        for value in grid:
            if value not in scored:
                directory = build(family, value)
                index, predicted = score_index(ROOT / directory, model, bench, cache)
                scored[value] = (directory, index.label, predicted, dev_heldout(bench, predicted))
                print(
                    f"{family['method']} {family['variant'][:20]} {value}: dev {scored[value][3]:.4f}",
                    flush=True,
                )
        best = max(grid, key=lambda v: scored[v][3])
        low, high = LAMBDA_LIMITS
        if family["extend"] and best == grid[0] and best / 10 >= low:
            grid = [float(f"{best / 10:g}"), *grid]
        elif family["extend"] and best == grid[-1] and best * 10 <= high:
            grid = [*grid, float(f"{best * 10:g}")]
        else:
            break
    cells = [{"value": v, "index": scored[v][0], "dev_heldout": scored[v][3]} for v in grid]
    directory, label, predicted, _ = scored[best]
    return cells, predicted, directory, best, label


CLAIMS = [  # (paper, claim, first (method, variant), second): rows of FAMILIES or a baseline
    ("2311.00500", "D-TRAK's output function beats TRAK's loss", ("D-TRAK", RAW), ("TRAK", RAW)),
    ("2311.00500", "(the same, centered + normalized)", ("D-TRAK", EXPLORER), ("TRAK", EXPLORER)),
    ("2410.18639", "DAS beats D-TRAK", ("DAS", RAW), ("D-TRAK", RAW)),
    ("2410.18639", "(the same, centered + normalized)", ("DAS", EXPLORER), ("D-TRAK", EXPLORER)),
    ("2410.18639", "(with the loss gradients' kernel)", ("DAS (Fisher kernel)", RAW), ("D-TRAK", RAW)),
    (
        "2410.18639",
        "(the code's residual shortcut)",
        ("DAS (code's residual shortcut)", RAW),
        ("D-TRAK", RAW),
    ),
    (
        "2401.09031",
        "ReTrac's renormalization beats TracIn",
        ("Diffusion-ReTrac", None),
        ("Diffusion-TracIn", RAW),
    ),
    ("2410.13850", "EK-FAC influence beats TRAK without tuning", ("EK-FAC influence", RAW), ("TRAK", RAW)),
    ("2410.13850", "EK-FAC influence beats D-TRAK", ("EK-FAC influence", RAW), ("D-TRAK", RAW)),
    ("2312.06205", "per-step TRAK beats pixel similarity", ("TRAK", RAW), ("pixel", None)),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default=None)
    parser.add_argument("--truth", default="bench/results/lds_mnist5k")
    parser.add_argument("--cache", default="bench/cache/lds-mnist5k")
    parser.add_argument("--warm", type=int, default=None, help="only build and score the first N families")
    args = parser.parse_args()
    model = load_model(ROOT / "assets" / "model")
    train, heldout = train_heldout_split(load_dataset("mnist5k"))
    bench = Benchmark.load(ROOT / args.truth, train.images, heldout.images)
    rows, predictions = [], {}
    if args.warm is not None:
        for family in FAMILIES[: args.warm]:
            choose(family, bench, model, ROOT / args.cache)
        return
    for family in FAMILIES:
        if family["method"] == "Diffusion-ReTrac":
            cache_retrac_queries(ROOT / args.cache)
        if family["method"] == "EK-FAC influence":
            cache_ekfac_queries(bench, model, ROOT / args.cache)
        cells, predicted, directory, value, label = choose(family, bench, model, ROOT / args.cache)
        key = (family["method"], family["variant"] if family["variant"] in (RAW, EXPLORER) else None)
        predictions[key] = predicted
        entry = bench.entry(predicted, label)
        rows.append(
            {
                **{k: family[k] for k in ("method", "paper", "variant", "parameter")},
                "cells": cells,
                "chosen": value,
                "index": directory,
                "dev": entry["dev"],
                "test": entry["test"],
            }
        )
    for name in ("pixel", "random"):
        predicted = baseline_predictions(name, bench, train.images)
        predictions[(name, None)] = predicted
        entry = bench.entry(predicted, f"{name} baseline")
        rows.append(
            {
                "method": name,
                "paper": None,
                "variant": "baseline",
                "parameter": None,
                "cells": [],
                "chosen": None,
                "index": None,
                "dev": entry["dev"],
                "test": entry["test"],
            }
        )
    claims = [
        {
            "paper": paper,
            "claim": claim,
            "first": list(first),
            "second": list(second),
            **bench.paired(predictions[first], predictions[second], "test"),
        }
        for paper, claim, first, second in CLAIMS
    ]
    result = {
        "rows": rows,
        "claims": claims,
        "history": history_record(),
        "command": "python -m bench.methods_lds",
    }
    for claim in claims:
        print(claim["claim"], json.dumps({k: claim[k] for k in ("heldout", "step_trajectory")}))
    if args.json:
        write_case(args.json, "shipped_model", result)


if __name__ == "__main__":
    main()
