"""Plotly figures and pixel thumbnails for the web UI (only the UI imports this; the engine never does).

The x axis of every curve is the train timestep t, drawn reversed so that the plot reads like
the sampler runs: from pure noise (large t, left) to the clean image (t = 0, right).
"""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import plotly.graph_objects as go
import torch
from PIL import Image
from plotly.subplots import make_subplots

from explorer.data import to_uint8
from explorer.likelihood import RolloutCurves

# Ten well-separated colours (Tableau 10); classes beyond ten cycle through them.
CLASS_COLORS = [
    "#4e79a7",
    "#f28e2b",
    "#e15759",
    "#76b7b2",
    "#59a14f",
    "#edc948",
    "#b07aa1",
    "#ff9da7",
    "#9c755f",
    "#7f7f7f",
]
MARKER_COLOR = "#222222"
FIGURE_HEIGHT = 380
LIKELIHOOD_HEIGHT = 560  # the likelihood over the influencers' classes


IMAGE_PX = 160  # x_t, x0hat and the final image, upscaled nearest (16 px -> 160 px)


def upscale(image: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour upscaling of a uint8 (H, W) or (H, W, 3) image by the largest whole factor that fits
    `size`."""
    factor = max(1, size // max(image.shape[:2]))
    return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)


def tensor_image(tensor: torch.Tensor, size: int) -> np.ndarray:
    """A (C, H, W) tensor in [-1, 1] -> uint8 (size', size') grayscale or (size', size', 3) RGB, upscaled
    nearest."""
    return upscale(to_uint8(tensor[None].numpy())[0], size)


def png_data_uri(image: np.ndarray) -> str:
    """A uint8 (H, W) or (H, W, 3) image as a base64 PNG data URI (fast compression: the images are tiny)."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(buffer, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _layout(figure: go.Figure, title: str, y_title: str) -> go.Figure:
    figure.update_layout(
        title=dict(text=title, font=dict(size=13)),
        height=FIGURE_HEIGHT,
        margin=dict(l=50, r=10, t=40, b=40),
        xaxis=dict(title="train timestep t  (noisy → clean)", autorange="reversed", zeroline=False),
        yaxis=dict(title=y_title),
        legend=dict(title=dict(text="class"), tracegroupgap=0, font=dict(size=11)),
        template="plotly_white",
        font=dict(family="system-ui, sans-serif"),
        uirevision="keep",  # keep the user's zoom and legend toggles across marker moves
    )
    return figure


def _marker_shape(timestep: int) -> dict:
    return dict(
        type="line",
        xref="x",
        yref="paper",
        x0=timestep,
        x1=timestep,
        y0=0,
        y1=1,
        line=dict(color=MARKER_COLOR, width=2, dash="dot"),
    )


def move_marker(figure: go.Figure, timestep: int) -> go.Figure:
    """Put the vertical current-step marker at `timestep` (in place) and return the figure."""
    figure.layout.shapes = [_marker_shape(int(timestep))]
    return figure


def figure_template(figure: go.Figure) -> dict:
    """The figure as a plain JSON dict, serialized once; `with_marker` then re-serializes cheaply."""
    return json.loads(figure.to_json())


def with_marker(template: dict, timestep: int) -> str:
    """The template's JSON with the current-step marker at `timestep` (a fast path for scrubbing:
    plotly's own to_json re-validates and walks every trace, ~10x slower)."""
    layout = dict(template["layout"], shapes=[_marker_shape(int(timestep))])
    return json.dumps(dict(template, layout=layout))


def class_color(name: str, names: list[str]) -> str:
    """The colour of a class, by its position in `names` (the same class keeps its colour in every panel)."""
    return CLASS_COLORS[(names.index(name) if name in names else len(names)) % len(CLASS_COLORS)]


def _completion_traces(figure: go.Figure, x: list, rollouts: RolloutCurves, c: int, name: str, color: str):
    """Class c's completions curve (solid) and its band, mean +- 2 standard errors over the M completions."""
    p = rollouts.probabilities[:, c]
    spread = 2 * (rollouts.stderr[:, c] if rollouts.stderr is not None else np.zeros_like(p))
    for edge, fill in ((np.minimum(1, p + spread), None), (np.maximum(0, p - spread), "tonexty")):
        band = dict(color=color, width=0)
        figure.add_trace(
            go.Scatter(
                x=x,
                y=edge.tolist(),
                mode="lines",
                line=band,
                fill=fill,
                fillcolor=color + "30",
                legendgroup=name,
                showlegend=False,
                hoverinfo="skip",
            ),
            row=1,
            col=1,
        )
    figure.add_trace(
        go.Scatter(
            x=x,
            y=p.tolist(),
            mode="lines+markers",
            name=name,
            legendgroup=name,
            line=dict(color=color, width=2.5),
            marker=dict(size=5),
            customdata=spread.tolist(),
            hovertemplate=f"class {name}<br>t=%{{x}}<br>p(x_t) from {rollouts.completions} completions="
            "%{y:.2f} ± %{customdata:.2f}<extra></extra>",
        ),
        row=1,
        col=1,
    )


def _proxy_trace(x: list, p: np.ndarray, name: str, color: str, first: bool, hidden: bool) -> go.Scatter:
    """The classifier on x0hat for one class: faint and dotted, one legend entry for all classes."""
    return go.Scatter(
        x=x,
        y=p.tolist(),
        mode="lines",
        name="x0hat classifier (unreliable at high noise)",
        legendgroup="x0hat",
        showlegend=first,
        opacity=0.5,
        visible="legendonly" if hidden else True,
        line=dict(color=color, width=1, dash="dot"),
        hovertemplate=f"class {name}<br>t=%{{x}}<br>p(x0hat)=%{{y:.3f}}<extra></extra>",
    )


def _share_trace(x: list, share: np.ndarray, name: str, color: str, in_legend: bool) -> go.Scatter:
    """One class's share of the top-k positive influencers, stacked over the classes (they sum to 1)."""
    return go.Scatter(
        x=x,
        y=share.tolist(),
        mode="lines",
        name=f"{name} (influencers)",
        legendgroup=name,
        showlegend=in_legend,
        stackgroup="shares",
        line=dict(color=color, width=0.5),
        fillcolor=color + "b0",
        hovertemplate=f"class {name}<br>t=%{{x}}<br>share of top-k=%{{y:.2f}}<extra></extra>",
    )


def _likelihood_title(class_names: list[str], rollouts: RolloutCurves | None) -> str:
    if not class_names:
        return "No feature likelihood: no classifier next to the model (precompute train --classifier-only)"
    if rollouts is None:
        return "p(class | x_t): completions from x_t computing…<br>dotted: the x0hat classifier (unreliable)"
    return (
        f"p(class | x_t): solid = {rollouts.completions} completions from x_t (band ± 2 s.e.)<br>"
        "dotted, off (legend): the x0hat classifier"
    )


def likelihood_figure(
    timesteps: np.ndarray,
    proxy: np.ndarray,
    class_names: list[str],
    rollouts: RolloutCurves | None,
    shares: np.ndarray | None = None,
    share_names: list[str] | None = None,
    current_step: int | None = None,
) -> go.Figure:
    """Top: p(class | x_t) over the steps (Journey-TRAK section 3.1) from stochastic completions of x_t
    (solid, with a band of +- 2 standard errors); the classifier on x0hat faint and dotted (off once the
    completions are in: at high noise x0hat is a blur the classifier reads as any class). Bottom: the share
    of the top-k positive influencers in each class at every step.

    timesteps (S,), proxy (S, classes), shares (S, classes of the index) with their share_names."""
    figure = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.14, row_heights=[0.6, 0.4])
    x = timesteps.tolist()
    for c, name in enumerate(class_names):
        color = class_color(name, class_names)
        if rollouts is not None:
            _completion_traces(figure, timesteps[rollouts.steps].tolist(), rollouts, c, name, color)
        figure.add_trace(
            _proxy_trace(x, proxy[:, c], name, color, c == 0, rollouts is not None), row=1, col=1
        )
    names = share_names or []
    for c, name in enumerate(names if shares is not None else []):
        color = class_color(name, class_names or names)
        figure.add_trace(_share_trace(x, shares[:, c], name, color, name not in class_names), row=2, col=1)
    _layout(figure, _likelihood_title(class_names, rollouts), "p(class)")
    figure.update_layout(
        height=LIKELIHOOD_HEIGHT,
        legend=dict(title=dict(text="click to hide:"), orientation="h", y=-0.12, x=0, font=dict(size=11)),
        margin=dict(l=50, r=10, t=56, b=90),
    )
    figure.update_xaxes(autorange="reversed", zeroline=False)
    figure.update_xaxes(title=None, row=1, col=1)
    figure.update_xaxes(title="train timestep t  (noisy → clean)", row=2, col=1)
    figure.update_yaxes(range=[-0.02, 1.02], row=1, col=1)
    figure.update_yaxes(range=[0, 1], title="share", row=2, col=1)
    if shares is not None:
        title = "share of the top-k positive influencers in each class"
        figure.add_annotation(
            text=title,
            xref="paper",
            yref="paper",
            x=0,
            y=0.40,
            xanchor="left",
            yanchor="bottom",
            showarrow=False,
        )
    return figure if current_step is None else move_marker(figure, int(timesteps[current_step]))


def score_curve_figure(timesteps: np.ndarray, scores: np.ndarray, current_step: int, title: str) -> go.Figure:
    """One training image's attribution score at every step: when did this image matter?"""
    figure = go.Figure(
        go.Scatter(
            x=timesteps.tolist(),
            y=scores.tolist(),
            mode="lines+markers",
            name="score",
            line=dict(color=CLASS_COLORS[0], width=2),
            marker=dict(size=4),
            hovertemplate="t=%{x}<br>score=%{y:.4f}<extra></extra>",
        )
    )
    _layout(figure, title, "attribution score")
    figure.update_layout(showlegend=False)
    figure.update_yaxes(zeroline=True, zerolinecolor="#aaaaaa", zerolinewidth=1)
    return move_marker(figure, int(timesteps[current_step]))
