"""Region attribution on the page: click two corners on the generated image (or type the box), attribute the
output inside it at every step, and scrub with the region's influencers next to the whole image's.

The region's attribution is computed once per trajectory, box and top-k (explorer.region centers the region
query by its own output's mean training feature) and kept in the session; scrubbing then only looks it up.
"""

import gradio as gr
import numpy as np
from PIL import Image, ImageDraw

from explorer.errors import ExplorerError, whole_number
from explorer.memory import releases_memory
from explorer.web import plots
from explorer.web.compare import follows, shared_influencers
from explorer.web.payloads import image_payload, user_errors

NO_REGION = (
    "Click two opposite corners of a box on the image (or type x0,y0,x1,y1 in model pixels, x1 and y1 "
    "exclusive), then **Attribute region**."
)
BOX_COLOR = (255, 64, 64)


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


def click(session, evt: gr.SelectData) -> tuple:
    """A click on the region image: the first sets a corner, the second completes the box (any order)."""
    if session is None:
        raise ExplorerError("nothing generated yet: click Generate first")
    size = session.attribution.trajectory.final.shape[-1]
    x, y = (min(size - 1, max(0, int(v * size / plots.IMAGE_PX))) for v in evt.index[:2])
    if session.region_corner is None:
        session.region_corner = (x, y)
        return canvas(session, None, (x, y)), gr.skip(), "first corner set: click the opposite corner"
    (cx, cy), session.region_corner = session.region_corner, None
    box = (min(x, cx), min(y, cy), max(x, cx) + 1, max(y, cy) + 1)
    return canvas(session, box), box_text(box), f"box {box_text(box)}: click **Attribute region**"


def _current(explorer, session, box: tuple[int, int, int, int]):
    """The session's region attribution, recomputed when the trajectory, the index, the box or top-k
    changed."""
    main = session.attribution
    kept = session.region
    if kept is None or kept[0] != box or not follows(kept[1], main, main.index_name):
        top_k = len(main.steps[0].positive.ids)
        session.region = kept = (box, explorer.reattribute(main, main.index_name, top_k, box))
    return kept[1]


def overlap_note(session, step: int, box) -> str:
    whole, part = session.attribution.steps[step], session.region[1].steps[step]
    shared, k = shared_influencers(whole, part), len(whole.positive.ids)
    return (
        f"region {box_text(box)} at step {step} (t = {part.timestep}): {shared[0]} of {k} positive and "
        f"{shared[1]} of {k} negative influencers are also in the whole image's lists · "
        f"{part.negatives_note()}"
    )


def region_view(handlers, session, step, text) -> tuple:
    """(canvas, positive gallery, negative gallery, note) for the box in `text` at `step`."""
    if session is None:
        raise ExplorerError("nothing generated yet: click Generate first")
    box = handlers.explorer.region_box(parse_box(text))
    region = _current(handlers.explorer, session, box)
    step = whole_number(session.step if step is None else step, "step", 0, region.trajectory.steps - 1)
    current, index = region.steps[step], handlers._index(region.index_name)
    return (
        canvas(session, box),
        handlers._gallery(index, current, current.positive),
        handlers._gallery(index, current, current.negative),
        overlap_note(session, step, box),
    )


def follow(handlers, session, step) -> tuple:
    """The region's lists follow the slider once a region was attributed for this trajectory."""
    if (
        session is None
        or session.region is None
        or session.region[1].trajectory is not (session.attribution.trajectory)
    ):
        return (gr.skip(),) * 3
    _, positive, negative, note = region_view(handlers, session, step, box_text(session.region[0]))
    return positive, negative, note


class RegionHandlers:
    """The region view's event handlers (mixed into explorer.web.handlers.Handlers)."""

    @user_errors(outputs=3, message_at=2)
    def region_click(self, session, evt: gr.SelectData) -> tuple:
        """A click on the region image sets a corner or completes the box."""
        return click(session, evt)

    @user_errors(outputs=4, message_at=3)
    @releases_memory
    def region(self, session, step, text) -> tuple:
        """Attribute the output inside the typed or clicked box at every step (once per box)."""
        return region_view(self, session, step, text)

    def region_reset(self, session) -> tuple:
        """After Generate: the new image without a box, the region lists emptied."""
        if session is None:
            return (gr.skip(),) * 5
        return canvas(session, None), "", [], [], NO_REGION

    @user_errors(outputs=3, message_at=2)
    def region_scrub(self, session, step) -> tuple:
        return follow(self, session, step)
