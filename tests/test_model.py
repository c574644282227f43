import pytest
import torch

from explorer.errors import ExplorerError
from explorer.model import file_hash, load_model, make_scheduler, save_model, tiny_config


def test_save_load_round_trip_and_hash(tmp_path):
    torch.manual_seed(0)
    unet = tiny_config(8).build().eval()
    save_model(unet, make_scheduler(), tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 700])
    with torch.no_grad():
        assert torch.equal(unet(x, t).sample, loaded.unet(x, t).sample)
    assert loaded.weights_hash == file_hash(tmp_path / "m" / "unet" / "diffusion_pytorch_model.safetensors")
    assert loaded.sample_size == 8 and loaded.num_train_timesteps == 1000
    assert not any(p.requires_grad for p in loaded.unet.parameters())


def test_bare_unet_folder_loads_with_default_scheduler(tmp_path):
    unet = tiny_config(8).build()
    unet.save_pretrained(tmp_path / "bare", safe_serialization=True)
    assert load_model(tmp_path / "bare").num_train_timesteps == 1000


def test_missing_or_pickled_model_is_refused(tmp_path):
    with pytest.raises(ExplorerError, match="does not exist"):
        load_model(tmp_path / "nope")
    unet = tiny_config(8).build()
    unet.save_pretrained(tmp_path / "pickled", safe_serialization=False)
    with pytest.raises(ExplorerError, match="safetensors"):
        load_model(tmp_path / "pickled")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExplorerError, match="config.json"):
        load_model(tmp_path / "empty")
