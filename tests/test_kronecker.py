"""The kronecker projector against the exact per-example gradients of the vmap path."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from explorer.attribution import Explorer
from explorer.data import to_model_range
from explorer.errors import ExplorerError
from explorer.features import FeatureComputer, FeatureSpec
from explorer.index import META_NAME, AttributionIndex
from explorer.kronecker import KroneckerProjector, layer_widths
from explorer.layer_gradients import BACKWARD_MIN_CHANNELS, BACKWARD_MIN_ROWS, conv_weight_gradients, unfold
from precompute.featurize.pipeline import FEATURES_NAME, FeaturizeOptions, featurize


def _images(split, count: int) -> torch.Tensor:
    return torch.from_numpy(to_model_range(split.images[:count]))


def _exact_grads(
    model, spec: FeatureSpec, images: torch.Tensor, buckets: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Per-example gradients of f from the vmap reference path: name -> (P, *shape)."""
    exact = FeatureComputer(model, FeatureSpec(**dict(spec.to_dict(), projector="countsketch")))
    return exact.exact_gradients(images, buckets)


@pytest.mark.parametrize("output", ["square", "loss", "l2"])
def test_layer_blocks_equal_projected_exact_gradients(tiny_model, digits_splits, output):
    # 2 timesteps x 2 noise draws per bucket: each example's block sums 4 rows
    spec = FeatureSpec(
        output=output, buckets=3, timesteps_per_bucket=2, noise_draws=2, projector="kronecker", proj_dim=256
    )
    computer = FeatureComputer(tiny_model, spec)
    kron = computer.kronecker
    images, buckets = _images(digits_splits[0], 5), torch.tensor([0, 2, 1, 2, 0])
    total, records = computer.capture_rows(images, buckets)
    blocks = kron.blocks(records, kron.output_gradients(total, records), groups=5)
    exact = _exact_grads(tiny_model, spec, images, buckets)
    projected_sides = 0
    for name in computer.names:
        module, _, kind = name.rpartition(".")
        if kind == "weight" and module in kron.proj_in:
            G = exact[name].reshape(5, exact[name].shape[1], -1)  # (P, d_out, d_in)
            expected = kron.proj_out[module] @ G @ kron.proj_in[module].T  # (P, k_out, k_in)
            projected_sides += kron.proj_in[module].shape[0] < kron.proj_in[module].shape[1]
        else:
            expected = exact[name]  # biases and GroupNorm affine: exact
        got = blocks[name].reshape(expected.shape)
        error = (got - expected).norm() / expected.norm()
        assert error < 1e-4, f"{name}: relative error {error:.2e}"
    assert projected_sides > 0, "the test must exercise real projections, not only identities"
    features = computer.features(images, buckets)
    assert torch.allclose(features, kron.combine(blocks), rtol=1e-4, atol=1e-6)


def test_kronecker_features_are_determined_by_the_seed(tiny_model, digits_splits):
    spec = FeatureSpec(buckets=3, projector="kronecker", proj_dim=64, proj_seed=3)
    images = _images(digits_splits[0], 4)
    first = FeatureComputer(tiny_model, spec).all_bucket_features(images)
    again = FeatureComputer(tiny_model, spec).all_bucket_features(images)
    other = FeatureComputer(
        tiny_model, FeatureSpec(buckets=3, projector="kronecker", proj_dim=64, proj_seed=4)
    )
    assert first.shape == (4, 3, 64)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other.all_bucket_features(images))
    # a chunk boundary changes nothing: each example's feature depends only on its own rows
    chunked = FeatureComputer(tiny_model, spec, chunk_size=5).all_bucket_features(images)
    assert torch.allclose(first, chunked, rtol=1e-4, atol=1e-6)


def _gram_correlation(exact: np.ndarray, approx: np.ndarray) -> float:
    upper = np.triu_indices(len(exact))
    return float(np.corrcoef(exact[upper], approx[upper])[0, 1])


def test_kronecker_inner_products_track_exact_gradient_inner_products(tiny_model, digits_splits):
    # Statistical: E[<phi(x), phi(y)>] = <grad x, grad y>. One seed at k = 4096 tracks the exact Gram
    # matrix closely; the mean over 4 seeds (an unbiased estimate with 1/4 the variance) more closely.
    images, buckets = _images(digits_splits[0], 24), torch.full((24,), 1)
    spec = FeatureSpec(output="square", buckets=4, projector="kronecker", proj_dim=4096)
    exact = _exact_grads(tiny_model, spec, images, buckets)
    flat = torch.cat([g.reshape(24, -1) for g in exact.values()], dim=1).double()  # (24, d)
    exact_gram = (flat @ flat.T).numpy()
    grams = []
    for seed in range(4):
        phi = (
            FeatureComputer(tiny_model, FeatureSpec(**dict(spec.to_dict(), proj_seed=seed)))
            .features(images, buckets)
            .double()
        )
        grams.append((phi @ phi.T).numpy())
    single = [_gram_correlation(exact_gram, gram) for gram in grams]
    averaged = _gram_correlation(exact_gram, np.mean(grams, axis=0))
    assert min(single) > 0.85, f"kronecker inner products correlate only {single} with the exact ones"
    assert averaged > max(0.93, np.mean(single)), (
        f"averaging seeds does not converge: {averaged:.3f} vs {single}"
    )
    ratio = np.mean([np.trace(gram) for gram in grams]) / np.trace(exact_gram)
    assert 0.85 < ratio < 1.15, (
        f"squared norms are off by a factor {ratio:.3f}: the projection is not norm-preserving"
    )


