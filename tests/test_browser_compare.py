"""Two methods side by side in a real Chromium: the second method's influencers at the same step, following
the slider, with how many of them the method on screen also lists."""

import pytest
from app_fixtures import BROWSER_MARKS, CAPTIONS_JS, browser_page, start_app, wait_for_changed_captions

from precompute.featurize import FeaturizeOptions, reindex

pytestmark = BROWSER_MARKS


@pytest.fixture(scope="module")
def two_methods(tiny_model_dir, tiny_index_dir, tmp_path_factory):
    """The tiny app with the tiny index and the same features unnormalized (raw TRAK scores)."""
    raw = reindex(tiny_index_dir, tmp_path_factory.mktemp("raw") / "raw", FeaturizeOptions(normalize=False))
    return start_app(tiny_model_dir, tiny_index_dir, raw)


def test_second_method_follows_the_slider(two_methods):
    names = list(two_methods.explorer.indexes)
    with browser_page(two_methods.url) as page:
        page.get_by_role("button", name="Generate", exact=True).click()
        page.wait_for_function("() => document.querySelectorAll('#positive .caption-label').length === 8")
        page.get_by_text("Compare with another method").click()
        page.locator("#compare-index input").click()
        page.get_by_role("option", name=names[1]).click()
        page.wait_for_function(
            "() => document.querySelectorAll('#compare-positive .caption-label').length === 8"
        )
        info = page.locator("#compare-info").text_content()
        assert "positive" in info and f"also listed by {names[0]}" in info
        first = page.evaluate(CAPTIONS_JS, "#compare-positive")
        assert all("score" in c for c in first), "the unnormalized index captions raw scores"
        slider = page.locator("#step-slider input[type=range]")
        slider.focus()
        slider.press("Home")
        wait_for_changed_captions(page, "#compare-positive", first)
        page.wait_for_function(
            "() => document.querySelector('#status').textContent.includes('completions (')"
        )
