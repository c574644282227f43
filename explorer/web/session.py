"""One browser session's state, and the named output groups of the Generate & scrub tab's events.

Each event's outputs are one NamedTuple class below; ui.py wires `outputs=page.group(Group)` by the field
names, and a handler returns the group (a refused input: `refused(Group, field, error)`, every other field
skipped). The names are the only coupling between the layout and the handlers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from explorer.attribution import StepAttribution, TrajectoryAttribution
from explorer.likelihood import RolloutCurves

STRIP_COUNT = 10  # x_t thumbnails along the trajectory
UI_MAX_TOP_K = 32  # top-k the page offers (the engine allows MAX_TOP_K); a larger typed value is clamped
UI_MAX_STEPS = 200  # sampler steps the page offers (the engine accepts up to 1000); more is clamped and said


class GenerateOutputs(NamedTuple):
    session: object
    final: object
    strip: object
    slider: object
    scrub: object  # the step view's payload (explorer.web.scrub_view)
    plot: object
    status: object
    chosen: object
    chosen_plot: object
    chosen_info: object
    top_k: object
    steps: object


class LinkOutputs(NamedTuple):
    """A link's controls, then what Generate shows."""

    seed: object
    prompt: object
    guidance: object
    generated: GenerateOutputs

    def flat(self) -> tuple:
        return (self.seed, self.prompt, self.guidance, *self.generated)

    @staticmethod
    def fields() -> tuple[str, ...]:
        return ("seed", "prompt", "guidance", *GenerateOutputs._fields)


class ReattributeOutputs(NamedTuple):
    scrub: object
    plot: object
    status: object
    chosen: object
    chosen_plot: object
    chosen_info: object
    top_k: object


class RolloutOutputs(NamedTuple):
    scrub: object
    plot: object
    status: object


class ChosenOutputs(NamedTuple):
    chosen: object
    chosen_plot: object
    chosen_info: object


class CompareOutputs(NamedTuple):
    compare_positive: object
    compare_negative: object
    compare_info: object


class RegionLists(NamedTuple):
    region_positive: object
    region_negative: object
    region_info: object


class FollowOutputs(NamedTuple):
    """What follows the step slider on the server (the step view itself follows it in the browser)."""

    chosen: ChosenOutputs
    compare: CompareOutputs
    region: RegionLists

    def flat(self) -> tuple:
        return (*self.chosen, *self.compare, *self.region)

    @staticmethod
    def fields() -> tuple[str, ...]:
        return (*ChosenOutputs._fields, *CompareOutputs._fields, *RegionLists._fields)


class ExportOutputs(NamedTuple):
    exported: object
    export_note: object


@dataclass
class RegionState:
    """A box's influencers, step by step as they are computed (the step on screen first, then the rest)."""

    box: tuple[int, int, int, int]
    attribution: TrajectoryAttribution  # the whole image's, which the box's steps belong to
    steps: dict[int, StepAttribution] = field(default_factory=dict)


@dataclass(eq=False)
class Session:
    """One browser session's generation: every step's attribution, later the rollout curves."""

    attribution: TrajectoryAttribution
    plot: dict  # the likelihood figure as JSON (plots.figure_template)
    step: int  # the step on screen, as the server last heard it
    rollouts: RolloutCurves | None = None
    rollout_s: float | None = None
    selected: tuple[str, int] | None = None  # the clicked influencer: (sign, training row); follows the step
    notes: tuple[str, ...] = ()  # what the controls' values were changed to (e.g. a clamped top-k)
    compare: TrajectoryAttribution | None = None  # the same trajectory under a second index (compare.py)
    region: RegionState | None = None
    region_corner: tuple[int, int] | None = None  # the first clicked corner of a box being drawn
    refusal: str | None = None  # the last refused Generate, kept in the status line until the next success
    cancelled: bool = False  # a newer Generate replaced this one: its completions stop

    @property
    def strip_steps(self) -> list[int]:
        """The steps shown in the trajectory strip, noisiest first."""
        last = self.attribution.trajectory.steps - 1
        return sorted(set(np.linspace(0, last, min(STRIP_COUNT, last + 1)).round().astype(int).tolist()))

    def status(self) -> str:
        a, t = self.attribution, self.attribution.timings
        parts = [
            f"seed {a.trajectory.seed} · {a.trajectory.steps} steps · {a.index_name}",
            f"sample {t['sample_s']:.2f} s · attribute {t['attribute_s']:.2f} s · proxy {t['proxy_s']:.2f} s",
        ]
        if a.proxy.shape[1] == 0:
            parts.append("no likelihood curves: no feature classifier")
        elif self.rollouts is not None:
            parts.append(
                f"completions ({len(self.rollouts.steps)} steps × {self.rollouts.completions} completions) "
                f"{self.rollout_s:.1f} s"
            )
        elif self.cancelled:
            parts.append("completions stopped by a newer Generate")
        else:
            parts.append("completions from x_t: computing…")
        shown = " · ".join([*parts, *self.notes])
        if self.refusal:
            return f"{self.refusal}\n\nStill shown: {shown}"
        return shown
