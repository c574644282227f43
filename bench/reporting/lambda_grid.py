"""The per-output lambda grid page: shipped-model LDS of mean and loss indexes across relative lambdas."""

from __future__ import annotations

from bench.reporting.core import commands, load, page, para, source_links, table

LAMBDA_GRID = "lambda_grid.json"


def _cell(entry: dict) -> str:
    low, high = entry["ci95"]
    return f"{entry['mean']:.3f} [{low:.3f}, {high:.3f}]"


@page(
    "docs/benchmarks/lambda_grid.md",
    "Lambda per output function",
    "shipped-model LDS of D-TRAK mean and TRAK loss indexes at relative lambdas 0.0003 to 3, chosen on dev",
    LAMBDA_GRID,
)
def lambda_grid() -> str:
    result = load(LAMBDA_GRID)["cases"]["shipped_model"]
    chosen = result["chosen"]
    rows = [
        [
            cell["output"],
            f"{cell['relative_lambda']:g}"
            + (" (chosen)" if chosen[cell["output"]] == cell["relative_lambda"] else ""),
            f"`{cell['index']}`",
            f"{cell['dev_heldout']['mean']:.3f}",
            _cell(cell["test_heldout"]),
            _cell(cell["test_step_trajectory"]),
        ]
        for cell in result["cells"]
    ]

    def pick(output: str, value: float) -> str:
        grid = sorted(c["relative_lambda"] for c in result["cells"] if c["output"] == output)
        dev = {
            c["relative_lambda"]: c["dev_heldout"]["mean"] for c in result["cells"] if c["output"] == output
        }
        edge = " (the edge of the grid: its optimum may lie beyond)" if value in (grid[0], grid[-1]) else ""
        runner_up = max(v for k, v in dev.items() if k != value)
        return f"`{output}`: lambda {value:g}{edge}, dev LDS {dev[value] - runner_up:+.3f} over the next best"

    picks = "; ".join(pick(output, value) for output, value in chosen.items())
    return "\n\n".join(
        [
            para("""Does each output function get its own best ridge lambda? `bench/lambda_grid.py` rebuilds
            the served output (`mean`, D-TRAK) and TRAK's `loss` from kept raw features, centered
            and normalized, at relative lambdas 0.0003 to 3, and scores every index with `precompute
            evaluate shipped-lds` (the [LDS on the shipped model](lds_mnist5k.md) benchmark). The
            dev split (even subset models, dev queries) chooses the lambda of each output by
            held-out LDS; the test split reports it, with a 95% bootstrap interval over models and
            queries."""),
            commands(result["command"] + f" --json bench/results/{LAMBDA_GRID}"),
            table(
                [
                    "output",
                    "relative lambda",
                    "index",
                    "dev held-out LDS",
                    "test held-out LDS",
                    "test per-step (trajectory-tied)",
                ],
                rows,
            ),
            f"Chosen on dev: {picks}. Results: {source_links([LAMBDA_GRID])}.",
        ]
    )
