"""Shared fixtures for the web-app tests: one real app on 127.0.0.1, launched once per test run.

Import this module before gradio (it sets the offline environment). The assets come from the
`tiny_assets` fixture of tests/conftest.py when it exists ((model_dir, index_dir) of a tiny
digits model and index); otherwise from $EXPLORER_TEST_MODEL and $EXPLORER_TEST_INDEX.
"""

import atexit
import contextlib
import os
import socket
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"

import pytest  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
BROWSER_MARKS = [  # pytestmark of every real-browser test file
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium: install it with tests/setup.sh"),
]
CAPTIONS_JS = "sel => Array.from(document.querySelectorAll(sel + ' .caption-label')).map(e => e.textContent)"


@contextlib.contextmanager
def browser_page(url: str, height: int = 1400, timeout_ms: int = 60_000):
    """A page of Debian's headless Chromium (the screenshot tool's offline flags) opened at url."""
    from playwright.sync_api import sync_playwright

    from bench.screenshot import CHROMIUM_ARGS

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": height})
            page.set_default_timeout(timeout_ms)
            page.goto(url)
            yield page
        finally:
            browser.close()


def wait_for_changed_captions(page, selector: str, before: list[str]) -> list[str]:
    """Wait until the captions under selector differ from before; return them."""
    page.wait_for_function(
        "([sel, before]) => JSON.stringify(Array.from(document.querySelectorAll(sel + ' .caption-label'))"
        ".map(e => e.textContent)) !== JSON.stringify(before)",
        arg=[selector, before],
    )
    return page.evaluate(CAPTIONS_JS, selector)


@dataclass
class RunningApp:
    url: str
    explorer: object  # explorer.attribution.Explorer
    demo: object  # gradio.Blocks


_apps: dict[tuple[str, ...], RunningApp] = {}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_app(model_dir: str | Path, *index_dirs: str | Path) -> RunningApp:
    """Load the explorer and launch the UI in this process (non-blocking); reused across test files."""
    key = (str(model_dir), *map(str, index_dirs))
    if key not in _apps:
        from explorer.attribution import Explorer
        from explorer.web import ui

        explorer = Explorer.from_dirs(model_dir, list(index_dirs))
        demo = ui.build(explorer)
        _, url, _ = ui.launch(demo, "127.0.0.1", free_port(), prevent_thread_lock=True, quiet=True)
        atexit.register(demo.close)
        _apps[key] = RunningApp(url.rstrip("/") + "/", explorer, demo)
    return _apps[key]


@pytest.fixture(scope="session")
def app_assets(tiny_assets: tuple[Path, Path]) -> tuple[Path, Path]:
    """(model_dir, index_dir): $EXPLORER_TEST_MODEL/$EXPLORER_TEST_INDEX when both are set (a quick
    way to test the app on assets built once), else conftest's `tiny_assets`."""
    if os.environ.get("EXPLORER_TEST_MODEL") and os.environ.get("EXPLORER_TEST_INDEX"):
        return Path(os.environ["EXPLORER_TEST_MODEL"]), Path(os.environ["EXPLORER_TEST_INDEX"])
    return tiny_assets


@pytest.fixture(scope="session")
def running_app(app_assets: tuple[Path, Path]) -> RunningApp:
    """The real app, served on 127.0.0.1 at a free port."""
    return start_app(*app_assets)
