"""Speed pages: featurization against traker, where featurization time goes, parameter subsets (the memory
allocator and the index at scale: bench/reporting/scale.py)."""

from __future__ import annotations

import statistics

from bench.reporting.core import (
    check_command,
    commands,
    joined,
    load,
    page,
    para,
    rate,
    rates,
    ratios,
    source_links,
    table,
)

# ------------------------------------------------------------------------------------------------------------
# featurization against traker

TRAKER = "featurize_vs_traker.json"  # cases: main (timed, seeds 0-4) and more_seeds (agreement, seeds 5-9)
TRAKER_COMMAND = (
    "python -m bench.featurize_vs_traker --projector kronecker --calibrate 16 --precision mixed "
    "--traker-bf16 --seeds 5 --runs 7 --default-n 8 --workers-baseline 1 "
    f"--json bench/results/{TRAKER} --case main"
)
TRAKER_SEEDS_COMMAND = (
    "python -m bench.featurize_vs_traker --projector kronecker --calibrate 16 --precision mixed "
    "--traker-bf16 --seeds 5 --first-seed 5 --runs 3 --skip-default "
    f"--json bench/results/{TRAKER} --case more_seeds"
)
FASTER_TRAKER = "traker best, the faster of fp32 and bf16 autocast in each repeat"


def traker_rows(results: dict) -> tuple[dict, dict]:
    """The rows by method name, and our main row."""
    rows = {row["method"]: row for row in results["rows"]}
    return rows, next(row for name, row in rows.items() if name.startswith("ours ("))


def speed_headline(results: dict | None = None) -> float:
    """The README's speed figure: ours over the faster of traker best's fp32 and bf16 arithmetic."""
    return (results or load(TRAKER)["cases"]["main"])["ratios"][FASTER_TRAKER]


def spearman_cells(spearman: dict | None) -> list[str]:
    if spearman is None:
        return ["not measured"] * 4
    cells = []
    for kind in ("inner", "cosine"):
        entry = spearman[kind]
        cells += [f"{entry['mean']:.5f} [{joined(entry['per_seed'], 4)}]", f"{entry['min']:.4f}"]
    return cells


def traker_tables(results: dict) -> str:
    rows, ours = traker_rows(results)
    args = results["args"]
    speed = table(
        ["method", "settings", "setup s", f"images/s per repeat ({args['runs']} repeats)", "median images/s"],
        [
            [
                row["method"],
                row["settings"],
                f"{row['setup_s']:.1f}",
                rates(row["images_per_s"]),
                rate(row["median_images_per_s"]),
            ]
            for row in rows.values()
        ],
    )
    first = args.get("first_seed", 0)
    agreement = table(
        [
            "method",
            f"Spearman, inner product: mean [per seed; seeds {first}-{first + args['seeds'] - 1}]",
            "worst query",
            "Spearman, cosine: mean [per seed]",
            "worst query",
        ],
        [[row["method"], *spearman_cells(row["spearman"])] for row in rows.values()],
    )
    against = [
        [
            name,
            f"**{rate(results['ratios'][name])}x**",
            rates(ratios(ours["images_per_s"], row["images_per_s"])),
        ]
        for name, row in rows.items()
        if row is not ours
    ]
    if FASTER_TRAKER in results["ratios"]:
        best, bf16 = rows["traker best"]["images_per_s"], rows["traker best, bf16 autocast"]["images_per_s"]
        faster = [max(a, b) for a, b in zip(best, bf16, strict=True)]
        against.append(
            [
                FASTER_TRAKER,
                f"**{rate(results['ratios'][FASTER_TRAKER])}x**",
                rates(ratios(ours["images_per_s"], faster)),
            ]
        )
    speedups = table(
        [f"{ours['method']} against", "median of the within-repeat ratios", "within-repeat ratios"], against
    )
    cost = results["cost_vs_training"]
    training = table(
        [
            "ours, ms per (example, timestep)",
            "AdamW training step, ms per sample (median)",
            "ours / training step",
            "within-repeat ratios",
        ],
        [
            [
                f"{cost['ms_per_example_timestep']:.3f}",
                f"{cost['train_step_ms_per_sample']:.3f}",
                f"**{cost['relative_to_train_step']:.2f}x**",
                joined(cost["ratios"]),
            ]
        ],
    )
    return "\n\n".join(
        [
            speed,
            agreement,
            speedups,
            para(f"""Cost against training ({args["train_steps"]} AdamW steps of the same model at batch
            {args["train_batch"]}, fp32, as `precompute train` trains, timed in each repeat):"""),
            training,
        ]
    )


