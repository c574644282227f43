"""The real web app on 127.0.0.1, driven through its API with gradio_client.

Generate, move the step slider, read the galleries and the plot JSON, select an influencer,
attribute an uploaded image; outputs are checked against the engine. Bad input must come back
as a clear error message, never a crash.
"""

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from app_fixtures import app_assets, running_app, start_app  # noqa: F401  (fixtures; also sets the offline env)
from gradio.utils import get_upload_folder
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

SEED, STEPS, TOP_K = 7, 20, 6
CAPTION = re.compile(
    r"^(least aligned · )?id (\d+) · label (\S+) · (?:cos|TRAK score) ([+-]\d+\.\d+) · p(\d+\.\d)$"
)
GENERATE_OUTPUTS = (
    "final",
    "strip",
    "slider",
    "xt",
    "x0",
    "positive",
    "negative",
    "plot",
    "step_info",
    "status",
    "chosen",
    "chosen_plot",
    "chosen_info",
    "top_k",
)
SCRUB_OUTPUTS = (
    "slider",
    "xt",
    "x0",
    "positive",
    "negative",
    "plot",
    "step_info",
    "chosen",
    "chosen_plot",
    "chosen_info",
)


def parse(gallery: list[dict] | dict) -> list[tuple[int, str, float, float]]:
    """(id, label, score, percentile) of every gallery item, from its caption (a step view's galleries come
    as updates that also set the highlighted item)."""
    rows = []
    if isinstance(gallery, dict):
        gallery = gallery["value"]
    for item in gallery:
        match = CAPTION.match(item["caption"])
        assert match, (
            f"caption {item['caption']!r} does not have the form '[least aligned · ]id I · label L · "
            "cos S · pP'"
        )
        assert not match[1] or float(match[4]) >= 0, (
            f"{item['caption']!r}: a negative score is not 'least aligned'"
        )
        rows.append((int(match[2]), match[3], float(match[4]), float(match[5])))
    return rows


def picture(image: dict) -> Image.Image:
    """An image output (inline PNG data URI) as a PIL image."""
    header, data = image["url"].split(",", 1)
    assert header == "data:image/png;base64"
    return Image.open(io.BytesIO(base64.b64decode(data)))


def figure(plot: dict) -> dict:
    assert plot["type"] == "plotly"
    return json.loads(plot["plot"])


def marker_x(plot: dict) -> float:
    (shape,) = figure(plot)["layout"]["shapes"]
    return shape["x0"]


@pytest.fixture(scope="module")
def index_name(running_app) -> str:  # noqa: F811
    return next(iter(running_app.explorer.indexes))


@pytest.fixture(scope="module")
def client(running_app) -> Client:  # noqa: F811
    return Client(running_app.url, verbose=False)


@pytest.fixture(scope="module")
def generated(client: Client, index_name: str) -> dict:
    return dict(zip(GENERATE_OUTPUTS, client.predict(SEED, STEPS, TOP_K, index_name, api_name="/generate")))


@pytest.fixture(scope="module")
def reference(running_app):  # noqa: F811
    """The same generation computed in-process by the engine."""
    return running_app.explorer.generate(SEED, STEPS, top_k=TOP_K)


def test_generate_shows_final_image_strip_galleries_and_plot(generated: dict, running_app) -> None:  # noqa: F811
    final = picture(generated["final"])
    assert final.size == (160, 160) and np.asarray(final).std() > 0
    assert 2 <= len(generated["strip"]) <= 10
    assert generated["strip"][0]["caption"].startswith("t=")
    for sign in ("positive", "negative"):
        rows = parse(generated[sign])
        assert len(rows) == TOP_K
        scores = [row[2] for row in rows]
        assert scores == sorted(scores, reverse=(sign == "positive"))
        assert all(picture(item["image"]).size == (112, 112) for item in generated[sign])
    assert parse(generated["positive"])[0][2] > parse(generated["negative"])[0][2]
    # honest negatives: a listed negative is called negative only with a score below 0, and the step line says
    # how many
    for item in generated["negative"]:
        score = float(CAPTION.match(item["caption"])[4])
        assert item["caption"].startswith("least aligned · ") == (score >= 0)
    assert not any(item["caption"].startswith("least aligned") for item in generated["positive"])
    assert (
        "listed negatives have negative scores" in generated["step_info"]
        or "least aligned" in generated["step_info"]
    )
    assert generated["slider"]["maximum"] == STEPS - 1 and generated["slider"]["value"] == STEPS - 1
    traces = figure(generated["plot"])["data"]
    assert [
        trace["name"] for trace in traces
    ] == running_app.explorer.class_names  # one proxy curve per class
    assert all(len(trace["y"]) == STEPS for trace in traces)
    assert "sample" in generated["status"] and "attribute" in generated["status"]


