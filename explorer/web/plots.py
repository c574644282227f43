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


def likelihood_figure(
    timesteps: np.ndarray,
    proxy: np.ndarray,
    class_names: list[str],
    rollouts: RolloutCurves | None,
    current_step: int | None = None,
) -> go.Figure:
    """Feature likelihoods p(class | x_t) over the steps (Journey-TRAK section 3.1).

    timesteps (S,), proxy (S, classes): classifier on x0hat (solid lines); rollouts: the mean
    classifier probability over stochastic completions from x_t (dashed, with markers).
    """
    figure = go.Figure()
    for c, name in enumerate(class_names):
        color = CLASS_COLORS[c % len(CLASS_COLORS)]
        figure.add_trace(
            go.Scatter(
                x=timesteps.tolist(),
                y=proxy[:, c].tolist(),
                mode="lines",
                name=name,
                legendgroup=name,
                line=dict(color=color, width=2),
                hovertemplate=f"class {name}<br>t=%{{x}}<br>p(x0hat)=%{{y:.3f}}<extra></extra>",
            )
        )
        if rollouts is not None:
            figure.add_trace(
                go.Scatter(
                    x=timesteps[rollouts.steps].tolist(),
                    y=rollouts.probabilities[:, c].tolist(),
                    mode="lines+markers",
                    name=f"{name} (rollouts)",
                    legendgroup=name,
                    showlegend=False,
                    line=dict(color=color, width=1.5, dash="dash"),
                    marker=dict(size=6),
                    hovertemplate=f"class {name}<br>t=%{{x}}<br>p(x_t)=%{{y:.3f}}<extra></extra>",
                )
            )
    if not class_names:
        title = (
            "No feature likelihood: no classifier next to the model (python -m precompute train "
            "--classifier-only ...)"
        )
    elif rollouts is None:
        title = "Feature likelihood: solid = classifier on x0hat · rollout curves computing…"
    else:
        title = (
            f"Feature likelihood: solid = classifier on x0hat · dashed = {rollouts.completions} "
            "rollouts from x_t"
        )
    _layout(figure, title, "p(class)")
    figure.update_yaxes(range=[-0.02, 1.02])
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
