"""The page registry and the helpers every page builder uses; render, check and write the pages.

A page is one builder registered with @page: it reads its result files (relative to bench/results) and returns
the page's markdown below the title. A page whose result files are not all there yet is skipped: it is neither
written nor checked nor listed on the index page, and appears once its files do.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"


@dataclass(frozen=True)
class Page:
    path: str  # relative to the repository root
    title: str
    summary: str  # one line for the index page
    sources: tuple[str, ...]  # result files, relative to bench/results
    build: Callable[[], str]

    def available(self) -> bool:
        """Whether every result file the page reads is there (a page without sources always is)."""
        return all((RESULTS / name).exists() for name in self.sources)


PAGES: list[Page] = []


def page(path: str, title: str, summary: str, *sources: str):
    """Register a page builder; the builder returns the page's body (markdown below the title)."""

    def register(build: Callable[[], str]) -> Callable[[], str]:
        PAGES.append(Page(path, title, summary, sources, build))
        return build

    return register


# ------------------------------------------------------------------------------------------------------------
# helpers


def load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def para(text: str) -> str:
    """One paragraph from text wrapped in the source: whitespace runs become single spaces."""
    return " ".join(text.split())


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def commands(*lines: str) -> str:
    return "```bash\n" + "\n".join(runnable(line) for line in lines) + "\n```"


def runnable(command: str) -> str:
    """A recorded command as it runs today: result files written before bench/ became a package recorded
    `python bench/NAME.py ...`, which is now `python -m bench.NAME ...` (run from the repository root)."""
    return re.sub(r"\bpython bench/(\w+)\.py\b", r"python -m bench.\1", command)


def strip_lock(command: str) -> str:
    """Recorded commands ran under the CPU lock of the machine they ran on; the command itself follows it."""
    return command.removeprefix("flock /tmp/cpu.lock ")


def check_command(command: str, args: dict) -> str:
    """The command, once each of its --flag [value] matches the argparse namespace a result recorded."""
    words = command.split()
    for position, word in enumerate(words):
        if not word.startswith("--"):
            continue
        key = word[2:].replace("-", "_")
        if key not in args:
            raise ValueError(f"{command!r}: {word} is not among the recorded args")
        following = words[position + 1] if position + 1 < len(words) else "--"
        value = None if following.startswith("--") else following
        if (value is None and args[key] is not True) or (value is not None and str(args[key]) != value):
            raise ValueError(f"{command!r}: {word} {value or ''} but the result says {key} = {args[key]!r}")
    return command


def ratios(mine: list[float], theirs: list[float]) -> list[float]:
    return [a / b for a, b in zip(mine, theirs, strict=True)]


def joined(values, digits: int = 2) -> str:
    return ", ".join(f"{v:.{digits}f}" for v in values)


def rate(value: float) -> str:
    """Images/s or a ratio: two decimals, three significant digits below 1, none from 100 up."""
    return f"{value:.3g}" if value < 1 else f"{value:.0f}" if value >= 100 else f"{value:.2f}"


def rates(values) -> str:
    return ", ".join(map(rate, values))


def interval(entry: dict) -> str:
    low, high = entry["ci95"]
    return f"{entry['mean']:.3f} [{low:.3f}, {high:.3f}]"


def source_links(names) -> str:
    return ", ".join(f"[`bench/results/{name}`](../../bench/results/{name})" for name in names)


UNRECORDED = (
    ("bench/app_latency.py", "web app start-up, generate, slider and rollout latency"),
    ("bench/load.py", "concurrent gradio_client sessions generating and scrubbing"),
    (
        "bench/precision_agreement.py",
        "agreement of fp32 and bf16 kronecker features with exact scores, per timestep",
    ),
    ("bench/projection_agreement.py", "agreement of projected scores with exact ones, by projector and k"),
)


def index_page() -> str:
    listed = [
        [f"[{p.title}]({Path(p.path).name})", p.summary, source_links(p.sources)]
        for p in available_pages()
        if p.path.startswith("docs/benchmarks/")
    ]
    return "\n\n".join(
        [
            para("""Each page says what was measured and the command that wrote its result file, then
            shows tables
            rendered from that file. `python -m bench.report` writes every page from `bench/results/`; do not
            edit them by hand, rerun the benchmark and then the script. `python -m bench.report --check` (run
            by `tests/test_docs.py`) fails when a page is stale."""),
            table(["page", "what it measures", "result files"], listed),
            para(
                "These scripts print their tables but keep no result file, so no page shows them: "
                + "; ".join(f"`{script}` ({what})" for script, what in UNRECORDED)
                + "."
            ),
        ]
    )


INDEX = Page("docs/benchmarks/README.md", "Benchmarks", "the list of benchmark pages", (), index_page)


def available_pages() -> list[Page]:
    """The registered pages whose result files are all there."""
    return [p for p in PAGES if p.available()]


def all_pages() -> list[Page]:
    """The pages to write and check: the available ones and the index page."""
    return [*available_pages(), INDEX]


def render(page_: Page) -> str:
    sources = ", ".join(f"bench/results/{name}" for name in page_.sources) or "the page list"
    return (
        f"<!-- generated by bench/report.py from {sources}; edit the script, not this page -->\n\n"
        f"# {page_.title}\n\n{page_.build().rstrip()}\n"
    )


def stale_pages() -> list[str]:
    """Pages (paths relative to the repository root) whose file differs from what render() writes."""
    return [
        p.path
        for p in all_pages()
        if not (ROOT / p.path).exists() or (ROOT / p.path).read_text() != render(p)
    ]


def write_pages() -> list[str]:
    written = []
    for page_ in all_pages():
        path, text = ROOT / page_.path, render(page_)
        if not path.exists() or path.read_text() != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            written.append(page_.path)
    return written
