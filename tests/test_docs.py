"""The README and the generated benchmark pages stay current: pages match bench/report.py, links resolve,
the README stays short, and its headline numbers are the ones in the result files."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "bench" / "report.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_benchmark_pages_are_current(report):
    assert report.stale_pages() == [], "stale pages: run python -m bench.report"
    assert report.main(["--check"]) == 0


def test_every_page_builder_has_a_listed_page(report):
    """Every page whose result files exist is on the index page (the others wait for their files)."""
    index = (ROOT / report.INDEX.path).read_text()
    for page in report.core.available_pages():
        if page.path.startswith("docs/benchmarks/"):
            assert f"({Path(page.path).name})" in index


def test_every_result_file_has_a_page(report):
    """One current result per benchmark: a JSON in bench/results that no page reads is stale."""
    sources = {name for page in report.PAGES for name in page.sources}
    results = {path.name for path in (ROOT / "bench" / "results").glob("*.json")}
    unpaged = sorted(results - sources)
    assert not unpaged, f"no page reads {unpaged}: add a page builder to bench/reporting/ or remove the file"


def test_readme_is_short():
    assert len(README.read_text().splitlines()) <= 250


def markdown_files() -> list[Path]:
    return [README, *sorted((ROOT / "docs").rglob("*.md"))]


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.DOTALL)  # code blocks hold no links
    for target in LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # http(s), mailto, in-page anchors
        file = (path.parent / target.split("#")[0]).resolve()
        assert file.exists(), f"{path.relative_to(ROOT)} links to {target}, which does not exist"


def headline_section() -> str:
    """The README's "Accuracy and speed" section, its whitespace collapsed (sentences wrap across lines)."""
    section = README.read_text().split("## Accuracy and speed", 1)[1].split("\n## ", 1)[0]
    return " ".join(section.split())


def test_speed_headline_is_the_result_file(report):
    ratio = report.speed_headline()
    assert ratio == report.load(report.TRAKER)["cases"]["main"]["ratios"][report.FASTER_TRAKER]
    section = headline_section()
    assert f"{ratio:.1f}x as fast as traker" in section
    assert "docs/benchmarks/featurize_speed.md" in section


def test_check_names_a_stale_page(report, tmp_path, monkeypatch, capsys):
    """--check fails and names the page when a page on disk differs from what the script writes."""
    page = report.Page("docs/benchmarks/demo.md", "Demo", "a demo page", (), lambda: "body")
    monkeypatch.setattr(report.core, "ROOT", tmp_path)
    monkeypatch.setattr(report.core, "PAGES", [page])
    index = report.Page("docs/benchmarks/README.md", "Index", "-", (), lambda: "index")
    monkeypatch.setattr(report.core, "INDEX", index)
    assert report.main([]) == 0
    assert report.main(["--check"]) == 0
    (tmp_path / page.path).write_text("edited by hand\n")
    capsys.readouterr()
    assert report.main(["--check"]) == 1
    assert "docs/benchmarks/demo.md" in capsys.readouterr().out


def test_a_page_waits_for_its_result_files(report, tmp_path, monkeypatch):
    """A page whose result files are not all there is not written, checked or listed, until they appear."""
    results = tmp_path / "bench" / "results"
    results.mkdir(parents=True)
    waiting = report.Page("docs/benchmarks/waiting.md", "Waiting", "a page", ("later.json",), lambda: "body")
    monkeypatch.setattr(report.core, "ROOT", tmp_path)
    monkeypatch.setattr(report.core, "RESULTS", results)
    monkeypatch.setattr(report.core, "PAGES", [waiting])
    assert report.main([]) == 0
    assert not (tmp_path / waiting.path).exists()
    assert "waiting.md" not in (tmp_path / report.INDEX.path).read_text()
    (results / "later.json").write_text("{}")
    assert report.main(["--check"]) == 1
    assert report.main([]) == 0
    assert (tmp_path / waiting.path).exists()
    assert "(waiting.md)" in (tmp_path / report.INDEX.path).read_text()


def test_per_step_headline_is_the_result_file():
    import json

    per_bucket = json.loads((ROOT / "bench/results/step_quality.json").read_text())["indexes"][
        "assets/index"
    ]["per_bucket"]
    test = [entry["test"] for entry in per_bucket.values()]
    low, high = (round(100 * f([row["label_agreement"] for row in test])) for f in (min, max))
    section = headline_section()
    assert f"share the query's label {low}-{high}% of the time at every bucket" in section
    assert (
        min(row["spread_min"] for row in test) >= 0.01
        and max(row["positive_negative_share"] for row in test) == 0
    )


def test_shipped_lds_headline_is_the_result_file():
    import json

    results = json.loads((ROOT / "bench/results/lds_mnist5k.json").read_text())
    test = {name: entry["test"]["heldout"] for name, entry in results["methods"].items()}
    shipped, pixel = test["assets/index"], test["pixel"]
    section = headline_section()
    low, high = shipped["ci95"]
    assert (
        f"LDS of {shipped['mean']:.3f} [{low:.3f}, {high:.3f}] on **clean held-out digits** "
        f"({results['truth']['test_models']} test-split subset models) against {pixel['mean']:.3f} for "
        "pixel similarity" in section
    )
    assert "**per-step queries on generated trajectories**" in section and "**ceiling**" in section
    assert "docs/benchmarks/lds_mnist5k.md" in section
