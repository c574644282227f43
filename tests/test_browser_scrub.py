"""Issue 33 in a real Chromium: the step view switches steps in the browser (no server call, no DOM growth),
the influencer-class plot, a refusal that stays, a link beyond the slider that is clamped and said, a second
Generate during the completions that does not wait for them, and /attribute_trajectory returning what the
page shows."""

import contextlib
import json
import logging
import re
import time

import numpy as np
import pytest
from app_fixtures import (  # noqa: F401  (fixtures; also sets the offline env)
    BROWSER_MARKS,
    CAPTIONS_JS,
    app_assets,
    browser_page,
    running_app,
    wait_for_changed_captions,
)
from gradio_client import Client
from playwright.sync_api import Error as PlaywrightError

pytestmark = BROWSER_MARKS

STATUS_JS = "() => document.querySelector('#status').textContent"
NODES_JS = "() => document.getElementsByTagName('*').length"
SHARES_JS = (
    "() => { const p = document.querySelector('#likelihood .js-plotly-plot'); return p ? p.data"
    ".filter(t => t.stackgroup === 'shares').map(t => ({name: t.name, y: Array.from(t.y)})) : []; }"
)


def generate(page, seed: int) -> None:
    seed_box = page.get_by_label(re.compile(r"^seed \(0 to")).first
    seed_box.fill(str(seed))
    page.get_by_role("button", name="Generate", exact=True).click()


def wait_status(page, text: str) -> None:
    page.wait_for_function("t => document.querySelector('#status').textContent.includes(t)", arg=text)


@pytest.fixture(scope="module")
def page(running_app):  # noqa: F811
    with browser_page(running_app.url) as page:
        page.locator("#status").wait_for()
        generate(page, 4)
        wait_status(page, "completions (")  # the completions landed: nothing else is in flight
        yield page


def test_scrubbing_needs_no_server_and_adds_no_nodes(page) -> None:
    """With every new request to the server held unanswered, the keyboard still moves the step view, and 30
    steps back and forth leave the page with as many elements as before."""
    slider = page.locator("#step-slider input[type=range]")
    slider.focus()
    slider.press("ArrowLeft")  # the first move may create nothing: settle the count after it
    page.wait_for_timeout(300)
    before_nodes, held = page.evaluate(NODES_JS), []
    page.route("**/gradio_api/**", lambda route: held.append(route))  # held: not sent on until the view moved
    try:
        captions = page.evaluate(CAPTIONS_JS, "#positive")
        line = page.locator("#step-line").text_content()
        slider.press("Home")
        after = wait_for_changed_captions(page, "#positive", captions)
        assert len(after) == 8 and page.locator("#step-line").text_content() != line
        assert "step 0 of " in page.locator("#step-line").text_content()
        for key in ["ArrowRight"] * 15 + ["ArrowLeft"] * 15:
            slider.press(key)
        page.wait_for_function("() => document.querySelector('#scrub-view .dax-scrub').dataset.step === '0'")
        # 30 steps switched in the browser alone: a step may show a few more or fewer tiles than another,
        # but nothing accumulates per step
        assert abs(page.evaluate(NODES_JS) - before_nodes) < 30
        assert held, "the slider's server follow-up was sent (and held): the view did not wait for it"
    finally:
        for route in held:  # sent on now (one that playwright already let through is skipped)
            try:
                route.continue_()
            except PlaywrightError:
                pass
        page.unroute("**/gradio_api/**")
    page.wait_for_timeout(300)
    # the held server follow-ups re-render a few panels once (a handful of elements either way), but
    # nothing grows with the 30 steps scrubbed
    assert abs(page.evaluate(NODES_JS) - before_nodes) < 30


def test_the_influencer_class_plot_is_there(page, running_app) -> None:  # noqa: F811
    index = running_app.explorer.indexes[next(iter(running_app.explorer.indexes))]
    shares = page.evaluate(SHARES_JS)
    assert [trace["name"] for trace in shares] == [f"{name} (influencers)" for name in index.class_names]
    np.testing.assert_allclose(np.sum([trace["y"] for trace in shares], axis=0), 1.0, atol=1e-6)
    annotations = page.evaluate(
        "() => document.querySelector('#likelihood .js-plotly-plot').layout.annotations.map(a => a.text)"
    )
    assert "share of the top-k positive influencers in each class" in annotations


