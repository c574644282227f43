"""The page's fixes in a real Chromium: progress that moves, thumbnails shown whole with their caption below,
positive and negative galleries told apart by colour, typed values clamped and said, the legend explained,
and an upload shown at display size with errors that name the file."""

import re

import numpy as np
import pytest
from app_fixtures import (  # noqa: F401  (fixtures; also sets the offline env)
    BROWSER_MARKS,
    CAPTIONS_JS,
    app_assets,
    browser_page,
    running_app,
)
from PIL import Image

from explorer.web.handlers import IMAGE_PX, UI_MAX_TOP_K

pytestmark = BROWSER_MARKS

WATCH_PROGRESS_JS = """() => {
    window.progressTexts = [];
    window.overlaps = 0;
    const box = document.querySelector('#progress').closest('.block') || document.querySelector('#progress');
    const status = document.querySelector('#status');
    new MutationObserver(() => {
        window.progressTexts.push(box.textContent);
        const a = box.getBoundingClientRect(), b = status.getBoundingClientRect();
        if (a.bottom > b.top + 1 && b.bottom > a.top + 1) window.overlaps += 1;  // drawn over the status
    }).observe(box, {subtree: true, childList: true, characterData: true});
}"""
GEOMETRY_JS = """sel => Array.from(document.querySelectorAll(sel + ' .thumbnail-item')).map(tile => {
    const img = tile.querySelector('img'), caption = tile.querySelector('.caption-label');
    const i = img.getBoundingClientRect(), c = caption.getBoundingClientRect();
    const t = tile.getBoundingClientRect();
    return {imgTop: i.top, imgBottom: i.bottom, imgLeft: i.left, imgRight: i.right, captionTop: c.top,
            tileTop: t.top, tileBottom: t.bottom, tileLeft: t.left, tileRight: t.right,
            fit: getComputedStyle(img).objectFit, natural: [img.naturalWidth, img.naturalHeight]};
})"""
BORDER_JS = "sel => getComputedStyle(document.querySelector(sel)).borderLeftColor"


@pytest.fixture(scope="module")
def page(running_app):  # noqa: F811
    with browser_page(running_app.url) as page:
        page.locator("#status").wait_for()
        page.evaluate(WATCH_PROGRESS_JS)
        page.get_by_role("button", name="Generate", exact=True).click()
        page.wait_for_function("() => document.querySelectorAll('#positive .caption-label').length === 8")
        page.wait_for_function(
            "() => document.querySelector('#status').textContent.includes('completions (')"
        )
        yield page


def test_progress_moves_on_its_own_line_never_over_the_status(page) -> None:
    """Generate's stages and the completions' sampler steps are reported as they run, on the progress line
    above the status, which stays readable."""
    shown = {
        m[0]
        for text in page.evaluate("() => window.progressTexts")
        for m in re.finditer(r"sampling \d+ steps|attributing all \d+ steps|sampler step \d+ of \d+", text)
    }
    assert any(s.startswith("sampler step") for s in shown) and len(shown) >= 3, sorted(shown)
    assert page.evaluate("() => window.overlaps") == 0


def test_thumbnails_show_the_whole_image_with_the_caption_below(page) -> None:
    for selector in ("#positive", "#negative"):
        tiles = page.evaluate(GEOMETRY_JS, selector)
        assert len(tiles) == 8
        for tile in tiles:
            assert tile["fit"] == "contain" and tile["natural"][0] == tile["natural"][1]
            assert tile["captionTop"] >= tile["imgBottom"] - 1, "the caption covers the digit"
            assert tile["tileTop"] - 1 <= tile["imgTop"] and tile["imgBottom"] <= tile["tileBottom"] + 1
            assert tile["tileLeft"] - 1 <= tile["imgLeft"] and tile["imgRight"] <= tile["tileRight"] + 1
    positive, negative = page.evaluate(BORDER_JS, "#positive"), page.evaluate(BORDER_JS, "#negative")
    assert positive != negative and "rgba(0, 0, 0, 0)" not in (positive, negative)


