"""Running the precompute CLI as a user does: a real subprocess."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def run_featurize(model_dir: Path, out: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m precompute featurize --model model_dir --data digits --out out *args`, output captured."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "precompute",
            "featurize",
            "--model",
            str(model_dir),
            "--data",
            "digits",
            "--out",
            str(out),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
