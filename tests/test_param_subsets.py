"""Featurizing a subset of the parameters (FeatureSpec.params, precompute featurize --params)."""

import dataclasses
import json

import pytest
import torch
from cli import run_featurize

from explorer.attribution import Explorer
from explorer.data import to_model_range
from explorer.errors import ExplorerError
from explorer.features import FeatureComputer, FeatureSpec, select_params
from explorer.index import META_NAME
from explorer.projector import CountSketchProjector

SPEC = FeatureSpec(output="square", buckets=3, timesteps_per_bucket=2, proj_dim=128)
LAST_LEVEL = (
    "up_blocks.1",
    "conv_norm_out",
    "conv_out",
)  # the tiny model's last decoder level and output layers


def _images(split, count: int) -> torch.Tensor:
    return torch.from_numpy(to_model_range(split.images[:count]))


def test_prefixes_select_whole_names_only():
    names = ["up_blocks.2.conv.weight", "up_blocks.20.conv.weight", "conv_out.weight", "conv_out.bias"]
    assert select_params(names, ("up_blocks.2", "conv_out.bias")) == [
        "up_blocks.2.conv.weight",
        "conv_out.bias",
    ]
    assert select_params(names, ()) == names
    with pytest.raises(ExplorerError, match="spec.params up_block matches no parameter"):
        select_params(names, ("up_block",))


def test_subset_features_project_the_subset_of_the_exact_gradients(tiny_model, digits_splits):
    images, buckets = _images(digits_splits[0], 5), torch.tensor([0, 2, 1, 2, 0])
    subset = FeatureComputer(tiny_model, dataclasses.replace(SPEC, params=LAST_LEVEL))
    full = FeatureComputer(tiny_model, SPEC)
    assert subset.names and set(subset.names) < set(full.names)
    assert all(name.startswith(LAST_LEVEL) for name in subset.names)
    exact = full.exact_gradients(images, buckets)
    expected = CountSketchProjector(subset.num_params, SPEC.proj_dim, SPEC.proj_seed).project(
        [exact[n] for n in subset.names]
    )
    torch.testing.assert_close(subset.features(images, buckets), expected, rtol=1e-4, atol=1e-6)


def test_kronecker_subset_hooks_only_its_layers_and_stays_exact(tiny_model, digits_splits):
    spec = dataclasses.replace(SPEC, projector="kronecker", params=("conv_out",), proj_dim=256)
    computer = FeatureComputer(tiny_model, spec)
    images, buckets = _images(digits_splits[0], 4), torch.tensor([1, 0, 2, 1])
    total, records = computer.capture_rows(images, buckets)
    assert {record.name for record in records} == {"conv_out"}
    blocks = computer.kronecker.blocks(records, computer.kronecker.output_gradients(total, records), groups=4)
    exact = FeatureComputer(tiny_model, SPEC).exact_gradients(images, buckets)
    for name in ("conv_out.weight", "conv_out.bias"):  # conv_out has fewer than k values: its block is exact
        torch.testing.assert_close(blocks[name].flatten(1), exact[name].flatten(1), rtol=1e-4, atol=1e-6)


def test_precompute_featurize_params_builds_a_searchable_index(tiny_model_dir, tmp_path):
    out = tmp_path / "subset"
    result = run_featurize(
        tiny_model_dir,
        out,
        *"--limit 60 --buckets 2 --proj-dim 64 --projector kronecker --params".split(),
        *LAST_LEVEL,
    )
    assert result.returncode == 0, result.stderr
    meta = json.loads((out / META_NAME).read_text())
    assert meta["spec"]["params"] == list(LAST_LEVEL)
    explorer = Explorer.from_dirs(tiny_model_dir, [out])
    name = next(iter(explorer.indexes))
    assert explorer.computer(name).spec.params == LAST_LEVEL
    assert name.endswith("(mean, centered, normalized, kronecker, params up_blocks.1 conv_norm_out conv_out)")
    index = explorer.indexes[name]
    result = explorer.attribute_image(index.train_images[11], index.meta.timesteps[0][0], top_k=3)
    assert result.positive.positions[0] == 11


def test_unknown_params_are_refused_by_the_cli(tiny_model_dir, tmp_path):
    result = run_featurize(tiny_model_dir, tmp_path / "x", "--limit", "10", "--params", "decoder")
    assert result.returncode != 0
    assert (
        "spec.params decoder matches no parameter" in result.stderr and "(flags: --params)" in result.stderr
    )
    assert not (tmp_path / "x" / META_NAME).exists()
