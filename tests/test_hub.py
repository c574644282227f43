"""Hub ids from the local cache: a tiny StableDiffusionPipeline, its LoRA adapter and a CLIP model put in a
real hub cache layout in a temporary folder (tests/hub_fixtures.py), then `--model ORG/NAME[@REVISION]`,
`--lora ORG/NAME` and `--clip ORG/NAME` resolved from it with the network watched: nothing is downloaded,
and an id that is not there is named with the cache folder and the command that fetches it."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from hub_fixtures import cache_snapshot
from latent_fixtures import write_captioned_images, write_clip, write_lora, write_text_pipeline

from explorer.errors import ExplorerError
from explorer.hub import local_or_cached

MODEL, LORA, CLIP = "tiny-org/tiny-sd", "tiny-org/tiny-sd-lora", "tiny-org/tiny-clip"


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("hub")
    pipeline = write_text_pipeline(root / "src" / "pipeline", lora=False)
    lora, clip = write_lora(pipeline, root / "src" / "lora"), write_clip(root / "src" / "clip")
    sources, cache = {MODEL: pipeline, LORA: lora, CLIP: clip}, root / "cache"
    commits = {repo: cache_snapshot(cache, repo, sources[repo], refs=("main", "v1")) for repo in sources}
    return {"root": root, "cache": cache, "commits": commits, "sources": sources}


@pytest.fixture
def offline_watch(monkeypatch, hub) -> list:
    """The default cache is the temporary one, Hub access is allowed (HF_HUB_OFFLINE off), and every
    name look-up and connection is recorded and refused: the explorer itself must not try one."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub["cache"]))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    attempts = []

    def refuse(*arguments, **_):
        attempts.append(arguments)
        raise OSError(f"test: no network {arguments}")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    return attempts


def test_hub_ids_resolve_to_their_snapshot_folders(hub, offline_watch):
    snapshot = hub["cache"] / "models--tiny-org--tiny-sd" / "snapshots" / hub["commits"][MODEL]
    for name in (MODEL, f"{MODEL}@main", f"{MODEL}@v1", f"{MODEL}@{hub['commits'][MODEL]}"):
        assert local_or_cached(name, "model") == snapshot, name
    assert (snapshot / "unet" / "diffusion_pytorch_model.safetensors").is_symlink()  # the real layout
    assert offline_watch == []


def test_a_model_its_lora_and_clip_load_from_the_cache_by_id(hub, offline_watch):
    from explorer.concepts import ClipConcepts
    from explorer.model import load_model

    by_id = load_model(MODEL, lora=LORA)
    local = load_model(hub["sources"][MODEL], lora=str(hub["sources"][LORA]))
    assert by_id.weights_hash == local.weights_hash  # the same files: the same model
    assert by_id.path == MODEL and by_id.lora.path == LORA  # recorded as given, so meta.json stays portable
    concepts = ClipConcepts(CLIP, "a red square, a blue square")
    assert concepts.class_names == ["a red square", "a blue square"]
    assert offline_watch == []


def test_an_absent_id_names_the_id_the_cache_and_the_download(hub, offline_watch):
    from explorer.model import load_model

    cache = str(hub["cache"])
    with pytest.raises(ExplorerError) as absent:
        load_model("tiny-org/absent")
    message = str(absent.value)
    assert "model 'tiny-org/absent' is not a folder here" in message
    assert f"not in the local Hugging Face cache {cache!r}" in message
    assert "`hf download tiny-org/absent`" in message and "huggingface-cli download" in message
    with pytest.raises(ExplorerError, match=r"'tiny-org/tiny-sd' at revision 'v2'.*--revision v2"):
        load_model(f"{MODEL}@v2")
    with pytest.raises(ExplorerError, match="LoRA adapter 'tiny-org/no-lora' is not a folder here"):
        load_model(MODEL, lora="tiny-org/no-lora")
    assert offline_watch == []


def test_a_local_folder_wins_over_a_hub_id_of_the_same_name(hub, offline_watch, tmp_path, monkeypatch):
    from explorer.model import load_model

    monkeypatch.chdir(tmp_path)
    assert local_or_cached(MODEL, "model") != Path(MODEL)  # the snapshot
    (tmp_path / "tiny-org").mkdir()  # ORG is a folder here: ORG/NAME is a path, missing
    assert local_or_cached(MODEL, "model") == Path(MODEL)
    (tmp_path / "assets").mkdir()
    with pytest.raises(ExplorerError, match="model directory 'assets/model' does not exist: train one"):
        load_model("assets/model")
    (tmp_path / "tiny-org" / "tiny-sd").mkdir()
    assert local_or_cached(MODEL, "model") == Path(MODEL)
    assert local_or_cached("not an id", "model") == Path("not an id")  # the caller refuses it


def _run(command: list[str], env: dict) -> subprocess.CompletedProcess:
    """A command with this environment's hub cache settings replaced by env's."""
    base = {key: value for key, value in os.environ.items() if key not in ("HF_HOME", "HF_HUB_CACHE")}
    return subprocess.run(
        [sys.executable, *command], capture_output=True, text=True, timeout=600, env={**base, **env}
    )


def test_featurize_and_attribute_by_hub_id_from_the_command_line(hub, tmp_path):
    """HF_HUB_CACHE points the commands at the cache; the attribute CLI finds the model and its adapter in
    the index's meta.json."""
    images, index = write_captioned_images(tmp_path / "images", per_pair=2), tmp_path / "index"
    env = {"HF_HUB_CACHE": str(hub["cache"]), "DAX_CACHE": str(tmp_path / "cache")}
    featurize = ["-m", "precompute", "featurize", "--model", MODEL, "--lora", LORA, "--params", "lora"]
    featurize += ["--data", str(images), "--out", str(index), "--split", "all", "--buckets", "1"]
    done = _run([*featurize, "--proj-dim", "16", "--workers", "1"], env)
    assert done.returncode == 0, done.stderr
    meta = json.loads((index / "meta.json").read_text())
    assert meta["model_path"] == MODEL and meta["lora"] == {"path": LORA, "scale": 1.0}
    query = sorted(images.glob("*.png"))[0]
    attribute = ["-m", "explorer", "attribute", "--index", str(index), "--image", str(query)]
    done = _run([*attribute, "--timestep", "100", "--prompt", "a red square on the left", "--json"], env)
    assert done.returncode == 0, done.stderr
    assert len(json.loads(done.stdout)["positive"]) == 10
    home = tmp_path / "hf_home"  # HF_HOME without HF_HUB_CACHE: the cache is HF_HOME/hub
    env = {"HF_HOME": str(home)}
    done = _run([*attribute, "--timestep", "100", "--model", "tiny-org/absent"], env)
    assert done.returncode == 2
    assert f"not in the local Hugging Face cache {str(home / 'hub')!r}" in done.stderr
    assert "`hf download tiny-org/absent`" in done.stderr