def test_the_plot_and_the_legend_say_what_things_are(page) -> None:
    title = page.wait_for_function(
        "() => { const p = document.querySelector('#likelihood .js-plotly-plot');"
        " return p && p.layout && p.layout.title.text.includes('solid') && p.layout.title.text; }"
    ).json_value()  # the title of the plot with the completions
    assert "solid = 16 completions from x_t" in title and "x0hat" in title
    names = page.evaluate("() => document.querySelector('#likelihood .js-plotly-plot').data.map(t => t.name)")
    assert "x0hat classifier (unreliable at high noise)" in names
    legend = page.locator("#legend").text_content()
    for term in (
        "cosine of the whitened gradients",
        "percentile",
        "bucket",
        "negative influencer",
        "least aligned",
    ):
        assert term in legend
    assert re.match(r"^t = \d+: (high|medium|low) noise", page.locator("#step-note").text_content())
    title, caption = page.evaluate(
        "() => { const t = document.querySelector('#positive .dax-tile');"
        " return [t.title, t.querySelector('.caption-label').textContent]; }"
    )
    assert title == caption  # the whole caption as a tooltip too


def test_a_typed_top_k_out_of_range_is_clamped_and_said(page) -> None:
    box = page.locator("#top-k input")
    for typed, used in (("0", 1), ("500", UI_MAX_TOP_K)):
        box.fill(typed)
        box.press("Enter")
        page.wait_for_function(
            f"() => document.querySelectorAll('#positive .caption-label').length === {used}"
        )
        page.wait_for_function(f"() => document.querySelector('#status').textContent.includes('{typed}')")
        assert box.input_value() == str(used)
        assert re.search(rf"top-k {typed}\b.*\b{used}\b", page.locator("#status").text_content())
    box.fill("20")  # three rows of tiles: every one shows inside its gallery, none cut or scrolled away
    box.press("Enter")
    page.wait_for_function("() => document.querySelectorAll('#positive .caption-label').length === 20")
    bottom = page.evaluate("() => document.querySelector('#positive').getBoundingClientRect().bottom")
    assert all(tile["tileBottom"] <= bottom + 1 for tile in page.evaluate(GEOMETRY_JS, "#positive"))
    box.fill("8")
    box.press("Enter")
    page.wait_for_function("() => document.querySelectorAll('#positive .caption-label').length === 8")


def test_an_upload_shows_at_display_size_and_a_bad_one_names_the_file(page, tmp_path) -> None:
    page.get_by_role("tab", name="Attribute an image").click()
    digit = tmp_path / "my digit.png"
    Image.fromarray((np.eye(24) * 255).astype(np.uint8)).save(digit)
    page.locator("input[type=file]").first.set_input_files(str(digit))
    page.get_by_role("button", name="Attribute", exact=True).click()
    page.wait_for_function("() => document.body.textContent.includes('attributed in')")
    seen = page.locator("#seen img")
    assert seen.evaluate("img => img.naturalWidth") == IMAGE_PX  # upscaled, not the model's 8 or 16 pixels
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    page.locator("input[type=file]").first.set_input_files(str(broken))
    page.get_by_role("button", name="Attribute", exact=True).click()
    page.wait_for_function("() => document.body.textContent.includes('Not done')")
    status = page.locator("#image-status").text_content()
    assert "broken.png" in status and "/tmp/" not in status and "attributed in" not in status
    assert page.evaluate(CAPTIONS_JS, "#image-positive") == []  # the earlier image's results are cleared
    page.get_by_role("tab", name="Generate & scrub").click()
    assert len(page.evaluate(CAPTIONS_JS, "#positive")) == 8


def test_typed_sampler_steps_beyond_the_slider_say_what_was_used(page) -> None:
    steps = page.locator("#steps input[type=number]")
    steps.fill("100000")
    steps.press("Enter")
    page.get_by_role("button", name="Generate", exact=True).click()
    page.wait_for_function("() => document.querySelector('#status').textContent.includes('200 steps')")
    assert steps.input_value() == "200"
    page.wait_for_function("() => document.querySelector('#status').textContent.includes('completions (')")
