"""glibc malloc settings for featurization: reuse freed memory instead of handing it back to the OS.

By default glibc serves large blocks with mmap and returns memory above the heap's top to the OS,
so each chunk's activations, output gradients and blocks (MBs each) land on fresh pages that the
kernel zeroes on first touch: ~18,000 page faults per chunk of traker's bench spec (80 rows, one
thread). With the settings below `precompute featurize` runs 1.19x faster on the default count-sketch
path; on the kronecker path the change is within noise (0.94-1.01x, ~8% more peak memory;
docs/benchmarks/allocator.md,
"Memory allocator", bench/allocator_ab.py). The settings are process-wide, so anything else in the
process (traker in the bench, training) gets them too; freed memory stays with the process, up to
its peak use.
"""

from __future__ import annotations

import ctypes
import logging
import os

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # glibc's mallopt options (malloc.h)
SETTINGS = (
    (M_MMAP_THRESHOLD, 32 << 20),  # glibc's maximum: blocks under 32 MiB come from the heap, not mmap
    (
        M_TRIM_THRESHOLD,
        2**31 - 1,
    ),  # never shrink the heap (fixing either threshold also stops glibc adjusting them)
    (M_TOP_PAD, 64 << 20),  # grow it in 64 MiB steps
)
OPT_OUT = "EXPLORER_MALLOC_TUNING"  # set to 0 to keep glibc's defaults
_applied = False


def keep_freed_memory() -> bool:
    """Apply SETTINGS once per process; whether they are in force (False off glibc or with
    EXPLORER_MALLOC_TUNING=0)."""
    global _applied
    if _applied:
        return True
    if os.environ.get(OPT_OUT, "1") == "0":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the process runs on
    except (OSError, AttributeError):  # no mallopt (macOS, Windows): their allocators keep their own policies
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    _applied = all(mallopt(option, value) == 1 for option, value in SETTINGS)
    if not _applied:  # musl and others accept the call but not these options
        logger.debug("mallopt refused the featurization settings: keeping the C library's defaults")
    return _applied
