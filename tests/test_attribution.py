import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from explorer.errors import ExplorerError


def test_generate_attributes_every_step(tiny_explorer):
    result = tiny_explorer.generate(seed=3, steps=20, top_k=5)
    assert len(result.steps) == 20 and result.proxy.shape == (20, 10)
    for step in result.steps:
        assert len(step.positive.ids) == 5 and len(step.negative.ids) == 5
        assert np.all(np.diff(step.positive.scores) <= 1e-6) and np.all(
            np.diff(step.negative.scores) >= -1e-6
        )
        assert step.positive.scores[0] == pytest.approx(step.scores.max(), rel=1e-4)
        assert step.negative.scores[0] == pytest.approx(step.scores.min(), rel=1e-4)
        assert step.percentile(int(step.positive.positions[0])) == 100.0
    buckets = [s.bucket for s in result.steps]
    assert buckets[0] == 3 and buckets[-1] == 0, "noisy steps use the last bucket, clean steps the first"
    curve = result.score_curve(int(result.steps[-1].positive.positions[0]))
    assert curve.shape == (20,) and curve[-1] == pytest.approx(result.steps[-1].positive.scores[0], rel=1e-4)


def test_attribute_a_real_image_of_any_size(tiny_explorer, digits_splits):
    _, heldout = digits_splits
    image = Image.fromarray(heldout.images[0]).resize((40, 40)).convert("RGB")
    result = tiny_explorer.attribute_image(image, timestep=100, top_k=4)
    assert result.bucket == 0 and len(result.positive.ids) == 4
    with pytest.raises(ExplorerError, match="top-k 0"):
        tiny_explorer.attribute_image(heldout.images[0], 100, top_k=0)
    with pytest.raises(ExplorerError, match="timestep 5000"):
        tiny_explorer.attribute_image(heldout.images[0], 5000)


def _run(*args):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=300)


def _attribute(index_dir, model_dir, image, timestep: str, *more: str):
    """`python -m explorer attribute` with these files, at this timestep, plus more flags."""
    return _run(
        "explorer",
        "attribute",
        "--index",
        str(index_dir),
        "--model",
        str(model_dir),
        "--image",
        str(image),
        "--timestep",
        timestep,
        *more,
    )


def test_attribute_cli_prints_json(tiny_assets, digits_splits, tmp_path):
    model_dir, index_dir = tiny_assets
    path = tmp_path / "query.png"
    Image.fromarray(digits_splits[1].images[2]).save(path)
    done = _attribute(index_dir, model_dir, path, "300", "--top-k", "3", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert [len(result["positive"]), len(result["negative"])] == [3, 3]
    assert set(result["positive"][0]) == {"id", "label", "score"}
    assert result["positive"][0]["score"] >= result["positive"][-1]["score"]


def test_attribute_cli_bad_input_is_one_clear_line(tiny_assets, tmp_path):
    model_dir, index_dir = tiny_assets
    done = _attribute(index_dir, model_dir, tmp_path / "missing.png", "3")
    assert done.returncode == 2 and "missing.png" in done.stderr and "Traceback" not in done.stderr
    done = _attribute(tmp_path, model_dir, "x.png", "3")
    assert done.returncode == 2 and "not a complete index directory" in done.stderr


def test_label_agreement_beats_chance(tiny_assets):
    model_dir, index_dir = tiny_assets
    done = _run(
        "precompute",
        "evaluate",
        "label-agreement",
        "--model",
        str(model_dir),
        "--index",
        str(index_dir),
        "--data",
        "digits",
        "--timesteps",
        "100",
        "--queries",
        "40",
    )
    assert done.returncode == 0, done.stderr
    value = float(done.stdout.strip().splitlines()[-1].split("|")[-2])
    assert value > 0.3, done.stdout


def test_region_attribution_is_query_side_and_checked(tiny_explorer):
    whole = tiny_explorer.generate(5, 10, None, 6)
    size = tiny_explorer.model.sample_size
    everything = tiny_explorer.reattribute(whole, whole.index_name, 6, (0, 0, size, size))
    for step in (0, 9):  # the whole box is the whole image
        assert everything.steps[step].positive.ids.tolist() == whole.steps[step].positive.ids.tolist()
    top = tiny_explorer.reattribute(whole, whole.index_name, 6, (0, 0, size, size // 2))
    bottom = tiny_explorer.reattribute(whole, whole.index_name, 6, (0, size // 2, size, size))
    assert not np.allclose(top.steps[9].scores, bottom.steps[9].scores)  # two regions, two score vectors
    assert top.trajectory is whole.trajectory  # no resampling: the same trajectory, queried by region
    for bad in ((0, 0, 0, 4), (2, 2, 1, 4), (0, 0, size + 1, 4), ("a", 0, 1, 1), (1, 2, 3)):
        with pytest.raises(ExplorerError, match="region"):
            tiny_explorer.reattribute(whole, whole.index_name, 6, bad)


def test_region_queries_are_centered_by_the_regions_own_mean(tiny_explorer):
    """Centering a region query with the whole image's mean training feature leaves c_A - c in every region
    query; with the region's own mean, the centered region features of training images average to 0."""
    import torch

    from explorer.data import to_model_range
    from explorer.region import RegionCenters, mean_feature

    name, index = tiny_explorer.index()
    size, bucket = tiny_explorer.model.sample_size, index.buckets - 1
    box = (0, 0, size, size // 2)
    region = tiny_explorer.computer(name).for_region(tiny_explorer.region_mask(box))
    centers = RegionCenters(index.train_images)
    sample = torch.from_numpy(to_model_range(index.train_images[centers.rows]))
    phi = region.features(sample, torch.full((len(sample),), bucket)).numpy().astype(np.float64)
    assert np.allclose(mean_feature(region, sample, bucket), phi.mean(0), rtol=1e-4, atol=1e-6)  # linearity
    own = centers.scorers(index.scorers, region, box, [bucket])[bucket]
    whole = index.scorers[bucket]
    spread = np.linalg.norm(phi - phi.mean(0), axis=1).mean()
    assert np.linalg.norm((phi - own.center).mean(0)) < 1e-3 * spread
    assert np.linalg.norm((phi - whole.center).mean(0)) > 0.1 * spread  # the offset the fix removes


def test_attribute_cli_region(tiny_assets, digits_splits, tmp_path):
    model_dir, index_dir = tiny_assets
    path = tmp_path / "query.png"
    Image.fromarray(digits_splits[1].images[2]).save(path)
    common = (index_dir, model_dir, path, "300", "--top-k", "3", "--json")
    whole, part = _attribute(*common), _attribute(*common, "--region", "0,0,4,8")
    assert whole.returncode == part.returncode == 0, whole.stderr + part.stderr
    whole, part = json.loads(whole.stdout), json.loads(part.stdout)
    assert whole["region"] is None and part["region"] == [0, 0, 4, 8]
    assert [row["score"] for row in whole["positive"]] != [row["score"] for row in part["positive"]]
    bad = _attribute(*common, "--region", "0,0,99,8")
    assert bad.returncode == 2 and "region (0, 0, 99, 8) must satisfy" in bad.stderr
