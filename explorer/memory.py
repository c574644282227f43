"""Give freed heap memory back to the system after a heavy engine call.

A generation's batched query gradients need a large transient working set; glibc keeps what they freed in its
arenas, so without this a served process stays near its largest call's peak for good (bench/load.py measures
the server's memory per session, docs/benchmarks/load.md). malloc_trim(0) returns it. Elsewhere than glibc
this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

_libc = None
_name = ctypes.util.find_library("c")
if _name:
    try:
        _libc = ctypes.CDLL(_name)
        _libc.malloc_trim  # noqa: B018  (glibc only)
    except (OSError, AttributeError):
        _libc = None


def release_freed_memory() -> None:
    if _libc is not None:
        _libc.malloc_trim(0)


def releases_memory(handler):
    """Run the handler, then release what its engine call freed (also when it is refused)."""

    @functools.wraps(handler)
    def wrapper(*args, **kwargs):
        try:
            return handler(*args, **kwargs)
        finally:
            release_freed_memory()

    return wrapper
