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

from explorer.web.session import GenerateOutputs, ReattributeOutputs

SEED, STEPS, TOP_K = 7, 20, 6
CAPTION = re.compile(
    r"^(least aligned · )?id (\d+) · label (\S+) · (?:cos|TRAK score) ([+-]\d+\.\d+) · p(\d+\.\d)$"
)
GENERATE_OUTPUTS = tuple(name for name in GenerateOutputs._fields if name != "session")  # state: not sent
REATTRIBUTE_OUTPUTS = ReattributeOutputs._fields


def parse(captions: list[str]) -> list[tuple[int, str, float, float]]:
    """(id, label, score, percentile) of every tile, from its caption."""
    rows = []
    for text in captions:
        match = CAPTION.match(text)
        assert match, (
            f"caption {text!r} does not have the form '[least aligned · ]id I · label L · cos S · pP'"
        )
        assert not match[1] or float(match[4]) >= 0, f"{text!r}: a negative score is not 'least aligned'"
        rows.append((int(match[2]), match[3], float(match[4]), float(match[5])))
    return rows


def view(payload: str) -> dict:
    """The step view's payload (explorer.web.scrub_view): every step's lists, frames, line and note."""
    return json.loads(payload)


def tiles(document: dict, step: int, sign: str) -> list[tuple[int, str, float, float]]:
    return parse([caption for _, caption in document["steps"][step][sign]])


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
    return dict(
        zip(GENERATE_OUTPUTS, client.predict(SEED, STEPS, TOP_K, index_name, "", 1.0, api_name="/generate"))
    )


@pytest.fixture(scope="module")
def reference(running_app):  # noqa: F811
    """The same generation computed in-process by the engine."""
    return running_app.explorer.generate(SEED, STEPS, top_k=TOP_K)


def test_generate_sends_every_step_once(generated: dict, running_app, reference) -> None:  # noqa: F811
    final = picture(generated["final"])
    assert final.size == (160, 160) and np.asarray(final).std() > 0
    assert 2 <= len(generated["strip"]) <= 10 and generated["strip"][0]["caption"].startswith("t=")
    document = view(generated["scrub"])
    assert document["last"] == STEPS - 1 and document["step"] == STEPS - 1 and len(document["steps"]) == STEPS
    size = running_app.explorer.model.sample_size
    for step, shown in enumerate(document["steps"]):
        assert shown["t"] == int(reference.trajectory.timesteps[step])
        assert shown["line"].startswith(f"step {step} of {STEPS - 1} · t = {shown['t']} · index bucket ")
        assert shown["note"].startswith(f"t = {shown['t']}: ") and "noise" in shown["note"]
        for sign in ("positive", "negative"):
            rows = tiles(document, step, sign)
            scores = [row[2] for row in rows]
            assert len(rows) == TOP_K and scores == sorted(scores, reverse=(sign == "positive"))
        assert all(str(row) in document["thumbs"] for row, _ in shown["positive"] + shown["negative"])
    assert all(picture({"url": uri}).size == (size, size) for uri in document["frames"][0])  # CSS scales up
    frames = [np.asarray(picture({"url": document["frames"][s][0]})) for s in (0, STEPS - 1)]
    assert not np.array_equal(*frames)
    assert tiles(document, 0, "positive") != tiles(document, STEPS - 1, "positive")
    assert generated["slider"]["maximum"] == STEPS - 1 and generated["slider"]["value"] == STEPS - 1
    traces = figure(generated["plot"])["data"]
    classes = running_app.explorer.class_names
    proxy = [trace for trace in traces if trace.get("legendgroup") == "x0hat"]
    assert len(proxy) == len(classes) and all(len(trace["y"]) == STEPS for trace in proxy)
    assert all(
        trace["line"]["dash"] == "dot" and trace["visible"] is True for trace in proxy
    )  # until completions
    shares = [trace for trace in traces if trace.get("stackgroup") == "shares"]
    np.testing.assert_allclose(
        np.sum([trace["y"] for trace in shares], axis=0), 1.0
    )  # every top-k in a class
    assert marker_x(generated["plot"]) == document["steps"][-1]["t"]
    assert "sample" in generated["status"] and "attribute" in generated["status"]


def test_captions_match_the_engine(generated: dict, reference, running_app, index_name) -> None:  # noqa: F811
    index = running_app.explorer.indexes[index_name]
    document = view(generated["scrub"])
    for step in (STEPS - 1, 3):
        expected = reference.steps[step]
        for sign in ("positive", "negative"):
            rows, result = tiles(document, step, sign), getattr(expected, sign)
            assert [row[0] for row in rows] == result.ids.tolist()
            np.testing.assert_allclose([row[2] for row in rows], result.scores, atol=2e-3)
            labels = [index.class_names[index.train_labels[p]] for p in result.positions]
            assert [row[1] for row in rows] == labels
            assert rows[0][3] == pytest.approx(expected.percentile(int(result.positions[0])), abs=0.06)
            for _row, caption in document["steps"][step][sign]:  # honest negatives: "least aligned" if >= 0
                score = float(CAPTION.match(caption)[4])
                assert caption.startswith("least aligned · ") == (sign == "negative" and score >= 0)


