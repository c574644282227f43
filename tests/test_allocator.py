"""explorer.allocator: with its settings, repeated MB-sized allocations reuse memory instead of faulting in new pages."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Allocates and frees tensors of 1-24 MiB, as a featurization chunk does, and prints the page faults of the
# rounds after the first (when every size has been seen once). Runs in a fresh process: the settings are process-wide.
ROUNDS = """
import resource, sys, torch
from explorer.allocator import keep_freed_memory
applied = keep_freed_memory()
def one_round():
    kept = [torch.ones(size << 16) for size in (4, 96, 8, 64, 16, 32, 24, 48)]  # floats: 1-24 MiB
    del kept
one_round()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    one_round()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(tuning: bool) -> tuple[bool, int]:
    env = {**os.environ, "EXPLORER_MALLOC_TUNING": "1" if tuning else "0", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", ROUNDS], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    applied, faults = result.stdout.split()
    return applied == "True", int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_settings_stop_page_faults_on_reused_sizes():
    applied, tuned = page_faults(tuning=True)
    opted_out, default = page_faults(tuning=False)
    assert applied and not opted_out
    # glibc's defaults return the freed blocks, so each round faults its 73 MiB in again (~19k pages a round)
    assert default > 10_000, default
    assert tuned < default / 5, (tuned, default)  # measured: ~3k against ~34k
