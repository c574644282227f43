"""The 'Bias & memorization' tab: per-bucket gradient norms and top-k concentration (raw vs normalized
scores), training images ranked by self-influence, and the generated image's nearest training images.

Everything here is computed from the index (explorer.diagnostics), once per index, and shared by sessions.
"""

from typing import NamedTuple

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from explorer.diagnostics import COPY_RATIO, NEIGHBOURS, NearCopies, self_influence, timestep_bias
from explorer.errors import whole_number
from explorer.web import plots
from explorer.web.galleries import Galleries
from explorer.web.payloads import gallery_payload, plot_payload, skipped, user_errors


class BiasOutputs(NamedTuple):
    bias_plot: object
    bias_note: object


class SelfOutputs(NamedTuple):
    self_high: object
    self_low: object
    self_note: object


class CopyOutputs(NamedTuple):
    copy_pixel: object
    copy_feature: object
    copy_info: object


ALL_BUCKETS = -1  # the bucket choice that averages self-influence over every bucket
SELF_COUNT = 16  # training images shown at each end of the self-influence ranking
NORM_LABELS = {"centered": "|phi - c| (gradient minus the common part)", "whitened": "|psi| (whitened)"}


def bucket_choices(index) -> list[tuple[str, int]]:
    return [("all buckets (mean)", ALL_BUCKETS)] + [
        (f"t = {t[0]} (bucket {b})", b) for b, t in enumerate(index.meta.timesteps)
    ]


def bias_figure(bias) -> go.Figure:
    """Left: the median and 5-95% band of two norms per bucket; right: the share of distinct images in the
    top-k lists of many queries, raw vs normalized scores."""
    figure = make_subplots(
        rows=1,
        cols=2,
        subplot_titles=(
            "training-gradient norms per bucket (median, 5-95%)",
            f"distinct images in {bias.queries} queries' top-{bias.top_k} lists",
        ),
    )
    t = bias.timesteps
    for (name, label), color in zip(NORM_LABELS.items(), plots.CLASS_COLORS):
        q = bias.norm_quantiles[name]  # (B, 5): 5, 25, 50, 75, 95
        figure.add_trace(
            go.Scatter(x=t, y=q[:, 4].tolist(), mode="lines", line=dict(width=0), showlegend=False), 1, 1
        )
        figure.add_trace(
            go.Scatter(
                x=t,
                y=q[:, 0].tolist(),
                mode="lines",
                fill="tonexty",
                line=dict(width=0),
                fillcolor=color + "33",
                showlegend=False,
            ),
            1,
            1,
        )
        figure.add_trace(go.Scatter(x=t, y=q[:, 2].tolist(), name=label, line=dict(color=color)), 1, 1)
    for kind, dash in (("raw", "dot"), ("normalized", "solid")):
        figure.add_trace(
            go.Scatter(
                x=t,
                y=bias.distinct[kind].tolist(),
                name=f"{kind} scores",
                line=dict(color=plots.MARKER_COLOR, dash=dash),
                mode="lines+markers",
            ),
            1,
            2,
        )
    figure.update_xaxes(title="train timestep t", autorange="reversed")
    figure.update_yaxes(type="log", title="norm", row=1, col=1)
    figure.update_yaxes(title="distinct / all slots (1 = every list its own)", row=1, col=2)
    figure.update_layout(
        height=plots.FIGURE_HEIGHT,
        template="plotly_white",
        margin=dict(l=50, r=10, t=40, b=40),
        legend=dict(orientation="h", y=-0.25),
        font=dict(family="system-ui, sans-serif"),
    )
    return figure


