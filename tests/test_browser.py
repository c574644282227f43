"""The page in a real headless Chromium: load it, click Generate, move the step slider with the
keyboard, and check that the influencer galleries and the likelihood plot change.

Needs Debian's chromium at /usr/bin/chromium (tests/setup.sh installs it; CI runs this test).
"""

import re
from pathlib import Path

import numpy as np
import pytest
from app_fixtures import app_assets, running_app  # noqa: F401  (fixtures; also sets the offline env)

from bench.screenshot import CHROMIUM_ARGS  # the same offline flags as the screenshot tool
from explorer.web.handlers import NO_INFLUENCER, ROLLOUT_COMPLETIONS

CHROMIUM = Path("/usr/bin/chromium")
TIMEOUT_MS = 60_000

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason="no /usr/bin/chromium: install it with tests/setup.sh (apt-get install chromium)",
    ),
]

CAPTIONS_JS = "sel => Array.from(document.querySelectorAll(sel + ' .caption-label')).map(e => e.textContent)"
MARKER_JS = (
    "() => { const p = document.querySelector('#likelihood .js-plotly-plot');"
    " return p && p.layout.shapes.length ? p.layout.shapes[0].x0 : null; }"
)
TRACES_JS = (
    "() => { const p = document.querySelector('#likelihood .js-plotly-plot'); return p ? p.data.length : 0; }"
)
TRACE_LINES_JS = (
    "() => document.querySelector('#likelihood .js-plotly-plot').data"
    ".map(t => ({name: t.name, mode: t.mode, group: t.legendgroup, visible: t.visible, y: Array.from(t.y)}))"
)
CHOSEN_INFO_JS = "() => document.querySelector('#chosen-info').textContent.trim()"
SCORE_CURVE_JS = (  # the selected influencer's score curve: the one plot outside #likelihood
    "() => { const p = Array.from(document.querySelectorAll('.js-plotly-plot'))"
    ".find(e => !e.closest('#likelihood'));"
    " return p && p.data.length ? {x: Array.from(p.data[0].x), marker: p.layout.shapes[0].x0} : null; }"
)


@pytest.fixture(scope="module")
def page(running_app):  # noqa: F811
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.set_default_timeout(TIMEOUT_MS)
        page.outside_requests = []
        page.on(
            "request",
            lambda request: (
                None
                if request.url.startswith((running_app.url, "data:", "blob:"))
                else page.outside_requests.append(request.url)
            ),
        )
        page.goto(running_app.url)
        yield page
        browser.close()


@pytest.fixture(scope="module")
def timesteps(running_app) -> list[int]:  # noqa: F811
    """The train timesteps of the page's default 50 sampler steps."""
    from explorer.sampler import make_sampling_scheduler

    return make_sampling_scheduler(running_app.explorer.model, 50).timesteps.tolist()


@pytest.fixture(scope="module")
def generated(page, running_app) -> dict:  # noqa: F811
    """Click Generate once; wait for both galleries and the likelihood curves."""
    classes = len(running_app.explorer.class_names)
    page.get_by_role("button", name="Generate", exact=True).click()
    page.wait_for_function(
        "() => document.querySelectorAll('#positive .caption-label').length === 8"
        f" && ({TRACES_JS})() >= {classes}"
    )
    return {
        "positive": page.evaluate(CAPTIONS_JS, "#positive"),
        "negative": page.evaluate(CAPTIONS_JS, "#negative"),
        "marker": page.evaluate(MARKER_JS),
    }


def shown_timestep(page) -> int:
    """The train timestep the step line shows."""
    return int(re.search(r"· t = (\d+) ·", page.locator("#step-line").text_content()).group(1))


def wait_until_changed(page, js: str, before, argument=None) -> None:
    page.wait_for_function(
        f"([arg, before]) => JSON.stringify(({js})(arg)) !== JSON.stringify(before)", arg=[argument, before]
    )


def test_generate_then_scrub_changes_galleries_and_plot(page, generated: dict, timesteps: list[int]) -> None:
    captions = generated["positive"] + generated["negative"]
    assert len(captions) == 16 and all(
        re.match(r"^(least aligned · )?id \d+ · label \S+ · cos [+-]\d", caption) for caption in captions
    )
    assert generated["marker"] == timesteps[-1]  # the last step is shown first

    slider = page.locator("#step-slider input[type=range]")
    slider.focus()
    slider.press("Home")  # the noisiest step, by keyboard: fires the slider's input and change events
    page.wait_for_function(f"() => ({MARKER_JS})() === {timesteps[0]}")
    wait_until_changed(page, CAPTIONS_JS, generated["positive"], "#positive")
    scrubbed = page.evaluate(CAPTIONS_JS, "#positive")
    assert len(scrubbed) == 8 and scrubbed != generated["positive"]

    for _ in range(5):  # quick moves: only the last one has to land (trigger_mode="always_last")
        slider.press("ArrowRight")
    page.wait_for_function(f"() => ({MARKER_JS})() === {timesteps[5]}")
    assert (
        f"step 5 of {len(timesteps) - 1} · t = {timesteps[5]} ·" in page.locator("#step-line").text_content()
    )


