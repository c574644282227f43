"""Each output function's ridge lambda, chosen by LDS on the shipped model's dev split, reported on test.

    python -m bench.lambda_grid --json bench/results/lambda_grid.json

Builds, from the raw features two featurize runs kept (`--keep-features`: runs/mean512 with the served
output `mean`, runs/loss512 with TRAK's `loss`), centered and normalized int8 indexes at relative lambdas
0.0003 to 3 (`precompute reindex`; assets/index is mean at 0.03, runs/loss512 is loss at 0.03),
then scores them all with `precompute evaluate shipped-lds`. --scores FILE takes that command's --json output
for the same indexes instead of running it again. Each output's lambda is the one with the best dev held-out
LDS.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from bench.results_file import write_case

ROOT = Path(__file__).resolve().parents[1]

LAMBDAS = (0.0003, 0.001, 0.003, 0.03, 0.3, 3.0)
SOURCES = {"mean": "runs/mean512", "loss": "runs/loss512"}
SERVED = {("mean", 0.03): "assets/index", ("loss", 0.03): "runs/loss512"}  # already built at 0.03


def index_dir(output: str, relative: float) -> str:
    return SERVED.get((output, relative)) or f"{SOURCES[output]}-l{relative:g}"


def build(output: str, relative: float) -> None:
    directory = ROOT / index_dir(output, relative)
    if (directory / "meta.json").is_file():
        return
    command = [sys.executable, "-m", "precompute", "reindex", "--features-from", SOURCES[output]]
    command += ["--out", str(directory), "--lambda", f"{relative:g}", "--storage", "int8"]
    subprocess.run(command, check=True, cwd=ROOT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default=None)
    parser.add_argument("--scores", default=None, help="a shipped-lds --json of the same indexes")
    args = parser.parse_args()
    grid = [(output, relative) for output in SOURCES for relative in LAMBDAS]
    indexes = [index_dir(*cell) for cell in grid]
    command = ["python", "-m", "precompute", "evaluate", "shipped-lds", "--index", *indexes]
    if args.scores is None:
        for cell in grid:
            build(*cell)
        scores_path = ROOT / "runs" / "lambda_grid_scores.json"
        subprocess.run([sys.executable, *command[1:], "--json", str(scores_path)], check=True, cwd=ROOT)
    else:
        scores_path = Path(args.scores)
    methods = json.loads(scores_path.read_text())["methods"]
    missing = [d for d in indexes if d not in methods]
    if missing:
        raise SystemExit(f"{scores_path} has no scores for {missing}: run without --scores")
    cells = []
    for (output, relative), directory in zip(grid, indexes):
        meta = json.loads((ROOT / directory / "meta.json").read_text())
        assert meta["lambda"][0]["relative"] == relative and meta["spec"]["output"] == output, directory
        entry = methods[directory]
        cells.append(
            {
                "output": output,
                "relative_lambda": relative,
                "index": directory,
                **{
                    f"{split}_{key}": entry[split][key]
                    for split in ("dev", "test")
                    for key in ("heldout", "step_trajectory")
                },
            }
        )
    chosen = {
        output: max((c for c in cells if c["output"] == output), key=lambda c: c["dev_heldout"]["mean"])[
            "relative_lambda"
        ]
        for output in SOURCES
    }
    result = {"cells": cells, "chosen": chosen, "command": "python -m bench.lambda_grid"}
    print(json.dumps({"chosen": chosen}, indent=2))
    if args.json:
        write_case(args.json, "shipped_model", result)


if __name__ == "__main__":
    main()
