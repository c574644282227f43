"""One result file per bench script: a script run with `--json FILE --case NAME` stores its result under
cases[NAME] of FILE, next to the other configurations it was run with (bench/report.py reads them)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def write_case(path: str | Path, case: str, result: dict) -> None:
    """Set cases[case] of the JSON file at `path` (created if missing) to `result`, atomically."""
    path = Path(path)
    stored = json.loads(path.read_text()) if path.is_file() else {"cases": {}}
    stored.setdefault("cases", {})[case] = result
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(handle, "w") as out:
        out.write(json.dumps(stored, indent=2) + "\n")
    os.replace(temporary, path)
