"""Two methods side by side: the trajectory on screen attributed with a second index, at the same step.

The second attribution is computed once per trajectory, index and top-k (one batched pass of query gradients,
as generate's) and kept in the session; scrubbing then only looks it up, like the main galleries.
"""

from __future__ import annotations

from explorer.attribution import StepAttribution, TrajectoryAttribution
from explorer.errors import ExplorerError, whole_number
from explorer.web.galleries import Galleries
from explorer.web.payloads import ENGINE_LOCK, skipped
from explorer.web.session import CompareOutputs

NO_COMPARISON = "Pick a second method to see its influencers at the same step."


def follows(kept: TrajectoryAttribution | None, main: TrajectoryAttribution, name: str) -> bool:
    """Whether a kept second attribution still belongs to the view on screen: the same trajectory and top-k,
    under the index `name`."""
    return (
        kept is not None
        and kept.trajectory is main.trajectory
        and kept.index_name == name
        and len(kept.steps[0].positive.ids) == len(main.steps[0].positive.ids)
    )


def _current(explorer, session, name: str) -> TrajectoryAttribution:
    """The session's comparison attribution, recomputed when the trajectory, the index or top-k changed."""
    main = session.attribution
    if not follows(session.compare, main, name):
        with ENGINE_LOCK:
            session.compare = explorer.reattribute(main, name, len(main.steps[0].positive.ids))
    return session.compare


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


def compare_view(explorer, galleries: Galleries, session, step, name) -> CompareOutputs:
    """The second method's (positive gallery, negative gallery, note) at `step`."""
    if session is None:
        raise ExplorerError("nothing generated yet: click Generate first")
    if not name:
        return CompareOutputs([], [], NO_COMPARISON)
    if name == session.attribution.index_name:
        return skipped(CompareOutputs)._replace(
            compare_info=f"{name} is the method on screen: pick another one to compare"
        )
    other = _current(explorer, session, name)
    step = whole_number(session.step if step is None else step, "step", 0, other.trajectory.steps - 1)
    current = other.steps[step]
    positive, negative = galleries.pair(explorer.index(name)[1], current)
    main = session.attribution
    return CompareOutputs(positive, negative, overlap_note(main.steps[step], current, main.index_name))
