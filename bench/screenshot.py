"""Screenshots of the explorer: the page after generating, scrubbing and selecting an influencer
(docs/screenshot.png), then the region view, the Bias & memorization tab and, with --compare, two methods
side by side (docs/screenshot_region.png, _bias.png, _compare.png).

    python -m bench.screenshot                      # shipped default (assets/), else --model/--index
    python -m bench.screenshot --model M --index I --seed 3 --step 18
    python -m bench.screenshot --compare runs/loss512   # a second index for the compare view

The README's compare shot used `precompute featurize --output loss --proj-dim 512` as the second index, and
its other shots a run without --compare (a second index adds the method menu to the page).

Runs the real app on 127.0.0.1 and drives Debian's chromium (/usr/bin/chromium) with Playwright.
"""

import argparse
import os
import socket
import time
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"
ROOT = Path(__file__).resolve().parents[1]

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default=str(ROOT / "assets/model"), help="model directory (default: the shipped one)"
    )
    parser.add_argument(
        "--index", default=str(ROOT / "assets/index"), help="index directory (default: the shipped one)"
    )
    parser.add_argument("--out", default=str(ROOT / "docs/screenshot.png"))
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--step", type=int, default=28, help="step to scrub to (0 = pure noise)")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--region", default="0,0,16,8", help="box of the region view (model pixels)")
    parser.add_argument(
        "--compare", default=None, help="a second index directory: also shoot the compare view"
    )
    args = parser.parse_args()

    from playwright.sync_api import sync_playwright

    from explorer.attribution import Explorer
    from explorer.web import ui

    explorer = Explorer.from_dirs(args.model, [args.index, *([args.compare] if args.compare else [])])
    demo = ui.build(explorer)
    _, url, _ = ui.launch(demo, "127.0.0.1", free_port(), prevent_thread_lock=True, quiet=True)
    classes = len(explorer.class_names)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000}, device_scale_factor=1)
            page.set_default_timeout(180_000)
            page.goto(url)
            page.get_by_role("button", name="Generate", exact=True).wait_for()  # the page has rendered
            seed = page.get_by_label(f"seed (0 to {2**31 - 1})")
            seed.fill(str(args.seed))
            seed.press("Enter")
            page.get_by_role("button", name="Generate", exact=True).click()
            page.wait_for_function(
                "() => document.querySelector('#status').textContent.includes('completions (')"
            )
            page.wait_for_function(  # the completions' solid curves, one per class
                f"() => {{ const p = document.querySelector('#likelihood .js-plotly-plot');"
                f" return p && p.data.filter(t => t.mode === 'lines+markers').length === {classes}; }}"
            )
            slider = page.locator("#step-slider input[type=range]")
            slider.focus()
            slider.press("Home")
            for _ in range(args.step):
                slider.press("ArrowRight")
            page.wait_for_function(
                f"() => document.querySelector('#step-line').textContent.includes('step {args.step} of')"
            )
            time.sleep(1.0)  # let the last scrub's images load
            page.locator("#positive button.thumbnail-item").first.click()
            page.wait_for_function(
                "() => document.querySelector('#chosen-info').textContent.includes('#1 of the positive list')"
            )
            time.sleep(1.0)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=args.out, full_page=True)
            stem = Path(args.out).with_suffix("")
            shoot_region(page, args.region, f"{stem}_region.png")
            if args.compare:
                shoot_compare(page, list(explorer.indexes)[1], f"{stem}_compare.png")
            shoot_bias(page, f"{stem}_bias.png")
            browser.close()
    finally:
        demo.close()
    print(f"wrote {args.out} (model {args.model}, index {args.index}, seed {args.seed}, step {args.step})")


def shoot_region(page, box: str, out: str) -> None:
    """The region accordion after attributing `box` at the step on screen."""
    page.get_by_text("Region: attribute part of the image").click()
    field = page.locator("#region-box textarea, #region-box input").first
    field.fill(box)
    page.locator("#region-button").click()
    page.wait_for_function("() => document.querySelector('#region-info').textContent.includes('also in the')")
    time.sleep(1.0)
    page.locator("#region-info").locator("xpath=ancestor::div[contains(@class, 'accordion')][1]").screenshot(
        path=out
    )
    print(f"wrote {out}")


def shoot_compare(page, name: str, out: str) -> None:
    page.get_by_text("Compare with another method").click()
    page.locator("#compare-index input").click()
    page.get_by_role("option", name=name).click()
    page.wait_for_function(
        "() => document.querySelector('#compare-info').textContent.includes('also listed')"
    )
    time.sleep(1.0)
    page.locator("#compare-info").locator("xpath=ancestor::div[contains(@class, 'accordion')][1]").screenshot(
        path=out
    )
    print(f"wrote {out}")


def shoot_bias(page, out: str) -> None:
    page.get_by_role("tab", name="Bias & memorization").click()
    page.wait_for_function("() => document.querySelectorAll('#self-high .caption-label').length === 16")
    page.wait_for_function("() => document.querySelector('#bias-plot .js-plotly-plot')")
    time.sleep(1.5)
    page.screenshot(path=out, full_page=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