def test_rollout_curves_appear_when_ready(page, generated: dict, running_app) -> None:  # noqa: F811
    classes = running_app.explorer.class_names
    page.wait_for_function("() => document.querySelector('#status').textContent.includes('completions (')")
    solid_js = f"() => ({TRACE_LINES_JS})().filter(t => t.mode === 'lines+markers').length"
    page.wait_for_function(f"() => ({solid_js})() === {len(classes)}")
    traces = page.evaluate(TRACE_LINES_JS)
    solid = [trace for trace in traces if trace["mode"] == "lines+markers"]
    assert [trace["name"] for trace in solid] == classes  # the completions: one solid curve per class
    np.testing.assert_allclose(np.sum([trace["y"] for trace in solid], axis=0), 1.0, atol=1e-3)
    proxy = [trace for trace in traces if trace["group"] == "x0hat"]
    assert len(proxy) == len(classes) and all(t["visible"] == "legendonly" for t in proxy)  # off: unreliable
    status = page.locator("#status").text_content()
    assert f"× {ROLLOUT_COMPLETIONS} completions" in status and "computing" not in status
    assert "the completions " in page.locator("#step-note").text_content()  # the step's note reads them
    assert page.evaluate(MARKER_JS) == shown_timestep(page)  # the new plot keeps the step marker


def test_clicking_an_influencer_shows_when_it_mattered(page, generated: dict, timesteps: list[int]) -> None:
    caption = page.evaluate(CAPTIONS_JS, "#positive")[0]
    timestep = shown_timestep(page)
    page.locator("#positive button.thumbnail-item").first.click()
    page.wait_for_function(
        f"() => !({CHOSEN_INFO_JS})().includes({NO_INFLUENCER!r})"
    )  # not while pending either
    info = page.evaluate(CHOSEN_INFO_JS)
    step = timesteps.index(timestep)
    assert f"positive influencer at step {step} (t = {timestep}), #1 of the positive list: {caption}." in info
    assert re.search(r"Its score is most positive at step \d+ \(t = \d+, score -?\d", info)
    page.wait_for_function(f"() => ({SCORE_CURVE_JS})() !== null")
    curve = page.evaluate(SCORE_CURVE_JS)
    assert curve["x"] == timesteps and curve["marker"] == timestep  # its score at every step, this one marked

    slider = page.locator("#step-slider input[type=range]")  # scrubbing keeps the selection, at the new step
    slider.focus()
    slider.press("ArrowLeft")
    page.wait_for_function(
        f"() => ({CHOSEN_INFO_JS})().includes('at step {step - 1} (t = {timesteps[step - 1]})')"
    )
    page.wait_for_function(f"() => ({SCORE_CURVE_JS})().marker === {timesteps[step - 1]}")
    assert caption.split(" · ")[0] + " · " in page.evaluate(CHOSEN_INFO_JS)  # the same image ("id N · ")


def test_a_bad_seed_leaves_the_page_as_it_was(page, generated: dict) -> None:
    captions = page.evaluate(CAPTIONS_JS, "#positive")
    seed = page.get_by_label(re.compile(r"^seed \(0 to")).first
    seed.fill("-5")
    page.get_by_role("button", name="Generate", exact=True).click()
    page.wait_for_function("() => document.querySelector('#status').textContent.includes('Not done')")
    assert "seed -5" in page.locator("#status").text_content()
    assert page.evaluate(CAPTIONS_JS, "#positive") == captions  # the galleries keep the last good run
    assert "Still shown: seed 0 " in page.locator("#status").text_content()  # and the status says whose
    assert page.locator(".error").count() == 0  # no red error pills over the outputs
    seed.fill("0")


def test_clicking_the_trajectory_strip_jumps_to_that_step(
    page, generated: dict, timesteps: list[int]
) -> None:
    # the strip's third thumbnail (explorer.web.handlers.Session.strip_steps)
    step = int(np.linspace(0, len(timesteps) - 1, 10).round()[2])
    thumbnail = page.locator(".strip button.thumbnail-item").nth(2)
    assert thumbnail.locator(".caption-label").text_content() == f"t={timesteps[step]}"
    before = page.evaluate(MARKER_JS)
    assert before != timesteps[step], "the page is already at the step this test jumps to"
    from playwright.sync_api import (
        expect,
    )  # with the other playwright import: only where the browser tests run

    thumbnail.click()
    wait_until_changed(page, MARKER_JS, before)
    assert page.evaluate(MARKER_JS) == timesteps[step]
    expect(page.locator("#step-line")).to_contain_text(f"step {step} of {len(timesteps) - 1} ·")
    assert page.locator("#step-slider input[type=range]").input_value() == str(step)


def test_page_fetches_nothing_from_outside(page, generated: dict) -> None:
    assert page.outside_requests == []
