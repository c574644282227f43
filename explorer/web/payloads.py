"""The handlers' plumbing: outputs serialized for events that run with postprocess=False, and the way a
refused input is reported (its status slot only; every other output keeps what it showed)."""

import functools
import logging
import threading
from collections.abc import Callable

import gradio as gr
from gradio.components.plot import PlotData

from explorer.errors import ExplorerError

logger = logging.getLogger("explorer.web.handlers")
# Held by whatever runs the model: torch.func.functional_call swaps a module's parameters while it runs, so
# two threads in the model at once corrupt each other's gradients. The queued engine events take turns anyway
# (concurrency_id "engine"); this also covers the slider's follow-up when it must compute (a region's step,
# a second method), which is not queued behind them.
ENGINE_LOCK = threading.RLock()


def holds_engine(handler: Callable) -> Callable:
    """Run the handler holding ENGINE_LOCK."""

    @functools.wraps(handler)
    def wrapper(*args, **kwargs):
        with ENGINE_LOCK:
            return handler(*args, **kwargs)

    return wrapper


def refused(error: Exception | str) -> str:
    """The line a refused input leaves in its status slot."""
    return f"**Not done:** {error}. Everything else on the page is as it was."


def skipped(group: type) -> tuple:
    """Every output of a named group (a NamedTuple of explorer.web.session or a view) left as it was."""
    return group(*[gr.skip()] * len(group._fields))


def refusal(group: type, field: str, error: Exception) -> tuple:
    """The group with every output skipped except `field`, which says what was wrong and how to fix it."""
    return skipped(group)._replace(**{field: refused(error)})


def user_errors(group: type, field: str) -> Callable:
    """A refused input (ExplorerError) leaves every output of the handler's `group` as it was (gr.skip) except
    `field`, its status slot, which says what was wrong and how to fix it: one bad input never wipes earlier
    results, and no stack trace reaches the page."""

    def decorate(handler: Callable) -> Callable:
        @functools.wraps(handler)
        def wrapper(*args, **kwargs):
            try:
                return handler(*args, **kwargs)
            except ExplorerError as error:
                logger.info("user error in %s: %s", handler.__name__, error)
                return refusal(group, field, error)

        return wrapper

    return decorate


# -- serialized outputs (the events run with postprocess=False) -------------------------------
def image_payload(data_uri: str) -> dict:
    """gr.Image's value for an inline PNG; no `meta` file marker, so gradio moves no file."""
    return {
        "path": None,
        "url": data_uri,
        "size": None,
        "orig_name": "image.png",
        "mime_type": "image/png",
        "is_stream": False,
        "meta": {},
    }


def gallery_payload(items: list[tuple[str, str]]) -> list[dict]:
    """gr.Gallery's value for (data URI, caption) pairs."""
    return [{"image": image_payload(uri), "caption": caption} for uri, caption in items]


def plot_payload(figure_json: str) -> dict:
    """gr.Plot's value for a plotly figure already serialized to JSON."""
    return PlotData(type="plotly", plot=figure_json).model_dump()
