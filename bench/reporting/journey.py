"""The Journey-TRAK query page: the explorer's per-step query against the paper's, as per-step LDS."""

from __future__ import annotations

from bench.reporting.core import commands, load, page, para, source_links, table

JOURNEY = "journey_query.json"
VARIANTS = {
    "served": "x0hat at the bucket's timestep, the bucket's shared noise (served)",
    "own t": "x0hat at the step's own timestep, shared noise",
    "own t, fresh noise": "x0hat at its own timestep, fresh noise (Journey-TRAK as written)",
    "trajectory": "the trajectory's own x_t at t, noise eps* (the tied truth's input)",
}


def _interval(entry: dict) -> str:
    low, high = entry["ci95"]
    return f"{entry['mean']:.3f} [{low:.3f}, {high:.3f}]"


def verdict(r: dict) -> str:
    """Which query scores highest per index (trajectory-tied), and whether any interval excludes 0."""
    lines = []
    for directory, entry in r["indexes"].items():
        best = max(VARIANTS, key=lambda v: entry[v]["step_trajectory"]["mean"])
        zero = all(entry[v][t]["ci95"][0] <= 0 for v in VARIANTS for t in ("step_trajectory", "step_proxy"))
        lines.append(
            f"`{directory}`: the highest trajectory-tied mean is the {best!r} query"
            + ("; every interval includes 0." if zero else "; some intervals exclude 0.")
        )
    return (
        " ".join(lines)
        + " With a centered `mean` index, moving the query off its bucket's timestep likely leaves the"
        " difference between the two timesteps' common gradient directions in the centered query (the"
        " offset a region query had before it got its own center), which would explain why the"
        " off-bucket queries fall below the served one there and much less so with `loss`."
    )


@page(
    "docs/benchmarks/journey_query.md",
    "The per-step query against Journey-TRAK's",
    "per-step LDS of the served query, the paper's (own timestep, fresh noise) and the trajectory's x_t",
    JOURNEY,
)
def journey_query() -> str:
    r = load(JOURNEY)
    rows = [
        [
            f"`{directory}`",
            entry["label"],
            VARIANTS[variant],
            _interval(entry[variant]["step_trajectory"]),
            _interval(entry[variant]["step_proxy"]),
        ]
        for directory, entry in r["indexes"].items()
        for variant in VARIANTS
    ]
    offset = next(iter(r["indexes"].values()))["timestep_offset"]
    return "\n\n".join(
        [
            para(f"""Journey-TRAK (arXiv 2312.06205; its code scores a step by the DDPM loss of x0hat
            re-noised with fresh noise at the step's timestep) and the explorer build the per-step query
            differently: the explorer re-noises x0hat at the timestep of the bucket that holds the step
            (training features exist only there; the steps here are {offset:.0f} timesteps from their bucket's
            on average) and with the bucket's shared noise draw. `bench/journey_query.py` scores each query
            variant against the same training features, as the per-step LDS of the shipped-model benchmark
            (test split, bootstrap over subset models and trajectories): against the trajectory-tied truth
            (the subset model's loss at the trajectory's own x_t) and against the re-noised-x0hat proxy, which
            is Journey-TRAK's own definition of the step's output."""),
            commands(r["command"]),
            table(["index", "method", "query", "per-step LDS, trajectory-tied", "per-step LDS, proxy"], rows),
            para(verdict(r)),
            f"Results: {source_links([JOURNEY])}.",
        ]
    )