def test_a_refusal_stays_on_the_page(page) -> None:
    generate(page, 5)
    wait_status(page, "seed 5 ")
    generate(page, -1)  # while seed 5's completions run
    wait_status(page, "Not done")
    time.sleep(15)
    status = page.evaluate(STATUS_JS)
    assert "Not done: seed -1 is out of range" in status and "Still shown: seed 5 " in status
    assert "nothing generated yet" not in status


def test_a_second_generate_does_not_wait_for_the_completions(page, caplog) -> None:
    """At 200 sampler steps the completions take seconds: a Generate clicked while they run stops them (the
    server says so) and returns about as fast as one clicked with nothing in flight, not after them."""
    caplog.set_level(logging.INFO, logger="explorer.web.handlers")
    steps = page.locator("#steps input[type=number]")
    steps.fill("200")
    steps.press("Enter")
    generate(page, 6)
    wait_status(page, "seed 6 · 200 steps")
    wait_status(page, "completions (")
    completions_s = float(re.search(r"completions\) ([\d.]+) s", page.evaluate(STATUS_JS))[1])
    assert completions_s > 1.5, f"completions took {completions_s} s: too short to tell waiting from not"
    generate(page, 7)
    wait_status(page, "seed 7 ")
    time.sleep(0.3)  # seed 7's completions are running now
    assert "computing" in page.evaluate(STATUS_JS)
    started = time.perf_counter()
    generate(page, 8)
    wait_status(page, "seed 8 ")
    second_s = time.perf_counter() - started
    assert "seed 7" not in page.evaluate(STATUS_JS)
    wait_status(page, "completions (")
    started = time.perf_counter()
    generate(page, 9)  # nothing in flight
    wait_status(page, "seed 9 ")
    alone_s = time.perf_counter() - started
    assert second_s < alone_s + max(1.5, 0.75 * completions_s), (second_s, alone_s, completions_s)
    assert "completions of seed 7 stopped by a newer Generate" in caplog.text
    wait_status(page, "completions (")


@contextlib.contextmanager
def another_page(page, url: str):
    """A second page in the module's browser (one Playwright per thread)."""
    other = page.context.browser.new_page(viewport={"width": 1400, "height": 1400})
    other.set_default_timeout(60_000)
    other.goto(url)
    try:
        yield other
    finally:
        other.close()


def test_a_link_beyond_the_slider_is_clamped_and_generate_still_works(page, running_app) -> None:  # noqa: F811
    with another_page(page, running_app.url + "?seed=3&steps=300&step=999&top_k=4") as page:
        page.locator("#status").wait_for()
        wait_status(page, "seed 3 ")
        status = page.evaluate(STATUS_JS)
        assert "sampler steps 300 is outside 10..200: used 200" in status
        assert "step 999 is outside 0..199: used 199" in status
        assert "step 199 of 199" in page.locator("#step-line").text_content()
        assert page.locator("#steps input[type=number]").input_value() == "200"
        wait_status(page, "completions (")
        generate(page, 4)
        wait_status(page, "seed 4 · 200 steps")
        assert "Not done" not in page.evaluate(STATUS_JS) and page.locator(".toast-body").count() == 0


def test_attribute_trajectory_returns_what_the_page_shows(page, running_app) -> None:  # noqa: F811
    seed, steps, step, top_k = 12, 14, 5, 6
    with another_page(
        page, running_app.url + f"?seed={seed}&steps={steps}&step={step}&top_k={top_k}"
    ) as page:
        page.locator("#status").wait_for()
        page.wait_for_function(
            f"() => document.querySelectorAll('#negative .caption-label').length === {top_k}"
        )
        page.wait_for_function(
            "s => document.querySelector('#step-line').textContent.includes(s)", arg=f"step {step} of"
        )
        shown = {sign: page.evaluate(CAPTIONS_JS, f"#{sign}") for sign in ("positive", "negative")}
        wait_status(page, "completions (")
    result = Client(running_app.url, verbose=False).predict(
        seed, steps, top_k, "", "", 1.0, 0, api_name="/attribute_trajectory"
    )
    got = result["steps"][step]
    assert result["completions"] is None and json.dumps(result)  # plain JSON
    for sign, captions in shown.items():
        ids = [int(re.search(r"id (\d+) ", caption)[1]) for caption in captions]
        scores = [float(re.search(r" ([+-]\d+\.\d+) · p", caption)[1]) for caption in captions]
        assert [row["id"] for row in got[sign]] == ids
        np.testing.assert_allclose([row["score"] for row in got[sign]], scores, atol=5e-4)