def test_kronecker_index_round_trips_and_searches(tiny_model_dir, tiny_model, tiny_train_subset, tmp_path):
    spec = FeatureSpec(output="square", buckets=3, proj_dim=64, projector="kronecker")
    data = tiny_train_subset.subset(np.arange(80), "kron")
    report = featurize(
        tiny_model, data, tmp_path / "kron", spec, FeaturizeOptions(chunk_size=32, keep_features=True)
    )
    assert report.complete and report.pairs == 80 * 3
    meta = json.loads((tmp_path / "kron" / META_NAME).read_text())
    assert meta["spec"]["projector"] == "kronecker"
    index = AttributionIndex.load(tmp_path / "kron", model_hash=tiny_model.weights_hash)
    raw = np.load(tmp_path / "kron" / FEATURES_NAME)  # (B, N, k)
    assert raw.shape == (3, 80, 64) and np.isfinite(raw).all()

    # Queries go through the same kronecker path: a training image queried at its bucket's own
    # timestep has the same feature as its stored row, so (normalized) it is its own top-1.
    explorer = Explorer.from_dirs(tiny_model_dir, [tmp_path / "kron"])
    name = next(iter(explorer.indexes))
    assert explorer.computer(name).kronecker is not None
    timesteps = index.meta.timesteps
    for position in (0, 17, 55):
        for bucket in range(3):
            result = explorer.attribute_image(data.images[position], timesteps[bucket][0], top_k=5)
            assert result.bucket == bucket
            assert result.positive.positions[0] == position
            assert result.positive.scores[0] == pytest.approx(1.0, abs=1e-3)
            assert result.negative.positions[0] != position


def test_unsupported_layers_are_refused():
    with pytest.raises(ExplorerError, match="BatchNorm1d"):
        KroneckerProjector(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)), 16, 0)
    with pytest.raises(ExplorerError, match="grouped"):
        KroneckerProjector(nn.Conv2d(4, 4, 3, groups=2), 16, 0)


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(3, 4, 3, padding=1),
        nn.Conv2d(3, 4, 1),
        nn.Conv2d(3, 4, 3, stride=2, padding=1),
        nn.Conv2d(3, 4, (3, 2), stride=(1, 2), padding=(2, 1), dilation=2),
        nn.Conv2d(3, 4, 2, stride=2),
    ],
    ids=["3x3", "1x1", "stride2", "dilated-rect", "2x2-no-pad"],
)
def test_patch_slices_equal_im2col(conv):
    a = torch.randn(5, 3, 9, 8)
    ref = nn.functional.unfold(a, conv.kernel_size, conv.dilation, conv.padding, conv.stride)
    assert torch.equal(unfold(a, conv), ref)


@pytest.mark.parametrize(
    "rows_per_example, channels",
    [(1, 4), (BACKWARD_MIN_ROWS, BACKWARD_MIN_CHANNELS), (BACKWARD_MIN_ROWS, 4)],
    ids=["windows", "per-example-backward", "windows-narrow"],
)
def test_exact_conv_weight_gradients_equal_the_sum_over_unfolded_patches(rows_per_example, channels):
    conv = nn.Conv2d(channels, channels, 3, padding=1)
    groups = 3
    a = torch.randn(groups * rows_per_example, channels, 6, 5)
    g = torch.randn(groups * rows_per_example, channels, 6, 5)
    per_row = torch.einsum(
        "rol,ril->roi", g.flatten(2), nn.functional.unfold(a, 3, padding=1)
    )  # (rows, C_out, C_in 9)
    expected = per_row.reshape(groups, rows_per_example, channels, -1).sum(1)
    assert torch.allclose(conv_weight_gradients(a, g, conv, groups), expected, rtol=1e-4, atol=1e-4)


class _Reused(nn.Module):
    """A conv called twice, a GroupNorm, a layer whose output nothing uses, and a Linear head."""

    def __init__(self):
        super().__init__()
        self.conv_in, self.norm = nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(2, 4)
        self.shared, self.unused, self.head = (
            nn.Conv2d(4, 4, 3, padding=1),
            nn.Conv2d(4, 4, 1),
            nn.Linear(4 * 36, 3),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.shared(nn.functional.silu(self.norm(self.conv_in(x))))
        h = self.shared(nn.functional.silu(h))
        self.unused(h)
        return self.head(h.flatten(1))


@pytest.mark.parametrize("trainable", [False, True], ids=["frozen", "trainable"])
def test_blocks_formed_during_the_backward_equal_the_two_pass_blocks(trainable):
    torch.manual_seed(0)
    model = _Reused().requires_grad_(trainable)
    kron = KroneckerProjector(model, dim=64, seed=1)
    x = torch.randn(6, 2, 6, 6)  # 3 examples of 2 rows

    def capture():
        prediction, records = kron.capture(lambda: model(x))
        return prediction.pow(2).sum(), records

    total, records = capture()
    two_pass = kron.blocks(records, kron.output_gradients(total, records), groups=3)
    during = kron.backward_blocks(*capture(), groups=3)
    assert set(during) == set(two_pass) == set(kron.names)
    for name in kron.names:
        assert torch.allclose(during[name].flatten(1), two_pass[name].flatten(1), rtol=1e-5, atol=1e-6), name
    assert during["unused.weight"].abs().max() == 0 and during["shared.weight"].abs().max() > 0
    assert all(p.grad is None for p in model.parameters()), "the backward must not accumulate into .grad"


def test_layer_widths_keep_small_weights_and_project_the_input_side_narrowly():
    assert layer_widths(288, 1, 512) == (288, 1)  # <= dim entries: exact
    assert layer_widths(576, 64, 2048) == (16, 64)  # the output side kept: 16 x 64 <= 2048
    assert layer_widths(4608, 512, 2048) == (16, 128)  # both projected, 16 x 128 = dim
    assert layer_widths(9, 300, 2048) == (9, 228)  # a narrow input is kept, the output fills dim
