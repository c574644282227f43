"""FeatureSpec.precision: the kronecker path under bfloat16 autocast, recorded in the index and used for
queries."""

import dataclasses
import json
import shutil

import pytest
import torch
from cli import run_featurize

from explorer.attribution import Explorer
from explorer.data import to_model_range
from explorer.errors import ExplorerError
from explorer.features import FeatureComputer, FeatureSpec
from explorer.index import META_NAME, AttributionIndex
from precompute.featurize.pipeline import FEATURES_NAME
from precompute.featurize.workers import Featurizer

SPEC = FeatureSpec(output="square", buckets=3, timesteps_per_bucket=2, projector="kronecker", proj_dim=256)


def _relative_differences(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).norm(dim=1) / b.norm(dim=1)


def test_bf16_features_stay_close_to_fp32_as_whole_vectors(tiny_model, digits_splits):
    images = torch.from_numpy(to_model_range(digits_splits[0].images[:6]))
    buckets = torch.tensor([0, 1, 2, 0, 1, 2])
    fp32 = FeatureComputer(tiny_model, SPEC).features(images, buckets)
    bf16 = FeatureComputer(tiny_model, dataclasses.replace(SPEC, precision="bf16")).features(images, buckets)
    assert bf16.dtype == torch.float32 and bf16.shape == fp32.shape
    moved = _relative_differences(bf16, fp32)
    assert moved.min() > 1e-5, "bf16 changed nothing: the autocast did not apply"
    assert moved.max() < 0.03, f"bf16 moves features by up to {moved.max():.3f} of their norm"
    # as whole vectors the bf16 error is far below the projection's (another seed moves them much more);
    # what it does to the example-specific part at high timesteps is the last test's subject
    reseeded = FeatureComputer(tiny_model, dataclasses.replace(SPEC, proj_seed=1)).features(images, buckets)
    assert moved.max() < 0.2 * _relative_differences(reseeded, fp32).min()


def test_precision_is_checked(tiny_model):
    with pytest.raises(ExplorerError, match="precision 'fp8'"):
        FeatureComputer(tiny_model, dataclasses.replace(SPEC, precision="fp8"))
    with pytest.raises(ExplorerError, match="spec.precision bf16 applies to the kronecker projector only"):
        FeatureComputer(tiny_model, dataclasses.replace(SPEC, projector="countsketch", precision="bf16"))


def test_precompute_featurize_bf16_index_records_and_queries_in_bf16(tiny_model_dir, tmp_path):
    out = tmp_path / "bf16"
    result = run_featurize(
        tiny_model_dir,
        out,
        *"--limit 40 --buckets 2 --proj-dim 128".split(),
        *"--output square --projector kronecker --precision bf16".split(),
    )
    assert result.returncode == 0, result.stderr
    assert json.loads((out / META_NAME).read_text())["spec"]["precision"] == "bf16"
    explorer = Explorer.from_dirs(tiny_model_dir, [out])
    name = next(iter(explorer.indexes))
    assert name.endswith("(square, centered, normalized, kronecker, bf16)")
    assert explorer.computer(name).spec.precision == "bf16"
    index = explorer.indexes[name]
    result = explorer.attribute_image(index.train_images[11], index.meta.timesteps[0][0], top_k=3)
    assert result.positive.positions[0] == 11  # its own stored vector, featurized the same way, is its top-1
    assert result.positive.scores[0] == pytest.approx(1.0, abs=1e-3)


def test_an_index_without_precision_or_with_a_bad_one_is_refused_naming_it(tiny_index_dir, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(tiny_index_dir, old, ignore=shutil.ignore_patterns(FEATURES_NAME))
    meta = json.loads((old / META_NAME).read_text())
    assert AttributionIndex.load(old).meta.spec.precision == "fp32"
    meta["spec"].pop("precision")
    (old / META_NAME).write_text(json.dumps(meta))
    with pytest.raises(
        ExplorerError, match=r"spec is .*must hold exactly the FeatureSpec fields \(differs in precision\)"
    ):
        AttributionIndex.load(old)
    meta["spec"]["precision"] = "fp8"
    (old / META_NAME).write_text(json.dumps(meta))
    with pytest.raises(ExplorerError, match="spec.precision is 'fp8', must be one of fp32, bf16"):
        AttributionIndex.load(old)


def test_bf16_warns_of_high_timesteps_and_of_emulation(tiny_model, monkeypatch, caplog):
    import explorer.features as features

    assert isinstance(features.native_bf16(), bool)
    monkeypatch.setattr(
        features, "native_bf16", lambda: False
    )  # this CPU may have it: the warning branch alone
    with caplog.at_level("WARNING", logger="explorer.features"):
        Featurizer(tiny_model, dataclasses.replace(SPEC, precision="bf16"), workers=3)
    assert "emulated" in caplog.text and "high timesteps" in caplog.text
    assert caplog.text.count("high timesteps") == 1, "the workers' replicas do not repeat the warnings"
    caplog.clear()
    with caplog.at_level("WARNING", logger="explorer.features"):
        FeatureComputer(tiny_model, SPEC)
    assert "emulated" not in caplog.text and "high timesteps" not in caplog.text


def test_bf16_error_grows_against_the_example_specific_part_at_high_timesteps(tiny_model, digits_splits):
    # why bf16 is for low timesteps only: its rounding scales with the whole gradient, while the part that
    # tells
    # examples apart shrinks as x_t turns into the shared noise
    images = torch.from_numpy(to_model_range(digits_splits[0].images[:12]))
    fp32, bf16 = (
        FeatureComputer(tiny_model, SPEC),
        FeatureComputer(tiny_model, dataclasses.replace(SPEC, precision="bf16")),
    )
    ratios = []
    for bucket in (0, SPEC.buckets - 1):
        buckets = torch.full((12,), bucket)
        exact, rounded = fp32.features(images, buckets), bf16.features(images, buckets)
        specific = (exact - exact.mean(0)).norm(dim=1)
        ratios.append(float(((rounded - exact).norm(dim=1) / specific).median()))
    assert ratios[1] > 3 * ratios[0], f"bf16 move / example-specific part: {ratios}"
