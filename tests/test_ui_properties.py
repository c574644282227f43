"""Property-based tests of the UI handlers: any input gives an answer or a refusal in its status slot that
leaves every other output as it was, never a crash."""

import gradio as gr
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from explorer.web.handlers import NO_INFLUENCER, QUIET, Handlers
from explorer.web.payloads import skipped
from explorer.web.session import ChosenOutputs, FollowOutputs, GenerateOutputs, RolloutOutputs

anything = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.lists(st.integers(), max_size=2),
)
RELAXED = dict(
    deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)


@pytest.fixture(scope="module")
def handlers(tiny_explorer):
    return Handlers(tiny_explorer)


@pytest.fixture(scope="module")
def session(handlers):
    return handlers.generate(None, 11, 12, 4, None, progress=QUIET).session


def _refused(outputs: tuple, field: str) -> bool:
    """Whether a handler refused its input: every output skipped but the status slot, which says why."""
    message = getattr(outputs, field)
    if not (isinstance(message, str) and message.startswith("**Not done:**")):
        return False
    assert "Traceback" not in message
    assert all(o == gr.skip() for name, o in zip(outputs._fields, outputs) if name != field), (
        "earlier results stay"
    )
    return True


@settings(max_examples=120, **RELAXED)
@given(step=anything)
def test_follow_any_step(handlers, session, step):
    """The panels that follow the slider (nothing selected, no second method, no region): skipped, or a
    refusal of the step."""
    outputs = handlers.follow_step(session, step, "")
    assert len(outputs) == len(FollowOutputs.fields())
    chosen = ChosenOutputs(*outputs[:3])
    assert _refused(chosen, "chosen_info") or all(o == gr.skip() for o in outputs)


@settings(max_examples=60, **RELAXED)
@given(
    seed=anything,
    steps=st.one_of(anything, st.integers(10, 12)),
    top_k=st.one_of(anything, st.integers(1, 5)),
)
def test_generate_any_controls(handlers, seed, steps, top_k):
    outputs = handlers.generate(None, seed, steps, top_k, None, progress=QUIET)
    assert isinstance(outputs, GenerateOutputs)
    if not _refused(outputs, "status"):
        assert outputs.session.attribution.trajectory.steps == min(max(int(float(steps)), 10), 200)
        assert (
            1 <= outputs.top_k <= 32
            and len(outputs.session.attribution.steps[0].positive.ids) == outputs.top_k
        )


@settings(max_examples=40, **RELAXED)
@given(
    step=anything,
    sign=st.one_of(st.sampled_from(["positive", "negative"]), st.text(max_size=5), st.none()),
    rank=anything,
)
def test_select_influencer_any_input(handlers, session, step, sign, rank):
    outputs = handlers.select_influencer(session, step, sign, rank)
    assert _refused(outputs, "chosen_info") or outputs.chosen_info.startswith(f"**{sign} influencer at step ")


@settings(max_examples=30, **RELAXED)
@given(
    image=st.one_of(
        st.none(),
        st.text(max_size=20),
        st.dictionaries(st.text(max_size=4), st.text(max_size=20), max_size=2),
    ),
    timestep=anything,
    top_k=anything,
)
def test_attribute_image_any_payload(handlers, image, timestep, top_k):
    """A refused upload clears the earlier results, so they are never taken for this image's."""
    outputs = handlers.attribute_image(image, timestep, top_k, None)
    assert outputs.image_status.startswith("**Not done:**") and outputs.seen is None
    assert outputs.image_positive == outputs.image_negative == []


def test_a_bad_seed_after_a_good_generate_keeps_the_results_and_says_so(handlers):
    session = handlers.generate(None, 11, 12, 4, None, progress=QUIET).session
    outputs = handlers.generate(session, -5, 12, 4, None, progress=QUIET)
    assert all(o == gr.skip() for name, o in zip(outputs._fields, outputs) if name != "status")
    assert (
        outputs.status.startswith("**Not done:** seed -5")
        and "Still shown: seed 11 · 12 steps" in outputs.status
    )
    assert handlers.rollouts(session, progress=QUIET) == skipped(RolloutOutputs)  # its completions stopped


def test_the_selected_influencer_follows_the_step(handlers):
    session = handlers.generate(None, 11, 12, 4, None, progress=QUIET).session
    first = session.attribution.steps[5].positive
    handlers.select_influencer(session, 5, "positive", 0)
    chosen = int(first.positions[0])
    for step in (5, 0, 11):
        info = ChosenOutputs(*handlers.follow_step(session, step, "")[:3]).chosen_info
        assert f"at step {step} " in info and f"id {int(handlers._index(None).train_ids[chosen])}" in info
        listed = session.attribution.steps[step].positive.positions.tolist()
        assert (
            (f"#{listed.index(chosen) + 1} of the positive list" in info)
            if chosen in listed
            else ("not in the positive list" in info)
        )
    new = handlers.reattribute(session, 11, None, 3)
    assert session.selected is None and (new.chosen, new.chosen_plot, new.chosen_info) == (
        None,
        None,
        NO_INFLUENCER,
    )
