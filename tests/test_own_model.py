"""A user's own pixel model, end to end: a tiny RGB UNet2DModel with a DDIM scheduler saved as a diffusers
pipeline folder, a folder of RGB images of any size in class subfolders, `precompute train --classifier-only`,
`precompute featurize`, then the app in Chromium: Generate and scrub."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from app_fixtures import start_app
from PIL import Image

from explorer.data import load_dataset
from explorer.errors import ExplorerError

COLOURS = {"red": (200, 30, 30), "green": (30, 180, 40), "blue": (40, 60, 210)}
CHROMIUM = Path("/usr/bin/chromium")


def _write_images(root: Path, per_class: int = 24) -> Path:
    """Coloured squares on noise, 12x16 (not square: the loader resizes and centre-crops)."""
    rng = np.random.default_rng(0)
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 60, (12, 16, 3)).astype(np.uint8)
            top, left = rng.integers(0, 4), rng.integers(2, 8)
            pixels[top : top + 8, left : left + 8] = colour
            Image.fromarray(pixels).save(root / name / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def rgb_pipeline(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(model_dir, data_dir, index_dir): a pipeline folder as diffusers writes it, + classifier and index."""
    import torch
    from diffusers import DDIMScheduler

    from explorer.model import tiny_config

    root = tmp_path_factory.mktemp("own_model")
    model_dir, data_dir, index_dir = root / "pipeline", _write_images(root / "images"), root / "index"
    torch.manual_seed(0)
    config = tiny_config(8)
    config.channels = 3
    config.build().save_pretrained(model_dir / "unet", safe_serialization=True)
    DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear").save_pretrained(model_dir / "scheduler")
    index = {
        "_class_name": "DDIMPipeline",
        "unet": ["diffusers", "UNet2DModel"],
        "scheduler": ["diffusers", "DDIMScheduler"],
    }
    (model_dir / "model_index.json").write_text(json.dumps(index))
    precompute = [sys.executable, "-m", "precompute"]
    for command in (
        ["train", "--classifier-only", "--data", str(data_dir), "--out", str(model_dir), "--size", "8"]
        + ["--channels", "3", "--classifier-epochs", "3"],
        ["featurize", "--model", str(model_dir), "--data", str(data_dir), "--out", str(index_dir)]
        + ["--split", "all", "--buckets", "2", "--proj-dim", "32", "--chunk-size", "24"],
    ):
        done = subprocess.run([*precompute, *command], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
    return model_dir, data_dir, index_dir


def test_rgb_folder_loads_resized_and_cropped(tmp_path):
    data = load_dataset(str(_write_images(tmp_path / "images", per_class=2)), 8, channels=3)
    assert data.images.shape == (6, 8, 8, 3) and data.channels == 3 and data.resolution == 8
    assert data.class_names == sorted(COLOURS)
    red = data.images[data.labels == data.class_names.index("red")]
    assert red[..., 0].mean() > 2 * red[..., 2].mean(), "the channels keep their order (R stays R)"


def test_metadata_jsonl_gives_captions_and_labels(tmp_path):
    root = tmp_path / "captioned"
    root.mkdir()
    rows = []
    for i, (name, colour) in enumerate(COLOURS.items()):
        Image.new("RGB", (10, 10), colour).save(root / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"a {name} square", "label": name})
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    data = load_dataset(str(root), 8, channels=3)
    pairs = {(data.class_names[label], caption) for label, caption in zip(data.labels, data.captions)}
    assert pairs == {(name, f"a {name} square") for name in COLOURS}
    (root / "metadata.jsonl").write_text(json.dumps({"text": "no file"}))
    with pytest.raises(ExplorerError, match="row 1 has no file_name"):
        load_dataset(str(root), 8, channels=3)


def test_unsupported_scheduler_is_named(rgb_pipeline, tmp_path):
    import shutil

    from explorer.model import load_model

    model_dir = tmp_path / "other"
    shutil.copytree(rgb_pipeline[0], model_dir)
    config_path = model_dir / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config["_class_name"] = "LCMScheduler"
    config_path.write_text(json.dumps(config))
    with pytest.raises(
        ExplorerError, match="'LCMScheduler', which is not supported: use one of DDPMScheduler"
    ):
        load_model(model_dir)


def test_rgb_ddim_pipeline_generates_and_attributes(rgb_pipeline):
    from explorer.attribution import Explorer

    model_dir, _, index_dir = rgb_pipeline
    explorer = Explorer.from_dirs(model_dir, [index_dir])
    assert type(explorer.model.scheduler).__name__ == "DDIMScheduler"
    attribution = explorer.generate(seed=1, steps=20, top_k=5)
    assert attribution.trajectory.final.shape == (3, 8, 8)
    step = attribution.steps[-1]
    assert len(step.positive.ids) == 5 and step.positive.scores[0] >= step.positive.scores[-1]
    curves = explorer.rollouts(attribution.trajectory, count=3, completions=4)
    assert curves.probabilities.shape == (3, len(COLOURS))
    np.testing.assert_allclose(curves.probabilities.sum(axis=1), 1.0, atol=1e-4)


def test_ddim_completions_draw_and_the_trajectory_is_deterministic(rgb_pipeline):
    import torch

    from explorer.model import load_model
    from explorer.sampler import complete_from_steps, generate

    model = load_model(rgb_pipeline[0])
    first, second = generate(model, seed=2, steps=10), generate(model, seed=2, steps=10)
    torch.testing.assert_close(first.final, second.final)  # DDIM eta 0: the seed fixes the trajectory
    finals = complete_from_steps(model, first, [3], completions=4, seed=0)[0]  # (4, 3, 8, 8)
    assert not torch.allclose(finals[0], finals[1]), "completions from x_t draw (eta = 1), they differ"


