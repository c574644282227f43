"""The per-step counterfactual page: does removing a step's top-k influencers move the completions from that
step more than removing random or pixel-nearest training images?"""

from __future__ import annotations

from bench.reporting.core import commands, load, page, para, source_links, table

STEP_COUNTERFACTUAL = "step_counterfactual.json"


def interval(entry: dict, digits: int = 3) -> str:
    return f"{entry['mean']:.{digits}f} [{entry['ci95'][0]:.{digits}f}, {entry['ci95'][1]:.{digits}f}]"


def excludes_zero(entry: dict) -> bool:
    low, high = entry["ci95"]
    return low > 0 or high < 0


@page(
    "docs/benchmarks/step_counterfactual.md",
    "Per-step counterfactual on the shipped model",
    "retraining without a step's top-k influencers against k random and k pixel-nearest removals, "
    "completions from the same x_t",
    STEP_COUNTERFACTUAL,
)
def step_counterfactual() -> str:
    results = load(STEP_COUNTERFACTUAL)
    config, steps, timesteps = results["config"], results["steps"], results["timesteps"]
    queries = len(config["seeds"])
    intro = para(f"""
        For {queries} generated digits of the shipped model (sampler seeds {config["seeds"][0]} to
        {config["seeds"][-1]}, {config["sampler_steps"]} steps) and steps
        {", ".join(map(str, config["steps"]))},
        the explorer's own top-k positive influencers of that step ({config["fraction"]:.0%} of the training
        set) are removed and the shipped architecture is retrained ({results["models"]} models in all, the
        recipe of the shipped-model LDS); so are the k pixel-nearest training images of each final digit and
        {config["random_sets"]} random sets of k. Each model runs {config["completions"]} stochastic
        completions from the trajectory's own x_t with the same sampler seed, and a cell is the
        total-variation distance of their class distribution from the reference model's (trained on all
        images with the same recipe). Means over the queries with bootstrap 95% intervals over the queries;
        "top-k - random" is paired per query.""")
    rows = []
    for step, entry in steps.items():
        gain = entry["topk_minus_random"]
        rows.append(
            [
                f"{step} (t = {timesteps[step]})",
                interval(entry["tv"]["topk"]),
                interval(entry["tv"]["random"]),
                interval(entry["tv"]["pixel"]),
                interval(gain) + (" **excludes 0**" if excludes_zero(gain) else ""),
                interval(entry["topk_minus_pixel"]),
                interval(entry["drop_topk"]),
            ]
        )

    def beats(key: str) -> int:
        return sum(excludes_zero(entry[key]) and entry[key]["mean"] > 0 for entry in steps.values())

    held, over_pixel = beats("topk_minus_random"), beats("topk_minus_pixel")
    verdict = para(f"""
        Top-k removal moves the completions more than random removal, with an interval that excludes zero, at
        {held} of the {len(steps)} steps, and more than pixel-nearest removal at {over_pixel}. With {queries}
        queries the intervals are wide; near the end of
        sampling (small t) the completions barely vary at all, so no removal moves them much.""")
    return "\n\n".join(
        [
            intro,
            commands(results["command"]),
            f"Results ({source_links([STEP_COUNTERFACTUAL])}; per-model files in "
            "`bench/results/step_counterfactual/`):",
            table(
                [
                    "step",
                    "TV top-k removed",
                    "TV random",
                    "TV pixel-nearest",
                    "top-k - random",
                    "top-k - pixel",
                    "drop of p(c*) from x_t, top-k",
                ],
                rows,
            ),
            verdict,
        ]
    )
