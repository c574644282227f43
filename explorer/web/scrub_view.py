"""The instant step view: every step's x_t, x0hat, influencer tiles, captions and note, sent once.

`payload` serializes a whole trajectory's view (a few hundred kB at 200 steps and top-32; images at the
model's resolution, scaled up by CSS); scrub_view.js shows one step at a time in the browser, so scrubbing
costs no server round trip and no new DOM nodes. The server still knows the step (the slider is an input of
export, compare, region and the selected influencer), and deep links regenerate the view from the URL.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import gradio as gr
import numpy as np

from explorer.attribution import TrajectoryAttribution
from explorer.index import AttributionIndex
from explorer.web import plots
from explorer.web.export import view_query
from explorer.web.rows import caption, influencer_rows

HERE = Path(__file__).parent
JS = (HERE / "scrub_view.js").read_text()
CSS = (HERE / "scrub_view.css").read_text()
LEGEND = (
    "<b>cos</b>: the cosine of the whitened gradients of this step's x0hat output and the training image's "
    "(1 = the same direction, 0 = unrelated; <b>TRAK score</b> on an unnormalized index) · <b>pNN</b>: the "
    "score's percentile among all training images · <b>bucket</b>: the index's timestep range this step is "
    "searched in · <b>negative influencer</b>: a training image whose gradient points against this step's "
    "(training more on it makes this output less likely); <i>least aligned</i> when fewer than top-k score "
    "below 0"
)
TEMPLATE = f"""<div class="dax-scrub dax-empty">
  <div class="dax-empty-note">Click <b>Generate</b>: every step's influencers arrive at once, then the step
  slider switches between them in the browser.</div>
  <div class="dax-frames">
    <figure><img class="dax-xt" alt="x_t"><figcaption>x_t (the sampler's input)</figcaption></figure>
    <figure><img class="dax-x0" alt="x0hat"><figcaption>x0hat: the one-step estimate</figcaption></figure>
  </div>
  <p class="dax-note" id="step-note"></p>
  <div id="positive" class="dax-influencers"><div class="dax-title">top positive influencers at this step
    (click one: when did it matter?)</div><div class="dax-grid"></div></div>
  <div id="negative" class="dax-influencers"><div class="dax-title">top negative influencers at this step
    </div><div class="dax-grid"></div></div>
  <p class="dax-legend" id="legend">{LEGEND}</p>
</div>"""
LINE_TEMPLATE = (
    '<div class="dax-line" hidden><span class="dax-line-text"></span> · '
    '<a class="dax-link" href="">link to this view</a></div>'
)


def components() -> tuple[gr.HTML, gr.HTML]:
    """(the view, the step line): the step line sits beside Export; the view's script fills both."""
    line = gr.HTML(LINE_TEMPLATE, html_template=LINE_TEMPLATE, js_on_load=None, elem_id="step-line")
    view = gr.HTML(
        "", html_template=TEMPLATE, js_on_load=JS, elem_id="scrub-view", render=False
    )  # placed later
    return line, view


def pixels(image: np.ndarray) -> str:
    """A training image (uint8, the model's resolution) as a PNG data URI; CSS scales it up, pixelated."""
    return plots.png_data_uri(image)


def step_line(attribution: TrajectoryAttribution, step: int, classes: list[str]) -> str:
    """'step s of S-1 · t = T · index bucket b · classifier on x0hat: 7 (0.93) · negatives …'."""
    current, last = attribution.steps[step], attribution.trajectory.steps - 1
    proxy = attribution.proxy[step]
    classified = (
        f"classifier on x0hat: {classes[int(proxy.argmax())]} ({proxy.max():.2f})"
        if len(proxy)
        else "no feature classifier"
    )
    return (
        f"step {step} of {last} · t = {current.timestep} · index bucket {current.bucket} · {classified} · "
        f"{current.negatives_note()}"
    )


def payload(
    attribution: TrajectoryAttribution,
    index: AttributionIndex,
    notes: list[str],
    step: int,
    selected: int | None,
    thumbnail: Callable[[int], str],
    classes: list[str],
) -> str:
    """The whole trajectory's view as JSON: per step the frames, both lists as [row, caption], the step line,
    its link and its note; thumbnails once per training row. `step` is shown first; `selected` is the
    highlighted training row (None: none)."""
    trajectory = attribution.trajectory
    xt, x0hat, _ = trajectory.pictures
    size = xt.shape[-1]
    thumbs, steps = {}, []
    for s, current in enumerate(attribution.steps):
        lists = {"positive": [], "negative": []}
        for row in influencer_rows(index, current):
            thumbs.setdefault(row["row"], thumbnail(row["row"]))
            lists[row["sign"]].append([row["row"], caption(row, index.score_name)])
        top_k = len(lists["positive"])
        link = view_query(attribution, s, top_k)
        line = step_line(attribution, s, classes)
        steps.append(dict(lists, t=current.timestep, line=line, note=notes[s], link=link))
    frames = [
        [plots.png_data_uri(plots.tensor_image(pictures[s], size)) for pictures in (xt, x0hat)]
        for s in range(trajectory.steps)
    ]
    token = f"{trajectory.seed}-{id(attribution)}"  # a new attribution: the view starts at `step` again
    document = dict(token=token, step=step, last=trajectory.steps - 1, selected=selected)
    return json.dumps(dict(document, frames=frames, thumbs=thumbs, steps=steps), separators=(",", ":"))
