"""--device: auto picks what torch sees, a missing accelerator is named with the fix, and on a CUDA GPU (tests
marked gpu, skipped elsewhere) features and generation match the CPU's."""

import subprocess
import sys

import pytest
import torch

from explorer.device import resolve_device
from explorer.errors import ExplorerError

NO_CUDA = not torch.cuda.is_available()


def test_auto_takes_what_torch_sees():
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ExplorerError, match="--device 'tpu' is unknown: use one of auto, cpu, cuda, mps"):
        resolve_device("tpu")


@pytest.mark.skipif(not NO_CUDA, reason="this machine has a CUDA GPU")
def test_a_missing_gpu_is_named_before_anything_loads(tmp_path):
    with pytest.raises(ExplorerError, match="--device cuda: torch .* sees no CUDA GPU"):
        resolve_device("cuda")
    command = [sys.executable, "-m", "precompute", "featurize", "--model", "assets/model", "--data", "digits"]
    done = subprocess.run(
        [*command, "--out", str(tmp_path / "index"), "--device", "cuda"], capture_output=True, text=True
    )
    assert done.returncode == 2 and "sees no CUDA GPU" in done.stderr and not (tmp_path / "index").exists()
    done = subprocess.run([sys.executable, "app.py", "--device", "cuda"], capture_output=True, text=True)
    assert done.returncode == 2 and "use --device cpu" in done.stderr


@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA, reason="no CUDA GPU: run with -m gpu on a machine that has one")
def test_cuda_features_and_generation_match_the_cpu(tiny_model_dir, digits_splits):
    from explorer.data import to_model_range
    from explorer.features import FeatureComputer, FeatureSpec
    from explorer.model import load_model
    from explorer.sampler import generate

    spec = FeatureSpec(buckets=3, proj_dim=64)
    images = torch.from_numpy(to_model_range(digits_splits[0].images[:8]))
    on_cpu, on_gpu = load_model(tiny_model_dir), load_model(tiny_model_dir, "cuda")
    expected = FeatureComputer(on_cpu, spec).all_bucket_features(images)
    got = FeatureComputer(on_gpu, spec).all_bucket_features(images)
    assert got.device.type == "cpu"
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-4)
    kronecker = FeatureSpec(buckets=3, proj_dim=64, projector="kronecker")
    expected = FeatureComputer(on_cpu, kronecker).all_bucket_features(images)
    torch.testing.assert_close(
        FeatureComputer(on_gpu, kronecker).all_bucket_features(images), expected, rtol=1e-3, atol=1e-4
    )
    bf16 = FeatureSpec(buckets=3, proj_dim=64, projector="kronecker", precision="bf16")
    rounded = FeatureComputer(on_gpu, bf16).all_bucket_features(images)  # autocast on the GPU
    assert torch.nn.functional.cosine_similarity(rounded.flatten(1), expected.flatten(1)).min() > 0.9
    cpu_run, gpu_run = generate(on_cpu, seed=3, steps=20), generate(on_gpu, seed=3, steps=20)
    torch.testing.assert_close(gpu_run.final, cpu_run.final, rtol=1e-2, atol=1e-2)