@page(
    "docs/benchmarks/featurize_speed.md",
    "Featurization speed: ours against traker",
    "images/s and agreement with exact scores of our featurizer against traker 0.3.2, and against a "
    "training step",
    TRAKER,
)
def featurize_speed() -> str:
    results, second = load(TRAKER)["cases"]["main"], load(TRAKER)["cases"]["more_seeds"]
    args = results["args"]
    cosines = {}
    for name in ("ours", "traker best"):
        rows = [traker_rows(r)[1] if name == "ours" else traker_rows(r)[0][name] for r in (results, second)]
        cosines[name] = statistics.fmean(
            rows[0]["spearman"]["cosine"]["per_seed"] + rows[1]["spearman"]["cosine"]["per_seed"]
        )
    intro = para(f"""
        How fast does `precompute featurize` turn training images into projected gradients, against traker
        0.3.2 on the same CPU, and how close do both come to the exact scores? Both sides featurize the same
        {args["n"]} mnist5k training images of the shipped model with the same quantity: the gradient of
        D-TRAK's `square` output averaged over 10 timesteps (t = 50, 150, ..., 950) with the same shared
        noise, projected to k = {args["proj_dim"]} (traker's unprojected gradient matches ours to
        {results["gradient_mismatch"]:.1e} relative). Ours runs `--projector {args["projector"]} --calibrate
        {args["calibrate"]} --precision {args["precision"]}` on {args["workers"]} worker threads; "traker
        best" is traker at its fastest settings (fp32, one projector block built once, {args["traker_batch"]}
        images per call), also timed under the same bf16 autocast (`--traker-bf16`, not a traker setting).
        Timed runs are interleaved (each repeat times every method once) and a speed-up is the median of the
        within-repeat ratios. Agreement: for {args["queries"]} held-out queries, the Spearman correlation of
        each method's scores for the training images with the exact scores from full unprojected gradients,
        averaged over projection seeds. traker is a bench-only dependency.""")
    second_intro = para(f"""
        The same bench with projection seeds 5-9 and {second["args"]["runs"]} more timed repeats, traker
        default left out ({source_links([TRAKER])}, case `more_seeds`). Over all ten seeds the mean cosine
        agreement is {cosines["ours"]:.5f} for ours and {cosines["traker best"]:.5f} for traker best.""")
    return "\n\n".join(
        [
            intro,
            commands("pip install -r bench/requirements-bench.txt", check_command(TRAKER_COMMAND, args)),
            f"Results ({source_links([TRAKER])}, case `main`):",
            traker_tables(results),
            "## A second sample of projection seeds",
            second_intro,
            commands(check_command(TRAKER_SEEDS_COMMAND, second["args"])),
            traker_tables(second),
        ]
    )


# ------------------------------------------------------------------------------------------------------------
# where featurization time goes

PROFILE = "featurize_profile.json"
PROFILE_COMMAND = (
    "python -m bench.featurize_profile --paths kronecker+calibrated kronecker+calibrated+bf16 "
    f"--repeats 5 --json bench/results/{PROFILE}"
)