def test_completions_arrive_as_solid_curves_with_a_band(client: Client, generated: dict, running_app) -> None:  # noqa: F811
    payload, plot, status = client.predict(api_name="/rollouts")
    traces = figure(plot)["data"]
    classes = running_app.explorer.class_names
    solid = [trace for trace in traces if trace.get("name") in classes and trace["mode"] == "lines+markers"]
    bands = [trace for trace in traces if trace.get("fill") == "tonexty" and trace.get("stackgroup") is None]
    assert len(solid) == len(classes) == len(bands)
    assert all(10 <= len(trace["x"]) <= 12 and trace["line"]["width"] >= 2 for trace in solid)
    np.testing.assert_allclose(np.sum([trace["y"] for trace in solid], axis=0), 1.0, atol=1e-4)
    proxy = [trace for trace in traces if trace.get("legendgroup") == "x0hat"]
    assert all(trace["visible"] == "legendonly" for trace in proxy)  # off once the completions are in
    assert "16 completions" in status and "solid = 16 completions" in figure(plot)["layout"]["title"]["text"]
    notes = [step["note"] for step in view(payload)["steps"]]
    assert all("the completions " in note for note in notes)


def test_select_influencer_shows_its_score_at_every_step(client: Client, generated: dict) -> None:
    step = STEPS // 2
    document = view(generated["scrub"])
    for sign, rank in (("positive", 0), ("negative", 2)):
        image, plot, text = client.predict(step, sign, rank, api_name="/select_influencer")
        chosen = tiles(document, step, sign)[rank]
        assert picture(image).size[0] >= 160
        (trace,) = figure(plot)["data"]
        assert len(trace["y"]) == STEPS
        assert trace["y"][step] == pytest.approx(chosen[2], abs=2e-3)
        assert f"id {chosen[0]}" in text and sign in text


def test_sessions_do_not_share_trajectories(
    running_app, index_name: str, client: Client, generated: dict
) -> None:  # noqa: F811
    other = Client(running_app.url, verbose=False)
    other.predict(SEED + 1, STEPS, TOP_K, index_name, "", 1.0, api_name="/generate")
    text = client.predict(STEPS - 1, "positive", 0, api_name="/select_influencer")[2]
    assert f"id {tiles(view(generated['scrub']), STEPS - 1, 'positive')[0][0]} " in text


def test_reattribute_with_another_top_k_keeps_the_trajectory(running_app, index_name: str) -> None:  # noqa: F811
    other = Client(running_app.url, verbose=False)
    before = dict(
        zip(GENERATE_OUTPUTS, other.predict(SEED, STEPS, TOP_K, index_name, "", 1.0, api_name="/generate"))
    )
    after = dict(
        zip(REATTRIBUTE_OUTPUTS, other.predict(STEPS - 1, index_name, 3, api_name="/reattribute_top_k"))
    )
    shown = tiles(view(after["scrub"]), STEPS - 1, "positive")
    assert [row[:3] for row in shown] == [
        row[:3] for row in tiles(view(before["scrub"]), STEPS - 1, "positive")[:3]
    ]
    assert (
        after["status"].split(" · sample")[0] == before["status"].split(" · sample")[0]
    )  # same seed and steps


def test_several_indexes_offer_a_method_dropdown(app_assets, tmp_path: Path) -> None:  # noqa: F811
    model_dir, index_dir = app_assets
    (tmp_path / "second").symlink_to(Path(index_dir).resolve(), target_is_directory=True)
    app = start_app(model_dir, index_dir, tmp_path / "second")
    first, second = app.explorer.indexes
    client = Client(app.url, verbose=False)
    client.predict(SEED, STEPS, TOP_K, first, "", 1.0, api_name="/generate")
    status = dict(
        zip(REATTRIBUTE_OUTPUTS, client.predict(STEPS - 1, second, TOP_K, api_name="/reattribute_index"))
    )
    assert second in status["status"]
    with pytest.raises(AppError, match="not in the list of choices"):  # the dropdown's own check (API only)
        client.predict(STEPS - 1, "no such index", TOP_K, api_name="/reattribute_index")


@pytest.mark.parametrize("seed", [-1, 2**40, "abc", 1.5])
def test_bad_seed_is_a_clear_error_in_the_status_line(client: Client, index_name: str, seed) -> None:
    out = dict(
        zip(GENERATE_OUTPUTS, client.predict(seed, STEPS, TOP_K, index_name, "", 1.0, api_name="/generate"))
    )
    assert "**Not done:**" in out["status"] and "seed" in out["status"] and "Traceback" not in out["status"]


def test_select_before_generate_is_a_clear_error(running_app) -> None:  # noqa: F811
    text = Client(running_app.url, verbose=False).predict(3, "positive", 0, api_name="/select_influencer")[2]
    assert "Generate first" in text