class InsightHandlers:
    """The tab's event handlers (mixed into explorer.web.handlers.Handlers); their computations read the
    whole index once and are cached per index for every session."""

    _bias: dict
    _copies: dict
    galleries: Galleries

    @user_errors(BiasOutputs, "bias_note")
    def bias(self, name) -> BiasOutputs:
        """(figure, note) for the index `name`."""
        index = self._index(name or None)
        if id(index) not in self._bias:
            self._bias[id(index)] = timestep_bias(index)
        bias = self._bias[id(index)]
        spread = lambda kind: f"{bias.distinct[kind].min():.2f}-{bias.distinct[kind].max():.2f}"  # noqa: E731
        note = (
            f"Across buckets, the top-{bias.top_k} lists of {bias.queries} training images (as queries) hold "
            f"{spread('raw')} distinct images per slot with raw TRAK scores and {spread('normalized')} with "
            "normalized ones (Diffusion-ReTrac's point: raw scores let a few large-gradient images top "
            "many lists)."
        )
        return BiasOutputs(plot_payload(bias_figure(bias).to_json()), note)

    @user_errors(SelfOutputs, "self_note")
    def self_influence(self, name, bucket) -> SelfOutputs:
        """(highest gallery, lowest gallery, note) of the self-influence ranking at `bucket`."""
        index = self._index(name or None)
        bucket = whole_number(bucket, "bucket", ALL_BUCKETS, index.buckets - 1)
        scores = self_influence(index, None if bucket == ALL_BUCKETS else bucket)
        order = np.argsort(-scores, kind="stable")
        rank = np.empty(len(order), dtype=int)
        rank[order] = np.arange(1, len(order) + 1)

        def gallery(rows) -> list[dict]:
            return gallery_payload(
                [
                    (
                        self.galleries.thumbnail(index, int(row)),
                        f"id {int(index.train_ids[row])} · label "
                        f"{index.class_names[int(index.train_labels[row])]} · self {scores[row]:.4f} · "
                        f"rank {rank[row]}",
                    )
                    for row in rows
                ]
            )

        where = (
            "averaged over buckets" if bucket == ALL_BUCKETS else f"at t = {index.meta.timesteps[bucket][0]}"
        )
        note = (
            f"self-influence |psi_i|^2 {where}: highest {scores[order[0]]:.4f}, median "
            f"{np.median(scores):.4f}, lowest {scores[order[-1]]:.4f} over {len(scores)} training images"
        )
        return SelfOutputs(gallery(order[:SELF_COUNT]), gallery(order[::-1][:SELF_COUNT]), note)

    @user_errors(CopyOutputs, "copy_info")
    def near_copies(self, session) -> CopyOutputs:
        """(pixel-nearest gallery, feature-nearest gallery, verdict) for the session's generated image."""
        if session is None:  # a plain page load: nothing generated yet
            return skipped(CopyOutputs)
        attribution = session.attribution
        index = self._index(attribution.index_name)
        if id(index) not in self._copies:
            self._copies[id(index)] = NearCopies(index)
        final = attribution.trajectory.pictures[2]
        image = plots.tensor_image(final, final.shape[-1])  # uint8 at the training images' resolution
        found = self._copies[id(index)].nearest(image)
        pixel = gallery_payload(
            [
                (
                    self.galleries.thumbnail(index, int(row)),
                    f"id {int(index.train_ids[row])} · label "
                    f"{index.class_names[int(index.train_labels[row])]} · RMS {distance:.3f}",
                )
                for row, distance in zip(found.positions, found.distances)
            ]
        )
        last = attribution.steps[-1]
        feature = self.galleries.gallery(index, last, last.positive)
        verdict = "**a near copy**" if found.near_copy else "not a near copy"
        text = (
            f"Generated image (seed {attribution.trajectory.seed}): {verdict}. Its nearest training image, "
            f"id {int(index.train_ids[found.positions[0]])}, is at RMS pixel distance "
            f"{found.distances[0]:.3f}, {found.ratio:.2f} of the mean distance to the next {NEIGHBOURS} "
            f"(near copy below {COPY_RATIO}); {found.ratio_percentile:.1f}% of training images have a lower "
            f"ratio to the rest of the training set, and {found.percentile:.1f}% have their nearest "
            f"neighbour farther away. Feature space: the last step's top positives (t = {last.timestep})."
        )
        return CopyOutputs(pixel, feature, text)
