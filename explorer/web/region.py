"""Region attribution on the page: click two corners on the generated image (or type the box), attribute the
output inside it, and scrub with the region's influencers next to the whole image's.

A region needs its own center per bucket (explorer.region: one backward pass through 256 training images
each), so a new box is attributed at the step on screen first (one bucket: about a second) and shown; a
follow-up event then attributes every other step in one batch, and the slider reads them from the session.
A step the follow-up has not reached yet is attributed on demand.
"""

from typing import NamedTuple

import gradio as gr
import numpy as np
from PIL import Image, ImageDraw

from explorer.errors import ExplorerError, whole_number
from explorer.memory import releases_memory
from explorer.web import plots
from explorer.web.compare import shared_influencers
from explorer.web.payloads import ENGINE_LOCK, image_payload, skipped, user_errors
from explorer.web.session import RegionLists, RegionState

NO_REGION = (
    "Click two opposite corners of a box on the image (or type x0,y0,x1,y1 in model pixels, x1 and y1 "
    "exclusive), then **Attribute region**."
)
BOX_COLOR = (255, 64, 64)


class RegionClick(NamedTuple):
    region_image: object
    region_box: object
    region_info: object


class RegionOutputs(NamedTuple):
    region_image: object
    region_positive: object
    region_negative: object
    region_info: object


class RegionReset(NamedTuple):
    region_image: object
    region_box: object
    region_positive: object
    region_negative: object
    region_info: object


def box_text(box: tuple[int, int, int, int]) -> str:
    return ",".join(str(v) for v in box)


def parse_box(text: str) -> tuple:
    """'x0,y0,x1,y1' -> a 4-tuple of strings for Explorer.region_box to check (it names a bad box)."""
    parts = [part.strip() for part in str(text or "").split(",")]
    if parts == [""]:
        raise ExplorerError(
            "no region yet: click two corners on the image or type x0,y0,x1,y1 in the box field"
        )
    return tuple(parts)


def canvas(session, box: tuple[int, int, int, int] | None, corner: tuple[int, int] | None = None) -> dict:
    """The generated image at display size with the box (or the first clicked corner) drawn on it."""
    final = plots.tensor_image(session.attribution.trajectory.pictures[2], plots.IMAGE_PX)
    image = Image.fromarray(final).convert("RGB")
    draw = ImageDraw.Draw(image)
    scale = plots.IMAGE_PX / session.attribution.trajectory.final.shape[-1]
    if box is not None:
        x0, y0, x1, y1 = box
        draw.rectangle([x0 * scale, y0 * scale, x1 * scale - 1, y1 * scale - 1], outline=BOX_COLOR, width=2)
    elif corner is not None:
        x, y = corner
        draw.rectangle([x * scale, y * scale, (x + 1) * scale - 1, (y + 1) * scale - 1], outline=BOX_COLOR)
    return image_payload(plots.png_data_uri(np.asarray(image)))


def click(session, evt: gr.SelectData) -> RegionClick:
    """A click on the region image: the first sets a corner, the second completes the box (any order)."""
    if session is None:
        raise ExplorerError("nothing generated yet: click Generate first")
    size = session.attribution.trajectory.final.shape[-1]
    x, y = (min(size - 1, max(0, int(v * size / plots.IMAGE_PX))) for v in evt.index[:2])
    if session.region_corner is None:
        session.region_corner = (x, y)
        return RegionClick(
            canvas(session, None, (x, y)), gr.skip(), "first corner set: click the opposite corner"
        )
    (cx, cy), session.region_corner = session.region_corner, None
    box = (min(x, cx), min(y, cy), max(x, cx) + 1, max(y, cy) + 1)
    return RegionClick(
        canvas(session, box), box_text(box), f"box {box_text(box)}: click **Attribute region**"
    )


def _state(session, box: tuple[int, int, int, int]) -> RegionState:
    """The session's region, started afresh when the box or the whole image's attribution changed."""
    kept = session.region
    if kept is None or kept.box != box or kept.attribution is not session.attribution:
        session.region = kept = RegionState(box, session.attribution)
    return kept


def region_step(explorer, state: RegionState, steps: list[int]):
    """Attribute the box at the steps it does not have yet; return the first asked for."""
    missing = [s for s in steps if s not in state.steps]
    if missing:
        top_k = len(state.attribution.steps[0].positive.ids)
        with ENGINE_LOCK:
            found = explorer.attribute_steps(state.attribution, missing, top_k, state.box)
        state.steps.update(zip(missing, found))
    return state.steps[steps[0]]


def overlap_note(session, step: int, box, part) -> str:
    whole = session.attribution.steps[step]
    shared, k = shared_influencers(whole, part), len(whole.positive.ids)
    return (
        f"region {box_text(box)} at step {step} (t = {part.timestep}): {shared[0]} of {k} positive and "
        f"{shared[1]} of {k} negative influencers are also in the whole image's lists · "
        f"{part.negatives_note()}"
    )


def region_lists(explorer, galleries, session, step, box) -> RegionLists:
    """The box's (positive gallery, negative gallery, note) at `step`."""
    state = _state(session, box)
    last = session.attribution.trajectory.steps - 1
    step = whole_number(session.step if step is None else step, "step", 0, last)
    part = region_step(explorer, state, [step])
    positive, negative = galleries.pair(explorer.index(session.attribution.index_name)[1], part)
    return RegionLists(positive, negative, overlap_note(session, step, box, part))


def follow(explorer, galleries, session, step) -> RegionLists:
    """The region's lists follow the slider once a box was attributed for the image on screen."""
    if session is None or session.region is None or session.region.attribution is not session.attribution:
        return skipped(RegionLists)
    return region_lists(explorer, galleries, session, step, session.region.box)


class RegionHandlers:
    """The region view's event handlers (mixed into explorer.web.handlers.Handlers)."""

    @user_errors(RegionClick, "region_info")
    def region_click(self, session, evt: gr.SelectData) -> RegionClick:
        """A click on the region image sets a corner or completes the box."""
        return click(session, evt)

    @user_errors(RegionOutputs, "region_info")
    @releases_memory
    def region(self, session, step, text) -> RegionOutputs:
        """Attribute the output inside the typed or clicked box at the step on screen (region_fill: the
        rest)."""
        if session is None:
            raise ExplorerError("nothing generated yet: click Generate first")
        box = self.explorer.region_box(parse_box(text))
        lists = region_lists(self.explorer, self.galleries, session, step, box)
        return RegionOutputs(canvas(session, box), *lists)

    @releases_memory
    def region_fill(self, session) -> None:
        """After a box is shown: attribute it at every other step, one bucket at a time (one region center
        each), stopping when a new Generate or another box replaced it (nothing on screen changes)."""
        state = None if session is None else session.region
        if state is None:
            return
        by_bucket: dict[int, list[int]] = {}
        for s, step in enumerate(state.attribution.steps):
            by_bucket.setdefault(step.bucket, []).append(s)
        for steps in by_bucket.values():
            if session.cancelled or session.region is not state:
                return
            region_step(self.explorer, state, steps)

    def region_reset(self, session) -> RegionReset:
        """After Generate: the new image without a box, the region lists emptied."""
        if session is None:
            return skipped(RegionReset)
        return RegionReset(canvas(session, None), "", [], [], NO_REGION)
