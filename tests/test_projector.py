import numpy as np
import pytest
import torch

from explorer.errors import ExplorerError
from explorer.projector import CountSketchProjector, GaussianProjector, make_projector


@pytest.mark.parametrize("kind", ["countsketch", "gaussian"])
def test_projector_is_determined_by_its_seed(kind):
    grads = [torch.randn(3, 50, 7), torch.randn(3, 11)]
    first = make_projector(kind, 361, 32, seed=5).project(grads)
    again = make_projector(kind, 361, 32, seed=5).project(grads)
    other = make_projector(kind, 361, 32, seed=6).project(grads)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


@pytest.mark.parametrize("kind", ["countsketch", "gaussian"])
def test_projection_preserves_inner_products(kind):
    torch.manual_seed(0)
    d, k = 20_000, 1024
    x = torch.randn(40, 8) @ torch.randn(8, d)  # low rank, like gradients: inner products vary widely
    projected = make_projector(kind, d, k, seed=1).project([x])
    exact = (x @ x.T).flatten().numpy()
    approx = (projected @ projected.T).flatten().numpy()
    assert np.corrcoef(exact, approx)[0, 1] > 0.99


def test_countsketch_matches_its_definition():
    projector = CountSketchProjector(10, 4, seed=3)
    g = torch.arange(10, dtype=torch.float32).view(1, 10)
    expected = torch.zeros(1, 4)
    for j in range(10):
        expected[0, projector.buckets[j]] += projector.signs[j] * g[0, j]
    assert torch.allclose(projector.project([g]), expected)


def test_gaussian_block_generation_equals_cached(monkeypatch):
    import explorer.projector as projector_module

    grads = [torch.randn(2, 300)]
    cached = GaussianProjector(300, 16, seed=2).project(grads)
    monkeypatch.setattr(projector_module, "GAUSSIAN_CACHE_BYTES", 0)
    streamed = GaussianProjector(300, 16, seed=2)
    assert streamed._cache is None
    assert torch.allclose(cached, streamed.project(grads))


def test_bad_projector_arguments():
    with pytest.raises(ExplorerError, match="dense"):
        make_projector("dense", 10, 4, 0)
    with pytest.raises(ExplorerError, match="spec.proj_dim 0 must be >= 1"):
        make_projector("countsketch", 10, 0, 0)
