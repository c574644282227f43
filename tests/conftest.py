"""Shared fixtures: a tiny DDPM trained on sklearn's 8x8 digits, and a small index of it.

Everything is real (training, gradients, FAISS), only small: ~160k parameters, 200 training
images, 4 buckets, k = 64. Built once per test session in a temporary folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")

TINY_TRAIN_STEPS = 300
TINY_INDEX_SIZE = 200
TRAINED_MODEL_FIXTURE = "tiny_model_dir"  # tiny_model, the index, the explorer and the app all need it


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items):
    """The slow tier: every test that needs the trained tiny model (directly, or through its index,
    explorer or the running app) is marked `slow`, and so is every browser test. Training it once per
    session takes about a minute of CPU, most of the edit-loop tier's budget: `python -m pytest -q -m
    "not slow"` leaves these out.
    """
    for item in items:
        if TRAINED_MODEL_FIXTURE in getattr(item, "fixturenames", ()) or item.get_closest_marker("browser"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def digits_splits():
    from explorer.data import load_builtin, train_heldout_split

    return train_heldout_split(load_builtin("digits"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, digits_splits) -> Path:
    from explorer.model import tiny_config
    from precompute.train import TrainConfig, train_classifier, train_ddpm

    train, heldout = digits_splits
    out = tmp_path_factory.mktemp("tiny_model")
    config = TrainConfig(steps=TINY_TRAIN_STEPS, checkpoint_every=100, classifier_epochs=4)
    train_ddpm(train, out, config, tiny_config(8))
    train_classifier(train, heldout, out / "classifier", config)
    return out


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    from explorer.model import load_model

    return load_model(tiny_model_dir)


@pytest.fixture(scope="session")
def tiny_spec():
    from explorer.features import FeatureSpec

    return FeatureSpec(output="square", buckets=4, proj_dim=64, noise_draws=1)


@pytest.fixture(scope="session")
def tiny_train_subset(digits_splits):
    train, _ = digits_splits
    return train.subset(np.arange(TINY_INDEX_SIZE), "tiny")


@pytest.fixture(scope="session")
def tiny_index_dir(tmp_path_factory, tiny_model, tiny_spec, tiny_train_subset) -> Path:
    from precompute.featurize.pipeline import FeaturizeOptions, featurize

    out = tmp_path_factory.mktemp("tiny_index") / "index"
    options = FeaturizeOptions(keep_features=True, chunk_size=50)
    featurize(tiny_model, tiny_train_subset, out, tiny_spec, options)
    return out


@pytest.fixture(scope="session")
def tiny_assets(tiny_model_dir, tiny_index_dir) -> tuple[Path, Path]:
    """(model_dir, index_dir) of the tiny digits model; the classifier is in model_dir/classifier."""
    return tiny_model_dir, tiny_index_dir


@pytest.fixture(scope="session")
def tiny_explorer(tiny_model_dir, tiny_index_dir):
    from explorer.attribution import Explorer

    return Explorer.from_dirs(tiny_model_dir, [tiny_index_dir])