def test_captions_match_the_engine(
    client: Client, generated: dict, reference, running_app, index_name
) -> None:  # noqa: F811
    index = running_app.explorer.indexes[index_name]
    for step in (STEPS - 1, 3):
        out = dict(zip(SCRUB_OUTPUTS, client.predict(step, api_name="/scrub")))
        expected = reference.steps[step]
        for sign in ("positive", "negative"):
            rows, result = parse(out[sign]), getattr(expected, sign)
            assert [row[0] for row in rows] == result.ids.tolist()
            np.testing.assert_allclose([row[2] for row in rows], result.scores, atol=2e-3)
            labels = [index.class_names[index.train_labels[p]] for p in result.positions]
            assert [row[1] for row in rows] == labels
            assert rows[0][3] == pytest.approx(expected.percentile(int(result.positions[0])), abs=0.06)


def test_scrub_changes_step_view_and_moves_marker(client: Client, generated: dict, reference) -> None:
    views = {
        step: dict(zip(SCRUB_OUTPUTS, client.predict(step, api_name="/scrub")))
        for step in (0, STEPS // 2, STEPS - 1)
    }
    for step, view in views.items():
        t = int(reference.trajectory.timesteps[step])
        assert f"t = {t}" in view["slider"]["label"]
        assert marker_x(view["plot"]) == t
        assert len(parse(view["positive"])) == len(parse(view["negative"])) == TOP_K
        assert "handler" in view["step_info"]
    first, last = views[0], views[STEPS - 1]
    assert parse(first["positive"]) != parse(last["positive"])
    assert not np.array_equal(np.asarray(picture(first["xt"])), np.asarray(picture(last["xt"])))


def test_rollout_curves_arrive_as_dashed_traces(client: Client, generated: dict, running_app) -> None:  # noqa: F811
    plot, status = client.predict(api_name="/rollouts")
    traces = figure(plot)["data"]
    classes = running_app.explorer.class_names
    rollouts = [trace for trace in traces if trace["line"].get("dash") == "dash"]
    assert len(rollouts) == len(classes) and len(traces) == 2 * len(classes)
    assert all(10 <= len(trace["x"]) <= 12 for trace in rollouts)  # >= 10 start steps
    totals = np.sum([trace["y"] for trace in rollouts], axis=0)
    np.testing.assert_allclose(totals, 1.0, atol=1e-4)  # probabilities over the classes
    assert "16 completions" in status


def test_select_influencer_shows_its_score_at_every_step(client: Client, generated: dict) -> None:
    step = STEPS // 2
    view = dict(zip(SCRUB_OUTPUTS, client.predict(step, api_name="/scrub")))
    for sign, rank in (("positive", 0), ("negative", 2)):
        image, plot, text = client.predict(step, sign, rank, api_name="/select_influencer")
        chosen = parse(view[sign])[rank]
        assert picture(image).size[0] >= 160
        (trace,) = figure(plot)["data"]
        assert len(trace["y"]) == STEPS
        assert trace["y"][step] == pytest.approx(chosen[2], abs=2e-3)
        assert f"id {chosen[0]}" in text and sign in text


def test_sessions_do_not_share_trajectories(
    running_app, index_name: str, client: Client, generated: dict
) -> None:  # noqa: F811
    other = Client(running_app.url, verbose=False)
    other.predict(SEED + 1, STEPS, TOP_K, index_name, api_name="/generate")
    mine = dict(zip(SCRUB_OUTPUTS, client.predict(STEPS - 1, api_name="/scrub")))
    assert parse(mine["positive"]) == parse(generated["positive"])


def test_reattribute_with_another_top_k_keeps_the_trajectory(running_app, index_name: str) -> None:  # noqa: F811
    other = Client(running_app.url, verbose=False)
    before = dict(zip(GENERATE_OUTPUTS, other.predict(SEED, STEPS, TOP_K, index_name, api_name="/generate")))
    after = other.predict(STEPS - 1, index_name, 3, api_name="/reattribute_top_k")
    positive, status = after[3], after[7]
    assert [row[:3] for row in parse(positive)] == [row[:3] for row in parse(before["positive"])[:3]]
    assert status.split(" · sample")[0] == before["status"].split(" · sample")[0]  # same seed, steps, index


def test_several_indexes_offer_a_method_dropdown(app_assets, tmp_path: Path) -> None:  # noqa: F811
    model_dir, index_dir = app_assets
    (tmp_path / "second").symlink_to(Path(index_dir).resolve(), target_is_directory=True)
    app = start_app(model_dir, index_dir, tmp_path / "second")
    first, second = app.explorer.indexes
    client = Client(app.url, verbose=False)
    client.predict(SEED, STEPS, TOP_K, first, api_name="/generate")
    status = client.predict(STEPS - 1, second, TOP_K, api_name="/reattribute_index")[7]
    assert second in status
    with pytest.raises(AppError, match="not in the list of choices"):  # the dropdown's own check (API only)
        client.predict(STEPS - 1, "no such index", TOP_K, api_name="/reattribute_index")


@pytest.mark.parametrize("seed", [-1, 2**40, "abc", 1.5])
def test_bad_seed_is_a_clear_error_in_the_status_line(client: Client, index_name: str, seed) -> None:
    status = dict(
        zip(GENERATE_OUTPUTS, client.predict(seed, STEPS, TOP_K, index_name, api_name="/generate"))
    )["status"]
    assert status.startswith("**Not done:**") and "seed" in status and "Traceback" not in status


def test_scrub_before_generate_is_a_clear_error(running_app) -> None:  # noqa: F811
    out = dict(zip(SCRUB_OUTPUTS, Client(running_app.url, verbose=False).predict(3, api_name="/scrub")))
    assert "Generate first" in out["step_info"]


def test_typed_top_k_outside_the_range_is_clamped_and_said(running_app, index_name: str) -> None:  # noqa: F811
    other = Client(running_app.url, verbose=False)
    for typed, used in ((0, 1), (500, 32)):
        out = dict(zip(GENERATE_OUTPUTS, other.predict(SEED, STEPS, typed, index_name, api_name="/generate")))
        assert out["top_k"] == used and len(parse(out["positive"])) == used
        assert f"top-k {typed} is outside 1..32: used {used}" in out["status"]


def test_attribute_an_uploaded_image(client: Client, index_name: str, tmp_path: Path, running_app) -> None:  # noqa: F811
    odd = np.zeros((37, 53, 4), dtype=np.uint8)  # RGBA, odd size: the engine converts and resizes
    odd[8:30, 20:30] = 255
    Image.fromarray(odd, mode="RGBA").save(tmp_path / "odd.png")
    seen, positive, negative, status = client.predict(
        handle_file(str(tmp_path / "odd.png")), 100, 5, index_name, api_name="/attribute_image"
    )
    assert len(parse(positive)) == len(parse(negative)) == 5
    assert "t = 100" in status
    size = running_app.explorer.model.sample_size
    assert picture(seen).size == (size * (160 // size),) * 2


def test_corrupt_or_missing_upload_is_a_clear_error(client: Client, index_name: str, tmp_path: Path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    status = client.predict(handle_file(str(broken)), 100, 5, index_name, api_name="/attribute_image")[3]
    assert "'broken.png' could not be read as an image" in status
    assert get_upload_folder() not in status  # the upload is named, not the server's temporary path
    status = client.predict(None, 100, 5, index_name, api_name="/attribute_image")[3]
    assert "no image uploaded" in status
