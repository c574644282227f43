import json

import numpy as np
import pytest
from cli import run_featurize

from explorer.errors import ExplorerError
from explorer.features import FeatureSpec
from explorer.index import META_NAME, AttributionIndex
from precompute.featurize.pipeline import FEATURES_NAME, PARTIAL_DIR, FeaturizeOptions, featurize

SPEC = FeatureSpec(output="loss", buckets=3, proj_dim=32)


def _files(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def test_interrupted_featurize_resumes_to_an_identical_index(tiny_model, tiny_train_subset, tmp_path):
    data = tiny_train_subset.subset(np.arange(90), "resume")
    options = FeaturizeOptions(chunk_size=20, das_weights=True, relative_lambda=None)  # None: lambda by GCV
    clean = featurize(tiny_model, data, tmp_path / "clean", SPEC, options)
    assert clean.complete and clean.pairs == 90 * 3

    first = featurize(
        tiny_model,
        data,
        tmp_path / "resumed",
        SPEC,
        FeaturizeOptions(chunk_size=20, das_weights=True, relative_lambda=None, max_chunks=2),
    )
    assert not first.complete and first.pairs == 40 * 3
    assert not (tmp_path / "resumed" / META_NAME).exists()
    with pytest.raises(ExplorerError, match="unfinished featurize"):
        AttributionIndex.load(tmp_path / "resumed")
    second = featurize(tiny_model, data, tmp_path / "resumed", SPEC, options)
    assert second.complete and second.pairs == 50 * 3, "only the chunks not done are recomputed"
    assert not (tmp_path / "resumed" / PARTIAL_DIR).exists()
    clean_files, resumed_files = _files(tmp_path / "clean"), _files(tmp_path / "resumed")
    assert clean_files.keys() == resumed_files.keys()
    for name in clean_files:
        assert clean_files[name] == resumed_files[name], f"{name} differs after resuming"
    meta = json.loads(clean_files[META_NAME])
    assert meta["das"] is True and meta["lambda"][0]["method"] == "gcv"


def test_resume_with_other_settings_is_refused(tiny_model, tiny_train_subset, tmp_path):
    data = tiny_train_subset.subset(np.arange(40), "mismatch")
    featurize(tiny_model, data, tmp_path / "x", SPEC, FeaturizeOptions(chunk_size=20, max_chunks=1))
    other = FeatureSpec(output="square", buckets=3, proj_dim=32)
    with pytest.raises(ExplorerError, match=r"differs in spec.output \('loss' there, 'square' now\)"):
        featurize(tiny_model, data, tmp_path / "x", other, FeaturizeOptions(chunk_size=20))


def test_complete_index_is_not_overwritten(tiny_index_dir, tiny_model, tiny_train_subset):
    with pytest.raises(ExplorerError, match="already holds a complete index"):
        featurize(tiny_model, tiny_train_subset, tiny_index_dir, SPEC)


def test_wrong_resolution_is_refused(tiny_model, tmp_path):
    from explorer.data import load_builtin

    with pytest.raises(ExplorerError, match="16x16 but the model expects 8x8"):
        featurize(tiny_model, load_builtin("digits", size=16), tmp_path / "y", SPEC)


def test_default_lambda_is_the_validated_relative_value(tiny_index_dir):
    from explorer.whitening import DEFAULT_RELATIVE_LAMBDA

    lambdas = json.loads((tiny_index_dir / META_NAME).read_text())["lambda"]
    assert {entry["method"] for entry in lambdas} == {"given"}
    assert all(entry["relative"] == DEFAULT_RELATIVE_LAMBDA and entry["value"] > 0 for entry in lambdas)


@pytest.mark.parametrize("text, expected", [("gcv", None), ("GCV", None), ("0.5", 0.5), ("1e-3", 1e-3)])
def test_lambda_argument_takes_gcv_or_a_positive_number(text, expected):
    from precompute.cli_types import lambda_rule

    assert lambda_rule(text) == expected


@pytest.mark.parametrize("text", ["0", "-1", "small", "nan", "inf"])
def test_bad_lambda_argument_names_the_value_and_the_fix(text):
    import argparse

    from precompute.cli_types import lambda_rule

    with pytest.raises(argparse.ArgumentTypeError, match="or gcv"):
        lambda_rule(text)


def test_featurize_on_worker_threads_stores_the_same_features(tiny_model, tiny_train_subset, tmp_path):
    data = tiny_train_subset.subset(np.arange(70), "workers")
    one = featurize(tiny_model, data, tmp_path / "one", SPEC, FeaturizeOptions(workers=1, keep_features=True))
    three = featurize(
        tiny_model, data, tmp_path / "three", SPEC, FeaturizeOptions(workers=3, keep_features=True)
    )
    assert one.complete and three.complete
    raw_one, raw_three = (np.load(tmp_path / name / FEATURES_NAME) for name in ("one", "three"))
    assert raw_one.shape == raw_three.shape == (3, 70, 32)
    np.testing.assert_allclose(raw_three, raw_one, rtol=1e-4, atol=1e-6 * np.abs(raw_one).max())


def test_featurize_cli_refuses_zero_workers(tiny_model_dir, tmp_path):
    result = run_featurize(tiny_model_dir, tmp_path / "none", "--limit", "8", "--workers", "0")
    assert result.returncode != 0
    assert "--workers: 0 must be >= 1" in result.stderr
    assert not (tmp_path / "none").exists()
