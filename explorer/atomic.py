"""Atomic file writes: write to a temporary file in the same folder, fsync, then rename.

A reader never sees a half-written file, and a crash leaves either the old file or the new one.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from explorer.errors import ExplorerError


def write_atomic(path: str | Path, write: Callable[[str], None]) -> None:
    """Call write(tmp_path) and move the result onto `path` in one rename."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(handle)
    except OSError as error:
        raise explain_os_error(error, path) from error
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except OSError as error:
        raise explain_os_error(error, path) from error
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    write_atomic(path, lambda tmp: Path(tmp).write_bytes(data))


def save_npy_atomic(path: str | Path, array) -> None:
    """np.save without pickles, atomically."""
    import numpy as np

    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            np.save(handle, array, allow_pickle=False)

    write_atomic(path, write)


def write_json_atomic(path: str | Path, value: object) -> None:
    write_bytes_atomic(path, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())


def explain_os_error(error: OSError, path: Path) -> ExplorerError:
    if error.errno == errno.ENOSPC:
        return ExplorerError(
            f"no space left on the device while writing {str(path)!r}: free disk space, then run the "
            "same command again to resume"
        )
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return ExplorerError(
            f"cannot write {str(path)!r} ({error.strerror}): choose a writable --out directory"
        )
    return ExplorerError(f"writing {str(path)!r} failed: {error}")
