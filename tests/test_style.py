"""The tree stays formatted and lint-clean (ruff, rules in pyproject.toml) and no Python file grows past 400
lines: CI runs these with the rest of the suite."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 400


def _ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ruff", *args], cwd=ROOT, capture_output=True, text=True)


def _python_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True)
    files = [ROOT / name for name in listed.stdout.split()] if listed.returncode == 0 else []
    return files or sorted(p for p in ROOT.rglob("*.py") if ".venv" not in p.parts and "runs" not in p.parts)


def test_ruff_lint_passes():
    result = _ruff("check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_leaves_every_file_as_it_is():
    result = _ruff("format", "--check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_python_file_is_over_the_line_cap():
    files = _python_files()
    assert len(files) > 50, "the file listing found the tree"
    long = {
        str(p.relative_to(ROOT)): n
        for p in files
        if p.is_file() and (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"over {MAX_LINES} lines: {long}"
