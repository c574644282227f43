"""Property-based tests of the UI handlers: any input gives an answer or a refusal in its status slot that
leaves every other output as it was, never a crash."""

import gradio as gr
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from explorer.web.handlers import NO_INFLUENCER, Handlers

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
    return handlers.generate(11, 12, 4, None, progress=lambda *a, **k: None)[0]


def _refused(outputs: tuple, message_at: int) -> bool:
    """Whether a handler refused its input: every output skipped but the status slot, which says why."""
    message = outputs[message_at]
    if not (isinstance(message, str) and message.startswith("**Not done:**")):
        return False
    assert "Traceback" not in message
    assert all(o == gr.skip() for i, o in enumerate(outputs) if i != message_at), "earlier results stay"
    return True


@settings(max_examples=120, **RELAXED)
@given(step=anything)
def test_scrub_any_step(handlers, session, step):
    outputs = handlers.scrub(session, step)
    assert len(outputs) == 10
    assert _refused(outputs, 6) or outputs[6].startswith(f"step {int(float(step))} ")


@settings(max_examples=60, **RELAXED)
@given(
    seed=anything,
    steps=st.one_of(anything, st.integers(10, 12)),
    top_k=st.one_of(anything, st.integers(1, 5)),
)
def test_generate_any_controls(handlers, seed, steps, top_k):
    outputs = handlers.generate(seed, steps, top_k, None, progress=lambda *a, **k: None)
    assert len(outputs) == 15
    if not _refused(outputs, 10):
        assert outputs[0].attribution.trajectory.steps == int(float(steps))
        assert 1 <= outputs[-1] <= 32 and len(outputs[0].attribution.steps[0].positive.ids) == outputs[-1]


@settings(max_examples=40, **RELAXED)
@given(
    step=anything,
    sign=st.one_of(st.sampled_from(["positive", "negative"]), st.text(max_size=5), st.none()),
    rank=anything,
)
def test_select_influencer_any_input(handlers, session, step, sign, rank):
    outputs = handlers.select_influencer(session, step, sign, rank)
    assert _refused(outputs, 2) or outputs[2].startswith(f"**{sign} influencer at step ")


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
    assert _refused(handlers.attribute_image(image, timestep, top_k, None), 3)


def test_a_bad_seed_after_a_good_generate_keeps_the_results(handlers, session):
    outputs = handlers.generate(-5, 12, 4, None, progress=lambda *a, **k: None)
    assert _refused(outputs, 10) and "seed -5" in outputs[10]


def test_the_selected_influencer_follows_the_step(handlers):
    session = handlers.generate(11, 12, 4, None, progress=lambda *a, **k: None)[0]
    first = session.attribution.steps[5].positive
    handlers.select_influencer(session, 5, "positive", 0)
    chosen = int(first.positions[0])
    for step in (5, 0, 11):
        view = handlers.scrub(session, step)
        info = view[9]
        assert f"at step {step} " in info and f"id {int(handlers._index(None).train_ids[chosen])}" in info
        listed = session.attribution.steps[step].positive.positions.tolist()
        assert (
            (f"#{listed.index(chosen) + 1} of the positive list" in info)
            if chosen in listed
            else ("not in the positive list" in info)
        )
    new = handlers.reattribute(session, 11, None, 3)
    assert new[0].selected is None and new[-4:-1] == (None, None, NO_INFLUENCER)  # a new top-k: no selection
