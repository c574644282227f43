"""Property-based tests of the UI handlers: any input gives an answer or a clear gr.Error, never a crash."""

import gradio as gr
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from explorer.web.handlers import Handlers

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


def _clear(error: gr.Error) -> None:
    message = str(error.message if hasattr(error, "message") else error)
    assert message and "Traceback" not in message


@settings(max_examples=120, **RELAXED)
@given(step=anything)
def test_scrub_any_step(handlers, session, step):
    try:
        outputs = handlers.scrub(session, step)
    except gr.Error as error:
        _clear(error)
    else:
        assert len(outputs) == 7 and outputs[-1].startswith(f"step {int(float(step))} ")


@settings(max_examples=60, **RELAXED)
@given(
    seed=anything,
    steps=st.one_of(anything, st.integers(10, 12)),
    top_k=st.one_of(anything, st.integers(1, 5)),
)
def test_generate_any_controls(handlers, seed, steps, top_k):
    try:
        outputs = handlers.generate(seed, steps, top_k, None, progress=lambda *a, **k: None)
    except gr.Error as error:
        _clear(error)
    else:
        assert outputs[0].attribution.trajectory.steps == int(float(steps))


@settings(max_examples=40, **RELAXED)
@given(
    step=anything,
    sign=st.one_of(st.sampled_from(["positive", "negative"]), st.text(max_size=5), st.none()),
    rank=anything,
)
def test_select_influencer_any_input(handlers, session, step, sign, rank):
    try:
        large, plot, text = handlers.select_influencer(session, step, sign, rank)
    except gr.Error as error:
        _clear(error)
    else:
        assert text.startswith(f"**{sign} influencer #")


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
    with pytest.raises(gr.Error) as raised:
        handlers.attribute_image(image, timestep, top_k, None)
    _clear(raised.value)
