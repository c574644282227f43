"""The layout keeps its promises: the build commands do not load the evaluation harness."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _modules_after(argv: list[str]) -> set[str]:
    """The precompute modules imported once `python -m precompute *argv` has parsed its arguments."""
    code = (
        "import contextlib, io, sys\n"
        "from precompute.__main__ import main\n"
        "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        f"    main({argv!r})\n"
        "print(' '.join(m for m in sys.modules if m.startswith('precompute')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return set(result.stdout.split())


def test_build_commands_do_not_import_the_evaluation_cli():
    for command in ("train", "featurize", "reindex"):
        loaded = _modules_after([command, "--help"])
        assert "precompute.featurize.cli" in loaded
        assert not any("evaluat" in name for name in loaded), (command, sorted(loaded))


def test_evaluate_imports_its_cli():
    assert any("evaluat" in name for name in _modules_after(["evaluate", "--help"]))
