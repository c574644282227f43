"""The region view, the Bias & memorization tab and the gallery highlight in a real Chromium."""

import re

import pytest
from app_fixtures import (  # noqa: F401  (fixtures; also sets the offline env)
    BROWSER_MARKS,
    CAPTIONS_JS,
    app_assets,
    browser_page,
    running_app,
    wait_for_changed_captions,
)

pytestmark = BROWSER_MARKS

SELECTED_JS = (
    "sel => Array.from(document.querySelectorAll(sel + ' .thumbnail-item'))"
    ".map((e, i) => e.className.includes('selected') ? i : -1).filter(i => i >= 0)"
)
TEXT_JS = "sel => document.querySelector(sel).textContent"


@pytest.fixture(scope="module")
def page(running_app):  # noqa: F811
    with browser_page(running_app.url, height=1600) as page:
        page.get_by_role("button", name="Generate", exact=True).click()
        page.wait_for_function("() => document.querySelectorAll('#positive .caption-label').length === 8")
        # the events that follow Generate (highlight reset, rollouts) have landed before the first click
        page.wait_for_function(
            "() => document.querySelector('#status').textContent.includes('completions (')"
        )
        yield page
        # leave only after the rollouts ended: a browser closed mid-event aborts the server at exit
        page.wait_for_function(
            "() => document.querySelector('#status').textContent.includes('completions (')"
        )


def _scrub_home(page) -> None:
    slider = page.locator("#step-slider input[type=range]")
    slider.focus()
    slider.press("Home")


def test_the_highlight_follows_the_selected_influencer(page) -> None:
    page.locator("#positive .thumbnail-item").nth(2).click()
    page.wait_for_function("() => document.querySelector('#chosen-info').textContent.includes('#3 of')")
    chosen_id = re.search(r"id (\d+)", page.evaluate(TEXT_JS, "#chosen-info"))[1]
    assert page.evaluate(SELECTED_JS, "#positive") == [2]
    before = page.evaluate(CAPTIONS_JS, "#positive")
    _scrub_home(page)
    after = wait_for_changed_captions(page, "#positive", before)
    page.wait_for_function("() => document.querySelector('#chosen-info').textContent.includes('step 0')")
    page.wait_for_timeout(500)  # the highlight event runs after the scrub
    highlighted = page.evaluate(SELECTED_JS, "#positive")
    listed = [i for i, caption in enumerate(after) if re.search(rf"\bid {chosen_id} ", caption)]
    assert highlighted == listed, (highlighted, listed, after)  # the selected image's tile, or none
    assert page.evaluate(SELECTED_JS, "#negative") == []


def test_region_view_attributes_a_clicked_box_and_follows_the_slider(page, running_app) -> None:  # noqa: F811
    size = running_app.explorer.model.sample_size
    page.get_by_text("Region: attribute part of the image").click()
    image = page.locator("#region-image img")
    image.wait_for()
    box = image.bounding_box()
    image.click(position={"x": box["width"] * 0.2, "y": box["height"] * 0.2})
    page.wait_for_function(
        "() => document.querySelector('#region-info').textContent.includes('first corner')"
    )
    image.click(position={"x": box["width"] * 0.8, "y": box["height"] * 0.45})
    field = page.locator("#region-box textarea, #region-box input").first
    page.wait_for_function("el => el.value !== ''", arg=field.element_handle())
    x0, y0, x1, y1 = map(int, field.input_value().split(","))
    assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size // 2 + 1  # a box in the top half
    page.locator("#region-button").click()
    page.wait_for_function("() => document.querySelectorAll('#region-positive .caption-label').length === 8")
    info = page.evaluate(TEXT_JS, "#region-info")
    assert (
        re.search(rf"region {x0},{y0},{x1},{y1} at step \d+ ", info) and "also in the whole image's" in info
    )
    shared = int(re.search(r"(\d+) of 8 positive", info)[1])
    assert 0 <= shared <= 8
    slider = page.locator("#step-slider input[type=range]")
    slider.focus()
    slider.press("End")
    last = int(slider.get_attribute("max"))
    page.wait_for_function(
        "step => document.querySelector('#region-info').textContent.includes('at step ' + step + ' ')",
        arg=last,
    )
    lists = page.evaluate(CAPTIONS_JS, "#region-positive")
    field.fill("0,0,99,4")
    field.press("Enter")
    page.wait_for_function("() => document.querySelector('#region-info').textContent.includes('Not done')")
    assert "region (0, 0, 99, 4) must satisfy" in page.evaluate(TEXT_JS, "#region-info")
    assert page.evaluate(CAPTIONS_JS, "#region-positive") == lists  # the earlier lists stay


def test_bias_and_memorization_tab(page, running_app) -> None:  # noqa: F811
    index = running_app.explorer.indexes[next(iter(running_app.explorer.indexes))]
    page.get_by_role("tab", name="Bias & memorization").click()
    page.wait_for_function("() => document.querySelectorAll('#self-high .caption-label').length === 16")
    page.wait_for_function(
        "() => { const p = document.querySelector('#bias-plot .js-plotly-plot');"
        " return p && p.data.length >= 8; }"
    )
    x = page.evaluate("() => Array.from(document.querySelector('#bias-plot .js-plotly-plot').data[0].x)")
    assert x == [int(t[0]) for t in index.meta.timesteps]
    assert "distinct images per slot with raw TRAK scores" in page.evaluate(TEXT_JS, "#bias-note")
    high = page.evaluate(CAPTIONS_JS, "#self-high")
    scores = [float(re.search(r"self (\d\.\d+)", c)[1]) for c in high]
    low = [float(re.search(r"self (\d\.\d+)", c)[1]) for c in page.evaluate(CAPTIONS_JS, "#self-low")]
    assert scores == sorted(scores, reverse=True) and low == sorted(low) and min(scores) >= max(low)
    page.locator("#self-bucket input").click()
    last = len(index.meta.timesteps) - 1
    page.get_by_role("option", name=f"t = {index.meta.timesteps[last][0]} (bucket {last})").click()
    page.wait_for_function(
        "t => document.querySelector('#self-note').textContent.includes('at t = ' + t)",
        arg=index.meta.timesteps[last][0],
    )
    copy = page.evaluate(TEXT_JS, "#copy-info")
    assert re.search(r"(not )?a near copy", copy) and "of the mean distance to the next" in copy
    assert len(page.evaluate(CAPTIONS_JS, "#copy-pixel")) == 8
