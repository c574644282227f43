"""Deep links and export in a real Chromium: a URL with seed, steps, step and top-k reproduces the view, the
step line links to the view on screen, and Export downloads the step's influencers as JSON, CSV and PNG."""

import io
import json
import re

import numpy as np
import pytest
from app_fixtures import (  # noqa: F401  (fixtures; also sets the offline env)
    BROWSER_MARKS,
    CAPTIONS_JS,
    CHROMIUM,
    app_assets,
    running_app,
)
from PIL import Image

from bench.screenshot import CHROMIUM_ARGS
from explorer.web.export import CAPTION, LABEL, TILE, TITLE

pytestmark = BROWSER_MARKS


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def _open(browser, url: str):
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    page.set_default_timeout(60_000)
    page.goto(url)
    return page


def _expected_captions(explorer, seed: int, steps: int, step: int, top_k: int) -> list[str]:
    from explorer.web.handlers import Handlers

    handlers = Handlers(explorer)
    view = json.loads(handlers.generate(None, seed, steps, top_k, None, progress=lambda *a, **k: None).scrub)
    return [caption for _, caption in view["steps"][step]["positive"]]


def test_a_link_reproduces_the_view_and_export_downloads_it(browser, running_app):  # noqa: F811
    page = _open(browser, running_app.url + "?seed=3&steps=12&step=4&top_k=5")
    page.wait_for_function("() => document.querySelectorAll('#positive .caption-label').length === 5")
    page.wait_for_function(
        "() => document.querySelector('#step-line').textContent.includes('step 4 of 11 ·')"
    )
    captions = page.evaluate(CAPTIONS_JS, "#positive")
    assert captions == _expected_captions(running_app.explorer, 3, 12, 4, 5)
    link = page.locator("a", has_text="link to this view").get_attribute("href")
    assert link == "?seed=3&steps=12&step=4&top_k=5"

    page.get_by_role("button", name=re.compile("^Export this step")).click()
    page.wait_for_function("() => document.querySelectorAll('#exported a').length === 3")
    hrefs = page.eval_on_selector_all("#exported a", "links => links.map(a => a.href)")
    document = json.loads(page.request.get(next(h for h in hrefs if h.endswith(".json"))).text())
    assert document["seed"] == 3 and document["step"] == 4 and document["view"] == link
    positive = [row for row in document["influencers"] if row["sign"] == "positive"]
    assert [f"id {row['id']} · label {row['label']}" for row in positive] == [
        " · ".join(caption.split(" · ")[:2]) for caption in captions
    ]
    png = Image.open(io.BytesIO(page.request.get(next(h for h in hrefs if h.endswith(".png"))).body()))
    assert png.size == (LABEL + 5 * TILE, TITLE + 3 * (TILE + CAPTION))  # title band, labelled rows
    title, labels = np.asarray(png.convert("L")), np.asarray(png.convert("L"))[TITLE:, :LABEL]
    assert (title[:TITLE] < 128).sum() > 50 and (labels < 128).sum() > 50  # text drawn in both
    assert page.locator("a", has_text="link to this view").get_attribute("href") == link  # the line stays
    assert "exported step 4" in page.locator("#export-note").text_content()
    page.close()


def test_a_bad_link_says_what_is_wrong(browser, running_app):  # noqa: F811
    page = _open(browser, running_app.url + "?seed=-5&steps=12")
    page.wait_for_function(
        "() => { const s = document.querySelector('#status');"
        " return s && s.textContent.includes('Not done'); }"
    )
    assert "seed -5 is out of range" in page.locator("#status").text_content()
    page.close()
