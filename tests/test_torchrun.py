"""`torchrun --nproc-per-node 2 -m precompute featurize` (gloo, CPU): the same index as one process, a killed
rank resumed to the identical index, and an IVF index filled from the shards that keeps its recall."""

import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from explorer.index import META_NAME, AttributionIndex
from precompute.featurize.pipeline import PARTIAL_DIR

ARGS = "--data digits --limit 160 --buckets 2 --proj-dim 32 --chunk-size 10".split()
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]

pytestmark = pytest.mark.slow


def _command(model_dir, out, *extra, ranks: bool = True) -> list[str]:
    launcher = [*TORCHRUN, "-m"] if ranks else [sys.executable, "-m"]
    return [*launcher, "precompute", "featurize", "--model", str(model_dir), "--out", str(out), *ARGS, *extra]


def _run(command) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def _files(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def _chunks_done(out) -> int:
    return len(list((out / PARTIAL_DIR / "chunks").glob("chunk_*.npy")))


def _workers(launcher_pid: int) -> list[int]:
    """The rank processes torchrun started (its children running precompute)."""
    found = subprocess.run(["pgrep", "-P", str(launcher_pid)], capture_output=True, text=True).stdout
    return [int(pid) for pid in found.split()]


def test_two_ranks_build_the_single_process_index(tiny_model_dir, tmp_path):
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    _run(_command(tiny_model_dir, single, ranks=False))
    done = _run(_command(tiny_model_dir, sharded))
    assert "rank 0 of 2" in done.stdout and "rank 1 of 2" in done.stdout
    one, two = AttributionIndex.load(single), AttributionIndex.load(sharded)
    assert one.meta.lambdas == two.meta.lambdas or all(
        abs(a.value - b.value) <= 1e-9 * abs(a.value) for a, b in zip(one.meta.lambdas, two.meta.lambdas)
    )
    rng = np.random.default_rng(0)
    for bucket in range(one.buckets):
        np.testing.assert_allclose(one.vectors(bucket), two.vectors(bucket), atol=1e-5)
        queries = rng.standard_normal((8, 32)).astype(np.float32)
        for query in queries:
            first = one.search(one.query_vectors(query[None], np.array([bucket]))[0], bucket, 10)
            second = two.search(two.query_vectors(query[None], np.array([bucket]))[0], bucket, 10)
            for a, b in zip(first, second):
                assert a.ids.tolist() == b.ids.tolist()
                np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)


def test_a_killed_rank_resumes_to_the_identical_index(tiny_model_dir, tmp_path):
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    _run(_command(tiny_model_dir, clean, "--das-weights"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen(
        _command(tiny_model_dir, killed, "--das-weights"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    deadline = time.time() + 300
    while _chunks_done(killed) < 4 and launcher.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    workers = _workers(launcher.pid)
    assert launcher.poll() is None and workers, "the run finished before a rank could be killed"
    os.kill(workers[-1], signal.SIGKILL)
    assert launcher.wait(timeout=120) != 0, "torchrun reports the killed rank"
    partial = _chunks_done(killed)
    assert 0 < partial < 16 and not (killed / META_NAME).exists()
    _run(_command(tiny_model_dir, killed, "--das-weights"))
    assert not (killed / PARTIAL_DIR).exists()
    assert _files(clean) == _files(killed), f"the index differs after a rank was killed at {partial} chunks"


@pytest.mark.parametrize("on_disk", [False, True], ids=["lists-in-memory", "lists-on-disk"])
def test_ivf_index_from_the_shards_keeps_recall(tiny_model_dir, tmp_path, on_disk):
    built = tmp_path / "ivf"
    _run(
        _command(
            tiny_model_dir, built, "--index-type", "ivf", "--ivf-nlist", "4", *(["--ivf-on-disk"] * on_disk)
        )
    )
    out = tmp_path / "moved"
    built.rename(out)  # on-disk lists are found next to their bucket file, wherever the index is
    index = AttributionIndex.load(out)
    assert index.index_type == "ivf" and index.meta.ivf.on_disk == on_disk
    assert sorted(p.name for p in out.glob("*.ivfdata")) == (
        ["bucket_00.ivfdata", "bucket_01.ivfdata"] if on_disk else []
    )
    rng = np.random.default_rng(1)
    hits = []
    for bucket in range(index.buckets):
        vectors = index.vectors(bucket)
        for row in rng.choice(len(vectors), 20, replace=False):
            query = vectors[row] + 0.5 * rng.standard_normal(vectors.shape[1]).astype(np.float32) / 6
            exact = np.argsort(-(vectors @ query))[:10]
            positive, _ = index.search(query, bucket, 10)
            hits.append(len(set(exact.tolist()) & set(positive.positions.tolist())) / 10)
    assert np.mean(hits) >= 0.95, f"recall@10 {np.mean(hits):.3f} through the IVF built from shards"
    shutil.rmtree(out)