def test_the_completions_plot_keeps_the_step_the_server_last_heard(rgb_pipeline):
    """The completions land after the slider moved: their plot carries both kinds of curves and its marker is
    at the step the server last heard (the browser moves it on from there, explorer/web/scrub_view.js)."""
    from explorer.attribution import Explorer
    from explorer.web.handlers import Handlers

    model_dir, _, index_dir = rgb_pipeline
    handlers = Handlers(Explorer.from_dirs(model_dir, [index_dir]))
    quiet = lambda *a, **k: None  # noqa: E731
    session = handlers.generate(None, 3, 10, 4, next(iter(handlers.explorer.indexes)), progress=quiet).session
    handlers.follow_step(session, 2, "")
    fresh = json.loads(handlers.rollouts(session, progress=quiet).plot["plot"])
    solid = [trace for trace in fresh["data"] if trace.get("mode") == "lines+markers"]
    assert sorted(trace["name"] for trace in solid) == sorted(COLOURS)
    (marker,) = fresh["layout"]["shapes"]
    assert marker["x0"] == session.attribution.steps[2].timestep


@pytest.mark.browser
@pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium: install it with tests/setup.sh")
def test_rgb_pipeline_in_the_browser(rgb_pipeline):
    from playwright.sync_api import sync_playwright

    from bench.screenshot import CHROMIUM_ARGS

    model_dir, _, index_dir = rgb_pipeline
    app = start_app(model_dir, index_dir)
    captions = "sel => Array.from(document.querySelectorAll(sel + ' .caption-label')).map(e => e.textContent)"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.set_default_timeout(60_000)
        page.goto(app.url)
        page.get_by_role("button", name="Generate", exact=True).click()
        page.wait_for_function("() => document.querySelectorAll('#positive .caption-label').length === 8")
        last = page.evaluate(captions, "#positive")
        assert all("label " in c and any(name in c for name in COLOURS) for c in last)
        slider = page.locator("#step-slider input[type=range]")
        slider.focus()
        slider.press("Home")
        page.wait_for_function(
            "([sel, before]) => JSON.stringify(Array.from(document.querySelectorAll(sel + ' .caption-label'))"
            ".map(e => e.textContent)) !== JSON.stringify(before)",
            arg=["#positive", last],
        )
        # the rollout curves (completions through the DDIM scheduler) arrive, one dashed trace per class
        page.wait_for_function(
            "() => document.querySelector('#status').textContent.includes('completions (')"
        )
        solid = (
            "() => { const p = document.querySelector('#likelihood .js-plotly-plot');"
            " return p ? p.data.filter(t => t.mode === 'lines+markers').length : 0; }"
        )
        page.wait_for_function(f"() => ({solid})() === {len(COLOURS)}")
        browser.close()


def test_dpm_solver_pipeline_samples_and_completes_per_start_step(rgb_pipeline, tmp_path):
    import shutil

    import torch
    from diffusers import DPMSolverMultistepScheduler

    from explorer.model import load_model
    from explorer.sampler import complete_from_steps, generate

    model_dir = tmp_path / "dpm"
    shutil.copytree(rgb_pipeline[0], model_dir)
    ddim = load_model(model_dir).scheduler
    DPMSolverMultistepScheduler.from_config(ddim.config).save_pretrained(model_dir / "scheduler")
    model = load_model(model_dir)
    assert type(model.scheduler).__name__ == "DPMSolverMultistepScheduler"
    trajectory = generate(model, seed=4, steps=12)
    assert torch.isfinite(trajectory.final).all() and trajectory.x0hat.shape == (12, 3, 8, 8)
    both = complete_from_steps(model, trajectory, [2, 6], completions=3, seed=5)
    assert both.shape == (2, 3, 3, 8, 8) and torch.isfinite(both).all()
    # each start step runs with its own multistep state: the same as completing from it alone
    alone = complete_from_steps(model, trajectory, [2], completions=3, seed=5)[0]
    torch.testing.assert_close(both[0], alone)


def test_a_model_without_classifier_serves_attributions_and_says_why_there_are_no_curves(
    rgb_pipeline, tmp_path
):
    import shutil

    from explorer.attribution import NO_CLASSIFIER, Explorer
    from explorer.web.handlers import Handlers

    model_dir = tmp_path / "bare"
    shutil.copytree(rgb_pipeline[0], model_dir, ignore=shutil.ignore_patterns("classifier"))
    explorer = Explorer.from_dirs(model_dir, [rgb_pipeline[2]])
    assert explorer.classifier is None and explorer.class_names == []
    with pytest.raises(ExplorerError, match="no feature classifier"):
        explorer.rollouts(explorer.generate(seed=0, steps=10).trajectory)
    handlers = Handlers(explorer)
    outputs = handlers.generate(None, 3, 10, 8, next(iter(explorer.indexes)), progress=lambda *a, **k: None)
    session = outputs.session
    assert session.attribution.proxy.shape == (10, 0)
    status = handlers.rollouts(session, progress=lambda *a, **k: None).status
    assert "no likelihood curves: no feature classifier" in status
    assert "No feature likelihood" in json.dumps(session.plot) and "precompute train" in NO_CLASSIFIER
    with pytest.raises(ExplorerError, match="no feature classifier in"):
        Explorer.from_dirs(model_dir, [rgb_pipeline[2]], classifier_dir=tmp_path / "missing")
