"""Calibrated projections: exact coordinates for heavy small tensors, exact blocks for heavy layers."""

import dataclasses
import json

import pytest
import torch
from cli import run_featurize
from torch import nn

from explorer.attribution import Explorer
from explorer.data import to_model_range
from explorer.errors import ExplorerError
from explorer.features import FeatureComputer, FeatureSpec
from explorer.index import META_NAME
from explorer.projector import CountSketchProjector, PartlyExactProjector
from precompute.featurize.calibration import (
    EXACT_LAYER_SHARE,
    calibrate,
    calibration_rows,
    choose_kept,
    gradient_shares,
)

SPEC = FeatureSpec(output="square", buckets=3, timesteps_per_bucket=2, proj_dim=256)


def _images(split, count: int) -> torch.Tensor:
    return torch.from_numpy(to_model_range(split.images[:count]))


@pytest.fixture(scope="module")
def calibration(tiny_model, digits_splits):
    return calibrate(
        tiny_model, dataclasses.replace(SPEC, projector="kronecker"), _images(digits_splits[0], 8)
    )


def test_choose_kept_takes_the_heavy_small_tensor_and_stops_when_keeping_costs_more():
    sizes = {"head": 10, "body": 5000, "tiny": 2, "flat": 100}
    shares = {"head": 0.5, "body": 0.45, "tiny": 0.001, "flat": 0.049}
    # head: (1 - 0.5)^2 / 90 beats none kept (1 / 100); flat would leave no room; tiny helps less than its 2
    # slots cost
    assert choose_kept(shares, sizes, dim=100) == ["head"]
    # equal norm per value: keeping anything only takes coordinates from the projection
    assert choose_kept({"a": 0.5, "b": 0.5}, {"a": 500, "b": 500}, dim=100) == []


def test_calibration_rows_spread_over_the_data_set():
    assert calibration_rows(5, 9).tolist() == [0, 2, 4, 6, 8]
    assert calibration_rows(50, 3).tolist() == [0, 1, 2]
    with pytest.raises(ExplorerError, match="--calibrate 0"):
        calibration_rows(0, 10)


def test_partly_exact_projector_puts_kept_tensors_first_and_sketches_the_rest():
    grads = [torch.randn(4, 3), torch.randn(4, 2, 5), torch.randn(4, 7)]
    inner = CountSketchProjector(3 + 7, 16, seed=1)
    phi = PartlyExactProjector([False, True, False], inner).project(grads)
    assert phi.shape == (4, 10 + 16)
    assert torch.equal(phi[:, :10], grads[1].reshape(4, 10))
    assert torch.allclose(phi[:, 10:], inner.project([grads[0], grads[2]]))


def test_shares_sum_to_one_and_match_the_exact_gradient_norms(tiny_model, digits_splits):
    computer = FeatureComputer(tiny_model, SPEC)
    images = _images(digits_splits[0], 3)
    shares = gradient_shares(computer, images)
    assert sum(shares.values()) == pytest.approx(1.0, abs=1e-9)
    grads = computer.exact_gradients(images[:1], torch.tensor([2]))
    norms = {name: float(grads[name].pow(2).sum()) for name in computer.names}
    heaviest = max(norms, key=norms.get)
    assert shares[heaviest] > 1.0 / len(shares)  # the heaviest tensor of one pair is heavy on average too


def test_calibration_keeps_heavy_tensors_and_layers_within_the_dimension(calibration, tiny_model):
    spec = calibration.spec
    sizes = {name: p.numel() for name, p in tiny_model.unet.named_parameters()}
    assert (
        spec.exact_params
        and calibration.kept_width == sum(sizes[name] for name in spec.exact_params) < spec.proj_dim
    )
    assert calibration.kept_share == pytest.approx(
        sum(calibration.shares[name] for name in spec.exact_params)
    )
    assert calibration.predicted_variance_ratio < 1.0
    modules = dict(tiny_model.unet.named_modules())
    for layer in spec.exact_layers:
        assert isinstance(modules[layer], (nn.Conv2d, nn.Linear))
        assert calibration.shares[f"{layer}.weight"] >= EXACT_LAYER_SHARE
    assert "tensors kept exactly" in calibration.summary()


