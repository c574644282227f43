"""kill -9 during featurize at seeded points, then resume: the index is bitwise identical to a clean run."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from explorer.index import META_NAME
from precompute.featurize.pipeline import PARTIAL_DIR

KILL_SEED = 20  # fixed, so every run kills at the same points (after 3, 9 and 11 of the 12 chunks)
ARGS = "--data digits --limit 120 --buckets 3 --proj-dim 32 --chunk-size 10 --das-weights".split()
FEATURIZE = [sys.executable, "-m", "precompute", "featurize"]


def _featurize(model_dir, out):
    command = [*FEATURIZE, "--model", str(model_dir), "--out", str(out), *ARGS]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _chunks_done(out) -> int:
    """Finished chunks: one file each (precompute.featurize.chunks)."""
    return len(list((out / PARTIAL_DIR / "chunks").glob("chunk_*.npy")))


def _files(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.mark.slow
def test_kill_9_at_random_points_then_resume_is_bitwise_identical(tiny_model_dir, tmp_path):
    clean = _featurize(tiny_model_dir, tmp_path / "clean")
    assert clean.wait(timeout=600) == 0, clean.stderr.read()

    rng = np.random.default_rng(KILL_SEED)  # each threshold: chunks done before that run is killed
    thresholds = sorted(rng.choice(np.arange(1, 12), size=3, replace=False).tolist())
    out = tmp_path / "killed"
    kills = []
    for threshold in thresholds:
        process = _featurize(tiny_model_dir, out)
        deadline = time.time() + 300
        while _chunks_done(out) < threshold and process.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            kills.append(_chunks_done(out))
        process.wait(timeout=60)
    assert kills, f"no run was killed (thresholds {thresholds}): the machine is too fast for these thresholds"
    assert not (out / META_NAME).exists()
    resumed = _featurize(tiny_model_dir, out)
    stdout, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr
    assert not (out / PARTIAL_DIR).exists()
    clean_files, resumed_files = _files(tmp_path / "clean"), _files(out)
    assert clean_files.keys() == resumed_files.keys()
    for name in clean_files:
        assert clean_files[name] == resumed_files[name], f"{name} differs after kills at chunks {kills}"


def test_read_only_and_full_disks_are_reported_clearly(tiny_model_dir, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small or read-only tmpfs needs root")
    full, read_only = tmp_path / "full", tmp_path / "ro"
    full.mkdir()
    read_only.mkdir()
    mounted = []
    try:
        for target, options in ((full, "size=64k"), (read_only, "ro,size=64k")):
            mount = ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)]
            if subprocess.run(mount, capture_output=True).returncode != 0:
                pytest.skip("this machine does not allow tmpfs mounts")
            mounted.append(target)
        for target, message in ((full, "no space left"), (read_only, "choose a writable --out directory")):
            command = [*FEATURIZE, "--model", str(tiny_model_dir), "--out", str(target / "index"), *ARGS]
            done = subprocess.run(command, capture_output=True, text=True, timeout=300)
            assert done.returncode == 2, done.stderr
            assert message in done.stderr and "Traceback" not in done.stderr
    finally:
        for target in mounted:
            subprocess.run(["umount", str(target)], check=False)