def test_typed_top_k_outside_the_range_is_clamped_and_said(running_app, index_name: str) -> None:  # noqa: F811
    other = Client(running_app.url, verbose=False)
    for typed, used in ((0, 1), (500, 32)):
        out = dict(
            zip(
                GENERATE_OUTPUTS, other.predict(SEED, STEPS, typed, index_name, "", 1.0, api_name="/generate")
            )
        )
        assert out["top_k"] == used and len(tiles(view(out["scrub"]), 0, "positive")) == used
        assert f"top-k {typed} is outside 1..32: used {used}" in out["status"]


def test_only_the_documented_endpoint_is_on_the_api_page(client: Client) -> None:
    api = client.view_api(print_info=False, return_format="dict")
    assert list(api["named_endpoints"]) == ["/attribute_trajectory"] and not api["unnamed_endpoints"]
    names = [p["parameter_name"] for p in api["named_endpoints"]["/attribute_trajectory"]["parameters"]]
    assert names == ["seed", "steps", "top_k", "method", "prompt", "guidance", "completions"]


def test_attribute_trajectory_returns_the_pages_ids_and_scores(
    client: Client, generated: dict, reference
) -> None:
    result = client.predict(SEED, STEPS, TOP_K, "", "", 1.0, 4, api_name="/attribute_trajectory")
    document = view(generated["scrub"])
    assert result["seed"] == SEED and len(result["steps"]) == STEPS
    for step in (0, 7, STEPS - 1):
        got = result["steps"][step]
        assert got["t"] == document["steps"][step]["t"] and got["bucket"] == reference.steps[step].bucket
        for sign in ("positive", "negative"):
            shown = tiles(document, step, sign)
            assert [row["id"] for row in got[sign]] == [row[0] for row in shown]
            np.testing.assert_allclose(
                [row["score"] for row in got[sign]], [row[2] for row in shown], atol=5e-4
            )
    curves = result["completions"]
    assert curves["completions"] == 4 and len(curves["t"]) == len(curves["p"]) == len(curves["stderr"])
    np.testing.assert_allclose(np.sum(curves["p"], axis=1), 1.0, atol=1e-3)
    with pytest.raises(AppError, match="top-k 0 is out of range"):
        client.predict(SEED, STEPS, 0, "", "", 1.0, 0, api_name="/attribute_trajectory")


def test_attribute_an_uploaded_image(client: Client, index_name: str, tmp_path: Path, running_app) -> None:  # noqa: F811
    odd = np.zeros((37, 53, 4), dtype=np.uint8)  # RGBA, odd size: the engine converts and resizes
    odd[8:30, 20:30] = 255
    Image.fromarray(odd, mode="RGBA").save(tmp_path / "odd.png")
    seen, positive, negative, status = client.predict(
        handle_file(str(tmp_path / "odd.png")), 100, 5, index_name, "", api_name="/attribute_image"
    )
    assert len(positive) == len(negative) == 5 and "t = 100" in status and "inverted" not in status
    size = running_app.explorer.model.sample_size
    assert picture(seen).size == (size * (160 // size),) * 2
    inverted = 255 - np.asarray(Image.fromarray(odd, mode="RGBA").convert("L"))  # a dark digit on white
    Image.fromarray(inverted).save(tmp_path / "inverted.png")
    seen, _, _, status = client.predict(
        handle_file(str(tmp_path / "inverted.png")), 100, 5, index_name, "", api_name="/attribute_image"
    )
    assert "inverted: the upload has a light background" in status
    assert np.asarray(picture(seen).convert("L"))[0, 0] < 64  # flipped to the training images' dark ground


def test_corrupt_tiny_or_missing_upload_is_a_clear_error_that_clears_the_old_results(
    client: Client, index_name: str, tmp_path: Path
) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    seen, positive, negative, status = client.predict(
        handle_file(str(broken)), 100, 5, index_name, "", api_name="/attribute_image"
    )
    assert (
        "'broken.png' could not be read as an image" in status and seen is None and positive == negative == []
    )
    assert get_upload_folder() not in status  # the upload is named, not the server's temporary path
    Image.new("L", (1, 1), 255).save(tmp_path / "dot.png")
    status = client.predict(
        handle_file(str(tmp_path / "dot.png")), 100, 5, index_name, "", api_name="/attribute_image"
    )[3]
    assert "image 'dot.png' is 1x1 px: upload one at least 8x8 px" in status
    status = client.predict(None, 100, 5, index_name, "", api_name="/attribute_image")[3]
    assert "no image uploaded" in status


def test_the_readme_example_runs_against_the_app(running_app) -> None:  # noqa: F811
    """The README's gradio_client example, as printed, against the real server (its URL swapped in)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    example = re.search(r"```python\n(from gradio_client.*?)```", readme, re.DOTALL)[1]
    namespace: dict = {}
    exec(example.replace("http://127.0.0.1:7860/", running_app.url), namespace)  # noqa: S102
    result = namespace["result"]
    assert result["seed"] == 3 and len(result["steps"]) == 50 and result["completions"]["completions"] == 16
    assert len(result["steps"][20]["positive"]) == 8 and {"id", "label", "score"} <= set(
        result["steps"][20]["positive"][0]
    )