@pytest.mark.parametrize("projector", ["countsketch", "kronecker"])
def test_kept_coordinates_are_the_exact_gradients(calibration, tiny_model, digits_splits, projector):
    spec = dataclasses.replace(
        calibration.spec,
        projector=projector,
        exact_layers=calibration.spec.exact_layers if projector == "kronecker" else (),
    )
    images, buckets = _images(digits_splits[0], 5), torch.tensor([0, 2, 1, 2, 0])
    phi = FeatureComputer(tiny_model, spec).features(images, buckets)
    exact = FeatureComputer(tiny_model, SPEC).exact_gradients(images, buckets)
    kept = torch.cat([exact[name].flatten(1) for name in spec.exact_params], dim=1)
    assert phi.shape == (5, spec.proj_dim)
    torch.testing.assert_close(phi[:, : kept.shape[1]], kept, rtol=1e-4, atol=1e-6)


def test_exact_layer_blocks_are_the_exact_per_example_gradients(calibration, tiny_model, digits_splits):
    computer = FeatureComputer(tiny_model, calibration.spec)
    kron = computer.kronecker
    images, buckets = _images(digits_splits[0], 4), torch.tensor([1, 0, 2, 1])
    total, records = computer.capture_rows(images, buckets)
    blocks = kron.blocks(records, kron.output_gradients(total, records), groups=4)
    exact = FeatureComputer(tiny_model, SPEC).exact_gradients(images, buckets)
    assert calibration.spec.exact_layers
    for layer in calibration.spec.exact_layers:
        torch.testing.assert_close(
            blocks[f"{layer}.weight"].flatten(1), exact[f"{layer}.weight"].flatten(1), rtol=1e-4, atol=1e-6
        )


def test_calibrated_inner_products_stay_unbiased(calibration, tiny_model, digits_splits):
    """Over projection seeds the mean of <phi(x), phi(y)> approaches the exact gradient inner product."""
    images, buckets = _images(digits_splits[0], 6), torch.zeros(6, dtype=torch.long)
    exact = FeatureComputer(tiny_model, SPEC).exact_gradients(images, buckets)
    flat = torch.cat([exact[name].flatten(1) for name in exact], dim=1).double()
    reference = flat @ flat.T
    estimates = torch.stack(
        [
            (lambda phi: phi @ phi.T)(
                FeatureComputer(tiny_model, dataclasses.replace(calibration.spec, proj_seed=seed))
                .features(images, buckets)
                .double()
            )
            for seed in range(12)
        ]
    )
    error = (estimates.mean(0) - reference).abs().max() / reference.abs().max()
    assert error < 0.05


def test_wrong_calibration_is_refused_with_the_fix(tiny_model, calibration):
    with pytest.raises(ExplorerError, match="calibrate again"):
        FeatureComputer(tiny_model, dataclasses.replace(SPEC, exact_params=("no_such.weight",)))
    with pytest.raises(ExplorerError, match="calibrate again"):
        FeatureComputer(
            tiny_model, dataclasses.replace(SPEC, projector="kronecker", exact_layers=("conv_norm_out",))
        )
    with pytest.raises(ExplorerError, match="kronecker projector only"):
        FeatureComputer(
            tiny_model, dataclasses.replace(SPEC, exact_layers=calibration.spec.exact_layers or ("conv_in",))
        )
    with pytest.raises(ExplorerError, match="raise spec.proj_dim"):
        FeatureComputer(tiny_model, dataclasses.replace(SPEC, proj_dim=8, exact_params=("conv_out.weight",)))


def test_precompute_featurize_calibrate_builds_a_searchable_index(tiny_model_dir, tmp_path):
    out = tmp_path / "calibrated"
    result = run_featurize(
        tiny_model_dir,
        out,
        *"--limit 60 --buckets 2 --proj-dim 512 --output square --projector kronecker --calibrate 6".split(),
    )
    assert result.returncode == 0, result.stderr
    assert "tensors kept exactly" in result.stdout
    spec = json.loads((out / META_NAME).read_text())["spec"]
    assert spec["exact_params"] and isinstance(spec["exact_layers"], list)
    explorer = Explorer.from_dirs(tiny_model_dir, [out])
    name = next(iter(explorer.indexes))
    assert explorer.computer(name).spec.exact_params == tuple(spec["exact_params"])
    assert name.endswith("(square, centered, normalized, kronecker, calibrated)")
    images = explorer.indexes[name].train_images
    result = explorer.attribute_image(images[7], explorer.indexes[name].meta.timesteps[1][0], top_k=3)
    assert result.positive.positions[0] == 7  # a training image at its own bucket's timestep is its own top-1
