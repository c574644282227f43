"""Two methods side by side: the trajectory on screen attributed with a second index, at the same step.

The second attribution is computed once per trajectory, index and top-k (one batched pass of query gradients,
as generate's) and kept in the session; scrubbing then only looks it up, like the main galleries.
"""

from __future__ import annotations

import gradio as gr

from explorer.attribution import StepAttribution, TrajectoryAttribution
from explorer.errors import ExplorerError, whole_number

NO_COMPARISON = "Pick a second method to see its influencers at the same step."


def _current(explorer, session, name: str) -> TrajectoryAttribution:
    """The session's comparison attribution, recomputed when the trajectory, the index or top-k changed."""
    main = session.attribution
    top_k = len(main.steps[0].positive.ids)
    kept = session.compare
    if (
        kept is None
        or kept.trajectory is not main.trajectory
        or kept.index_name != name
        or len(kept.steps[0].positive.ids) != top_k
    ):
        kept = session.compare = explorer.reattribute(main, name, top_k)
    return kept


def shared_influencers(one: StepAttribution, other: StepAttribution) -> tuple[int, int]:
    """How many positive and negative influencers two lists of one step share."""
    pairs = ((one.positive, other.positive), (one.negative, other.negative))
    positive, negative = (len(set(a.ids.tolist()) & set(b.ids.tolist())) for a, b in pairs)
    return positive, negative


def overlap_note(main: StepAttribution, other: StepAttribution, main_name: str) -> str:
    """How many listed influencers the two methods share at this step."""
    shared = shared_influencers(main, other)
    k = len(main.positive.ids)
    return (
        f"step t = {other.timestep}: {shared[0]} of {k} positive and {shared[1]} of {k} negative influencers "
        f"also listed by {main_name}"
    )


def compare_view(handlers, session, step, name) -> tuple:
    """(positive gallery, negative gallery, note) of the second method at `step`."""
    if session is None:
        raise ExplorerError("nothing generated yet: click Generate first")
    if not name:
        return [], [], NO_COMPARISON
    if name == session.attribution.index_name:
        return gr.skip(), gr.skip(), f"{name} is the method on screen: pick another one to compare"
    other = _current(handlers.explorer, session, name)
    step = whole_number(session.step if step is None else step, "step", 0, other.trajectory.steps - 1)
    current, index = other.steps[step], handlers._index(name)
    return (
        handlers._gallery(index, current, current.positive),
        handlers._gallery(index, current, current.negative),
        overlap_note(session.attribution.steps[step], current, session.attribution.index_name),
    )
