import numpy as np
import pytest
from safetensors.torch import load_file

from explorer.errors import ExplorerError
from explorer.model import tiny_config
from precompute.train import TrainConfig, train_ddpm

WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


def test_resumed_training_equals_uninterrupted(digits_splits, tmp_path):
    train = digits_splits[0].subset(np.arange(128), "small")
    config = TrainConfig(steps=12, batch_size=16, checkpoint_every=5)
    train_ddpm(train, tmp_path / "straight", config, tiny_config(8))
    # "interrupted" after 6 steps (its last checkpoint), then the same command with the full step count
    train_ddpm(
        train, tmp_path / "resumed", TrainConfig(steps=6, batch_size=16, checkpoint_every=5), tiny_config(8)
    )
    train_ddpm(train, tmp_path / "resumed", config, tiny_config(8))
    straight, resumed = (
        load_file(str(tmp_path / "straight" / WEIGHTS)),
        load_file(str(tmp_path / "resumed" / WEIGHTS)),
    )
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert (straight[name] == resumed[name]).all(), name


def test_checkpoint_of_other_settings_is_refused(digits_splits, tmp_path):
    train = digits_splits[0].subset(np.arange(64), "small")
    train_ddpm(train, tmp_path / "m", TrainConfig(steps=2, batch_size=8), tiny_config(8))
    with pytest.raises(ExplorerError, match="other settings"):
        train_ddpm(
            train, tmp_path / "m", TrainConfig(steps=4, batch_size=8, learning_rate=5e-4), tiny_config(8)
        )
