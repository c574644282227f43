"""Write the benchmark pages in docs/benchmarks/ (and docs/evaluation.md) from the results in bench/results/.

    python -m bench.report            # (re)write every page
    python -m bench.report --check    # write nothing; exit 1, naming the stale pages, if a page would change

The pages are built in bench/reporting/: core.py holds the registry and the helpers (load, para, table,
commands, ...), and speed.py, accuracy.py and steps.py the builders. Each page is one small builder
function registered with @page: it reads its result files and returns the page's markdown below the title
(an intro saying what was measured and the command that wrote the result file, then tables rendered from
it). To add a page, add a builder to one of those modules (or a new module imported below), e.g.

    @page("docs/benchmarks/demo.md", "Demo", "a line for the index", "demo.json")
    def demo() -> str:
        results = load("demo.json")
        return "\\n\\n".join([para("What ..."), commands(results["command"]), table(header, rows)])

A page whose result files are not all in bench/results yet is skipped (not written, checked or listed on
the index page, docs/benchmarks/README.md) until they appear; then `python -m bench.report` writes it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.reporting import core
from bench.reporting.accuracy import LDS, accuracy_headline  # noqa: F401
from bench.reporting.core import INDEX, PAGES, Page, all_pages, load, stale_pages, write_pages  # noqa: F401
from bench.reporting.speed import FASTER_TRAKER, TRAKER, speed_headline  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 and name the pages that would change"
    )
    args = parser.parse_args(argv)
    if args.check:
        stale = core.stale_pages()
        for path in stale:
            print(f"stale: {path} (run python -m bench.report)")
        return 1 if stale else 0
    written = core.write_pages()
    print(
        f"{len(core.all_pages())} pages, {len(written)} rewritten"
        + (": " + ", ".join(written) if written else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