@page(
    "docs/benchmarks/featurize_profile.md",
    "Where featurization time goes",
    "per-stage cost of the kronecker featurizer in fp32 and bf16, one (example, timestep) per row, "
    "against a training step",
    PROFILE,
)
def featurize_profile() -> str:
    results = load(PROFILE)
    paths, batch = results["paths"], results["batch"]
    names = list(paths)
    stages = list(paths[names[0]]["stages_ms_per_batch"])
    rows = [
        [stage, *(f"{paths[name]['stages_ms_per_batch'][stage] / batch:.2f} ms" for name in names)]
        for stage in stages
    ]
    rows.append(
        [
            "features end to end",
            *(f"{paths[name]['features_ms_per_example_timestep']:.2f} ms" for name in names),
        ]
    )
    rows.append(
        ["examples per second, end to end", *(f"{paths[name]['examples_per_s']:.0f}" for name in names)]
    )
    per_repeat = {name: " / ".join(f"{r:.2f}" for r in paths[name]["ratios"]) for name in names}
    rows.append(
        [
            f"**featurization / AdamW training step** ({results['train_step_per_sample_ms']:.2f} ms "
            "per sample)",
            *(f"**{paths[name]['relative_to_train_step']:.2f}x** ({per_repeat[name]})" for name in names),
        ]
    )
    parts = ("features", "whitening", "I/O")
    seconds = [[name, *(f"{paths[name]['end_to_end_s'][part]:.2f}" for part in parts)] for name in names]
    intro = para(f"""
        `bench/featurize_profile.py` times each stage of featurization (D-TRAK's `square` output, the script's
        default) on the shipped model and {results["images"]} mnist5k training images x {results["buckets"]}
        buckets, with one timestep and one noise draw per bucket, so that one row is one (example, timestep)
        pair; batches of {batch} rows, k = {results["proj_dim"]}, {results["threads"]} torch threads. In every
        repeat it also times one batched AdamW training step of the same model at the same batch size; the
        last row is the median of the per-repeat ratios (each repeat in brackets). A stage row is the stage's
        time for one batch divided by {batch}. The two-pass stages (backward, then the blocks) are shown for
        scale; the one-pass backward is what `features()` runs.""")
    return "\n\n".join(
        [
            intro,
            commands(PROFILE_COMMAND),
            f"Results ({source_links([PROFILE])}):",
            table(["per (example, timestep)", *names], rows),
            f"End to end, seconds for {results['images']} images x {results['buckets']} buckets:",
            table(["path", "features s", "whitening s", "I/O s"], seconds),
        ]
    )


# ------------------------------------------------------------------------------------------------------------
# parameter subsets

SUBSETS = "param_subsets.json"
SUBSETS_COMMAND = f"python -m bench.param_subsets --json bench/results/{SUBSETS}"


@page(
    "docs/benchmarks/param_subsets.md",
    "Featurizing a parameter subset (`--params`)",
    "speed and agreement with the full exact scores when only some parameters' gradient is featurized",
    SUBSETS,
)
def param_subsets() -> str:
    results = load(SUBSETS)
    args = results["args"]
    rows = [
        [
            row["subset"],
            row["projector"],
            f"{row['num_params']:,}",
            f"{row['norm_share']:.1%}",
            f"{row['median_images_per_s']:.1f}",
            f"{row['spearman']['inner']['mean']:.4f}",
            f"{row['spearman']['cosine']['mean']:.4f}",
        ]
        for row in results["rows"]
    ]
    intro = para(f"""
        What does featurizing only some parameters' gradient (`precompute featurize --params PREFIX ...`) buy
        in speed and cost in accuracy? The setting of the traker bench: the shipped model, {args["n"]} mnist5k
        training images, D-TRAK's `square` output over 10 timesteps, k = {args["proj_dim"]}. For each subset
        and projector: images/s (median of {args["runs"]} runs after a warm-up), the subset's share of the
        squared gradient norm (on 16 of the images), and the Spearman agreement of its scores for
        {args["queries"]} held-out queries with the exact scores of the *full* gradient (all parameters,
        unprojected), averaged over {args["seeds"]} projection seeds.""")
    return "\n\n".join(
        [
            intro,
            commands(check_command(SUBSETS_COMMAND, args)),
            f"Results ({source_links([SUBSETS])}):",
            table(
                [
                    "parameters",
                    "projector",
                    "parameters featurized",
                    "share of the squared gradient norm",
                    "images/s",
                    "Spearman, inner product",
                    "Spearman, cosine",
                ],
                rows,
            ),
        ]
    )
