"""A latent text-to-image pipeline end to end (tests/latent_fixtures.py builds it from configs): VAE latents
cached, `precompute featurize --params lora` (the LoRA matrices only), near-duplicate queries with their
caption, CLIP concept curves, and the app in Chromium: type a prompt, Generate, scrub."""

import atexit
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from app_fixtures import BROWSER_MARKS, CAPTIONS_JS, browser_page, free_port, wait_for_changed_captions
from latent_fixtures import (
    COLOURS,
    caption,
    write_captioned_images,
    write_clip,
    write_text_pipeline,
)

from explorer.errors import ExplorerError

CONCEPTS = ", ".join(f"a {name} square" for name in COLOURS)


def _featurize(model_dir: Path, data_dir: Path, out: Path, cache: Path, *extra: str) -> str:
    command = [sys.executable, "-m", "precompute", "-v", "featurize", "--model", str(model_dir), "--data"]
    command += [str(data_dir), "--out", str(out), "--split", "all", "--buckets", "2", "--proj-dim", "64"]
    command += ["--chunk-size", "12", *extra]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=600, env={**os.environ, "DAX_CACHE": str(cache)}
    )
    assert done.returncode == 0, done.stderr
    return done.stderr


@pytest.fixture(scope="module")
def text_pipeline(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("text_model")
    paths = {
        "model": write_text_pipeline(root / "pipeline"),
        "clip": write_clip(root / "clip"),
        "data": write_captioned_images(root / "images"),
        "index": root / "index",
        "cache": root / "cache",
    }
    paths["log"] = _featurize(
        paths["model"], paths["data"], paths["index"], paths["cache"], "--params", "lora"
    )
    return paths


def test_only_the_lora_matrices_are_attributed_and_the_captions_are_kept(text_pipeline):
    from explorer.index import AttributionIndex
    from explorer.model import load_model

    model = load_model(text_pipeline["model"])
    lora = sum(p.numel() for name, p in model.unet.named_parameters() if ".lora_" in name)
    index = AttributionIndex.load(text_pipeline["index"], model_hash=model.weights_hash)
    assert index.meta.spec.params == ("lora",) and index.meta.num_params == lora
    assert 0 < lora < sum(p.numel() for p in model.unet.parameters()) / 5
    assert sorted(set(index.train_captions)) == sorted(
        caption(c, p) for c in COLOURS for p in ("left", "right")
    )
    assert index.train_images.shape[1:] == (16, 16, 3)  # the pictures, not the latents


def test_latents_are_encoded_once_then_read_from_the_cache(text_pipeline, tmp_path):
    (cached,) = (text_pipeline["cache"] / "latents").iterdir()
    assert np.load(cached).shape == (36, 4, 8, 8)
    log = _featurize(
        text_pipeline["model"], text_pipeline["data"], tmp_path / "again", text_pipeline["cache"]
    )
    assert "cached in" in text_pipeline["log"] and "read from" not in text_pipeline["log"]
    assert "read from" in log and "cached in" not in log


def test_a_near_duplicate_with_its_caption_finds_its_training_image(text_pipeline):
    from explorer.attribution import Explorer
    from explorer.data import load_dataset

    explorer = Explorer.from_dirs(text_pipeline["model"], [text_pipeline["index"]])
    data = load_dataset(str(text_pipeline["data"]), 16, channels=3)
    _, index = explorer.index()
    for i in range(0, len(data), 5):
        shifted = np.roll(data.images[i], 1, axis=1)  # one pixel to the right
        step = explorer.attribute_image(shifted, 100, top_k=10, prompt=data.captions[i])
        row = int(np.flatnonzero(index.train_ids == data.ids[i])[0])
        assert row in step.positive.positions.tolist(), (i, data.captions[i])


def test_generation_follows_the_prompt_and_the_concept_curves_are_probabilities(text_pipeline):
    import torch

    from explorer.attribution import Explorer

    explorer = Explorer.from_dirs(
        text_pipeline["model"], [text_pipeline["index"]], clip_dir=text_pipeline["clip"], concepts=CONCEPTS
    )
    assert explorer.class_names == [f"a {name} square" for name in COLOURS]
    red = explorer.generate(seed=3, steps=10, prompt=caption("red", "left"), guidance=3.0)
    blue = explorer.generate(seed=3, steps=10, prompt=caption("blue", "left"), guidance=3.0)
    assert not torch.allclose(red.trajectory.final, blue.trajectory.final), "the prompt conditions the UNet"
    xt, x0hat, final = red.trajectory.pictures
    assert xt.shape == x0hat.shape == (10, 3, 16, 16) and final.shape == (3, 16, 16)  # decoded by the VAE
    assert red.trajectory.xt.shape == (10, 4, 8, 8)  # the trajectory itself is latent
    np.testing.assert_allclose(red.proxy.sum(axis=1), 1.0, atol=1e-5)
    curves = explorer.rollouts(red.trajectory, count=3, completions=4)
    assert curves.probabilities.shape == (3, 3)
    np.testing.assert_allclose(curves.probabilities.sum(axis=1), 1.0, atol=1e-5)


def test_bad_text_model_inputs_are_named(text_pipeline, tmp_path):
    import shutil

    import torch

    from explorer.attribution import Explorer
    from explorer.concepts import parse_concepts
    from explorer.model import load_model
    from explorer.sampler import generate

    model = load_model(text_pipeline["model"])
    with pytest.raises(ExplorerError, match="is text-conditioned: give a prompt per image"):
        model.eps(torch.zeros(1, 4, 8, 8), 10)
    with pytest.raises(ExplorerError, match="guidance 0.5 must be a number from 1"):
        generate(model, seed=0, steps=10, prompt="a red square", guidance=0.5)
    with pytest.raises(ExplorerError, match="must name 2 to 20 distinct concepts"):
        parse_concepts("only one")
    with pytest.raises(ExplorerError, match="--clip and --concepts go together"):
        Explorer.from_dirs(text_pipeline["model"], [text_pipeline["index"]], clip_dir=text_pipeline["clip"])
    bare = tmp_path / "no_lora"
    shutil.copytree(text_pipeline["model"], bare, ignore=shutil.ignore_patterns("lora"))
    assert load_model(bare).weights_hash != model.weights_hash  # the adapter is part of the model
    with pytest.raises(ExplorerError, match="was built for the model with weights hash"):
        Explorer.from_dirs(bare, [text_pipeline["index"]])
    other = tmp_path / "xl"
    shutil.copytree(text_pipeline["model"], other)
    index = json.loads((other / "model_index.json").read_text())
    (other / "model_index.json").write_text(json.dumps(dict(index, _class_name="StableDiffusionXLPipeline")))
    with pytest.raises(ExplorerError, match="'StableDiffusionXLPipeline', which is not supported"):
        load_model(other)


@BROWSER_MARKS[0]
@BROWSER_MARKS[1]
def test_prompt_generate_and_scrub_in_the_browser(text_pipeline):
    from explorer.attribution import Explorer
    from explorer.web import ui

    explorer = Explorer.from_dirs(
        text_pipeline["model"], [text_pipeline["index"]], clip_dir=text_pipeline["clip"], concepts=CONCEPTS
    )
    demo = ui.build(explorer)
    _, url, _ = ui.launch(demo, "127.0.0.1", free_port(), prevent_thread_lock=True, quiet=True)
    atexit.register(demo.close)
    with browser_page(url) as page:
        page.locator("#prompt textarea").fill(caption("green", "right"))
        page.locator("#steps input[type=number]").fill("12")
        page.get_by_role("button", name="Generate", exact=True).click()
        page.wait_for_function("() => document.querySelectorAll('#positive .caption-label').length === 8")
        last = page.evaluate(CAPTIONS_JS, "#positive")
        assert all(" square on the " in text for text in last)  # influencers captioned by their prompts
        slider = page.locator("#step-slider input[type=range]")
        slider.focus()
        slider.press("Home")
        wait_for_changed_captions(page, "#positive", last)
        page.wait_for_function(
            "() => document.querySelector('#status').textContent.includes('completions (')"
        )
        solid = (  # the completions' concept curves
            "() => (document.querySelector('#likelihood .js-plotly-plot')?.data ?? [])"
            ".filter(t => t.mode === 'lines+markers').length"
        )
        page.wait_for_function(f"() => ({solid})() === {len(COLOURS)}")
        link = page.locator("#step-line a.dax-link").get_attribute("href")
        assert "prompt=a+green+square+on+the+right" in link


def test_the_attribute_cli_takes_a_prompt_and_finds_the_model_from_the_index(text_pipeline, tmp_path):
    from PIL import Image

    from explorer.data import load_dataset

    data = load_dataset(str(text_pipeline["data"]), 16, channels=3)
    Image.fromarray(np.roll(data.images[0], 1, axis=1)).save(tmp_path / "query.png")
    command = [sys.executable, "-m", "explorer", "attribute", "--index", str(text_pipeline["index"])]
    command += ["--image", str(tmp_path / "query.png"), "--timestep", "100", "--prompt", data.captions[0]]
    done = subprocess.run([*command, "--json"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert int(data.ids[0]) in [row["id"] for row in result["positive"]]
    assert all(row["caption"] in data.captions for row in result["positive"])


def test_the_prompt_box_suggests_a_training_prompt(text_pipeline):
    from explorer.attribution import Explorer
    from explorer.web import ui

    explorer = Explorer.from_dirs(text_pipeline["model"], [text_pipeline["index"]])
    _, index = explorer.index()
    config = ui.build(explorer).get_config_file()
    (box,) = [c for c in config["components"] if c.get("props", {}).get("elem_id") == "prompt"]
    assert box["props"]["placeholder"] == f"e.g. {index.train_captions[0]}"
    assert box["props"]["visible"] is True
