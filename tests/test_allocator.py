"""precompute.featurize.allocator: glibc then serves MB-sized blocks from its heap and keeps them after they
are freed."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# In a fresh process (the settings are process-wide): allocate 64 tensors of 1 MiB, as a featurization chunk's
# activations, then free them, and print glibc's own accounting (mallinfo2) after each step.
PROBE = """
import ctypes, sys, torch
from precompute.featurize.allocator import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                "fordblks", "keepcost")]

mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = MallInfo2
applied = keep_freed_memory()
before = mallinfo2()
kept = [torch.ones(1 << 18) for _ in range(64)]  # 64 x 1 MiB
held = mallinfo2()
del kept
freed = mallinfo2()
mib = 1 << 20
print(applied, (held.hblkhd - before.hblkhd) // mib, freed.arena // mib)
"""


def probe(tuning: bool) -> tuple[bool, int, int]:
    """(settings applied, MiB of the 64 tensors that were mmapped, MiB of heap left after freeing them)."""
    env = {**os.environ, "EXPLORER_MALLOC_TUNING": "1" if tuning else "0", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    applied, mmapped, heap = result.stdout.split()
    return applied == "True", int(mmapped), int(heap)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt and mallinfo2 are glibc's")
def test_settings_serve_megabytes_from_the_heap_and_keep_them():
    applied, mmapped, heap = probe(tuning=True)
    opted_out, default_mmapped, default_heap = probe(tuning=False)
    assert applied and not opted_out
    # glibc's defaults mmap each new 1 MiB block (its threshold starts at 128 KiB) and unmap it when freed, so
    # the
    # next chunk faults fresh pages in; tuned, the blocks come from the heap, which keeps them
    assert default_mmapped >= 60, default_mmapped
    assert mmapped == 0, mmapped
    assert heap - default_heap >= 60, (
        heap,
        default_heap,
    )  # the 64 MiB stayed in the heap (measured: 148 against 83)
