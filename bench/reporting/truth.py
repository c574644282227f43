"""The ground-truth study page: how much of each retraining truth is signal, the LDS ceiling it allows, and
what it costs, per training length and number of shared seeds."""

from __future__ import annotations

from bench.reporting.core import commands, load, page, para, source_links, table

TRUTH_STUDY = "truth_study.json"
KIND_NAMES = {
    "heldout": "whole image, held-out digits",
    "generated": "whole image, generated finals",
    "step_proxy": "per step, Journey-TRAK (x0hat re-noised)",
    "step_trajectory": "per step, trajectory-tied (x_t vs its completions)",
}


@page(
    "docs/benchmarks/truth_study.md",
    "Ground-truth study: signal, ceiling and cost per recipe",
    "share of the LDS truth that is reproducible across retraining seeds (ICC), the LDS a perfect method "
    "could reach, and the CPU cost, per training length and number of shared seeds",
    TRUTH_STUDY,
)
def truth_study() -> str:
    results = load(TRUTH_STUDY)
    config, stops = results["config"], results["stops"]
    first = next(iter(stops.values()))
    intro = para(f"""
        An LDS is only as good as its ground truth. `precompute evaluate truth` retrains the shipped
        architecture on random halves of the 4,500 training digits, every half with the recipe seeds
        {", ".join(map(str, first["seeds"]))} (the same seeds for every half: the same init, batch indices,
        timesteps and noise), and measures every model with the same evaluation draws:
        {config["pairs_per_bucket"]} (t, eps) pairs in each of {config["buckets"]} buckets for a whole image,
        {config["proxy_pairs"]} pairs inside the step's bucket for a per-step query (Journey-TRAK's
        definition), and {config["completions"]} completions from x_t for the trajectory-tied one. Each model
        is measured at several training lengths (one run, measured as it passes each). Per query, a two-way
        decomposition (subset effect + seed offset + residual) gives the share of the truth that is
        signal, the ICC (precompute.evaluation.ceiling; pooled over queries through each query's F ratio,
        so a query's scale does not matter). A truth that averages m seeds has reliability
        m ICC / (1 + (m - 1) ICC), and a perfect method reaches Spearman
        (6 / pi) arcsin(sqrt(reliability) / 2) against it: the ceiling. The queries share the subsets, so
        the subsets, not the queries, bound how well the ICC is known: the ± is a jackknife standard error
        over subsets. Queries: the benchmark's
        {results["heldout_queries"]} held-out digits and 48 generated trajectories (10 steps each).""")
    rows = []
    for stop, entry in stops.items():
        for kind, values in entry["kinds"].items():
            top = values["levels"][-1]
            rows.append(
                [
                    f"{int(stop):,}",
                    KIND_NAMES[kind],
                    f"{top['icc_pooled']:.3f} ({top['icc_median']:.3f})"
                    + (f" ± {values['icc_jackknife_se']:.3f}" if values.get("icc_jackknife_se") else ""),
                    *(f"{top['ceiling'][m]:.2f}" for m in ("1", "3", "5")),
                    f"{values['leave_one_seed_out']:.2f}" if "leave_one_seed_out" in values else "n/a",
                ]
            )
    signal = table(
        [
            "training steps",
            "truth",
            "ICC pooled (median) ± jackknife SE",
            "ceiling, 1 seed",
            "3 seeds",
            "5 seeds",
            "one seed vs mean of others",
        ],
        rows,
    )
    cost = table(
        ["training steps", "subsets x seeds measured", "train CPU s / model", "measure CPU s / model"],
        [
            [
                f"{int(stop):,}",
                f"{len(entry['subsets'])} x {len(entry['seeds'])}",
                f"{entry['train_cpu_seconds']:.0f}",
                f"{entry['measure_cpu_seconds']:.0f}",
            ]
            for stop, entry in stops.items()
        ],
    )
    recipe_rows = [
        [
            f"{r['steps']:,} steps x {r['seeds']} seed{'s' if r['seeds'] > 1 else ''}",
            *(f"{r['ceilings'][k]:.2f}" for k in ("heldout", "step_proxy")),
            f"{r['cpu_hours']:.1f}",
            "yes" if r["meets"] else "no",
        ]
        for r in results["recipes"]
    ]
    chosen = results.get("chosen")
    verdict = (
        para(f"""The rebuilt truth uses **{chosen["steps"]:,} steps x {chosen["seeds"]} seeds**: the cheapest
            recipe whose ceilings reach 0.5 on the held-out and the per-step columns with at least 3 seeds
            (or, where none does, the one with the highest of its lower ceiling).""")
        if chosen
        else para("""No stop has every seed of 4 subsets yet, too few to choose from (the ICC above is a first
            look: with 2 or 3 subsets it is a mean of per-query shares, which drifts upwards); the recipes
            appear as the models finish.""")
    )
    draws = []
    for stop, entry in stops.items():
        for kind, values in entry["kinds"].items():
            cells = ", ".join(f"{lv['draws']}: {lv['icc_pooled']:.3f}" for lv in values["levels"])
            draws.append([f"{int(stop):,}", KIND_NAMES[kind], cells])
    return "\n\n".join(
        [
            intro,
            commands(
                "python -m precompute evaluate truth --subsets 4 --stops 600 1250   # 2 processes, resumable",
                results["command"],
            ),
            f"Signal and ceiling with every draw ({source_links([TRUTH_STUDY])}):",
            signal,
            "## What each recipe costs for the 64-subset benchmark",
            para("""CPU seconds per model on this machine (one thread; medians over the models; a model
                resumed after an interruption counts only what it trained in the run that measured it), and
                CPU hours for 64 subsets x m seeds."""),
            cost,
            table(
                ["recipe", "ceiling held-out", "ceiling per step (Journey-TRAK)", "CPU hours", ">= 0.5"],
                recipe_rows,
            ),
            verdict,
            "## Signal against the number of evaluation draws",
            para("""ICC (pooled) with the mean over the first n draws (n: ICC): the whole-image truth draws n
                pairs per bucket, the Journey-TRAK truth n pairs in the step's bucket, the trajectory-tied
                truth n completions."""),
            table(["training steps", "truth", "draws: ICC"], draws),
        ]
    )


def ceiling_rows(results: dict, columns: tuple[tuple[str, str], ...], cell) -> list[list[str]]:
    """What a perfect method could reach against this truth (precompute.evaluation.ceiling), to put beside the
    methods of an LDS table with these (title, key) columns; `cell` renders an old-style LDS entry."""
    if "ceiling" not in results:  # a result file written before the ceiling estimator
        old = results["seed_ceiling"]
        twice = old["subsets"]
        return [
            [
                f"seed ceiling ({twice} subset{'' if twice == 1 else 's'} trained twice)",
                *(cell(old[key]) if key in old else "n/a" for _, key in columns),
            ]
        ]
    found = results["ceiling"]
    used = found["seeds_used"]
    truth = f"the {used}-seed mean" if used > 1 else "one seed"
    rows = [
        [
            f"**ceiling**: a perfect method against {truth} (ICC of {found['subsets']} subsets x "
            f"{found['seeds']} seeds)",
            *(
                f"{found[key]['ceiling']:.3f} (ICC {found[key]['icc']:.3f})" if key in found else "n/a"
                for _, key in columns
            ),
        ]
    ]
    if all("leave_one_seed_out" in found.get(key, {}) for _, key in columns):
        rows.append(
            [
                "one seed against the mean of the others",
                *(f"{found[key]['leave_one_seed_out']:.3f}" for _, key in columns),
            ]
        )
    return rows
