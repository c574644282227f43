"""Property-based tests: malformed inputs at the engine's boundaries give an ExplorerError that names the
bad value and the fix, never a crash; valid inputs get an answer."""

import io
import json
import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from explorer.attribution import MAX_TOP_K
from explorer.errors import ExplorerError
from explorer.index import CENTER_FORMAT_VERSION, META_NAME, READABLE_VERSIONS, AttributionIndex, bucket_file
from precompute.featurize.pipeline import FEATURES_NAME

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=8,
)
META_KEYS = [
    "format_version",
    "model_hash",
    "spec",
    "files",
    "count",
    "normalize",
    "dataset",
    "lambda",
    "num_train_timesteps",
]
MISSING = object()  # the key is dropped from meta.json
REBUILD = "rebuild the index with `python -m precompute featurize`"
# json_values holds lists of at most 3 items and keys of at most 8 characters, so it never builds a valid
# spec, files, dataset (class_names has 11 characters) or lambda (one entry per bucket, 4 buckets).
ALWAYS_INVALID = {
    "spec": "must hold exactly the FeatureSpec fields",
    "files": "must list exactly the bucket, whitening and training-data files with their sha256",
    "dataset": "must be a non-empty list of strings",
    "lambda": "must list one {value, relative, method, gcv_curve} per bucket",
}


def _whole(value, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def expected_refusal(meta: dict, meta_path, key: str, value) -> list[str] | None:
    """What AttributionIndex.load must say when the built index's meta.json (`meta`, at `meta_path`) has
    `key` set to `value` (MISSING: dropped) and nothing else changed: the fragments the message must hold
    (the file, the field or value it names, and the fix), or None where the value is valid and the index
    must load."""
    where = repr(str(meta_path))
    if key == "format_version":
        if value is MISSING:
            return [f"{where} has no format_version", "it is not an index written by precompute"]
        if not _whole(value, 0) or value not in READABLE_VERSIONS:
            versions = ", ".join(map(str, READABLE_VERSIONS))
            return [
                f"has format version {value!r}, this explorer reads versions {versions}",
                "rebuild it with this version's `python -m precompute featurize`",
            ]
        if meta.get("center") and value < CENTER_FORMAT_VERSION:
            return [
                f"{where} is malformed (center needs format_version {CENTER_FORMAT_VERSION}, not {value})",
                REBUILD,
            ]
        return None
    field = "dataset.class_names" if key == "dataset" else key
    if key in ALWAYS_INVALID:
        return [f"{where} is malformed ({field} is ", ALWAYS_INVALID[key], REBUILD]
    shown = (
        "is missing"
        if value is MISSING
        else f"is {value!r}"
        if isinstance(value, str)
        else f"is {json.dumps(value)}"[:60]
    )
    bad = f"{where} is malformed ({key} {shown}"
    if key == "model_hash":
        return None if isinstance(value, str) else [bad, "must be a string", REBUILD]
    if key == "normalize":
        return None if isinstance(value, bool) else [bad, "must be true or false", REBUILD]
    if key == "num_train_timesteps":
        if value is MISSING or not _whole(value, 1):
            return [bad, "must be a positive integer", REBUILD]
        if value < meta["spec"]["buckets"]:
            return [f"(spec.buckets {meta['spec']['buckets']} exceeds num_train_timesteps {value})", REBUILD]
        if value <= max(max(bucket) for bucket in meta["timesteps"]):
            return ["(timesteps is ", "must list the train timesteps of each of the", REBUILD]
        return None
    if key == "count":
        if value is MISSING or not _whole(value, 0):
            return [bad, "must be a non-negative integer", REBUILD]
        if value == meta["count"]:
            return None
        rows, dim = meta["count"], meta["spec"]["proj_dim"]
        return [
            f"{bucket_file(0)} holds {rows} x {dim} vectors, meta.json says {value} x {dim}",
            "rebuild the index",
        ]
    raise AssertionError(f"no expectation for meta key {key!r}")


@pytest.fixture(scope="module")
def index_copy(tiny_index_dir, tmp_path_factory):
    target = tmp_path_factory.mktemp("robust") / "index"
    shutil.copytree(tiny_index_dir, target, ignore=shutil.ignore_patterns(FEATURES_NAME))
    return target


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(META_KEYS), value=json_values, drop=st.booleans())
def test_malformed_meta_is_refused_clearly(index_copy, key, value, drop):
    original = (index_copy / META_NAME).read_text()
    meta = json.loads(original)
    value = MISSING if drop else json.loads(json.dumps(value))  # as the loader reads it back (NaN, -0.0, ...)
    expected = expected_refusal(json.loads(original), index_copy / META_NAME, key, value)
    if value is MISSING:
        meta.pop(key, None)
    else:
        meta[key] = value
    try:
        (index_copy / META_NAME).write_text(json.dumps(meta))
        if expected is None:
            loaded = AttributionIndex.load(index_copy)
            assert loaded.meta.to_json()[key] == value
        else:
            with pytest.raises(ExplorerError) as error:
                AttributionIndex.load(index_copy)
            for fragment in expected:
                assert fragment in str(error.value)
    finally:
        (index_copy / META_NAME).write_text(original)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=2048))
def test_garbage_index_files_are_refused_clearly(index_copy, data):
    path = index_copy / bucket_file(1)
    original = path.read_bytes()
    try:
        path.write_bytes(data)
        with pytest.raises(ExplorerError) as error:
            AttributionIndex.load(index_copy)
        message = str(error.value)
        assert f"index file {str(path)!r} is corrupt or truncated (checksum mismatch)" in message
        assert REBUILD in message
    finally:
        path.write_bytes(original)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    width=st.integers(1, 64),
    height=st.integers(1, 64),
    mode=st.sampled_from(["L", "RGB", "RGBA", "P", "1", "I", "F", "LA"]),
    timestep=st.integers(-5, 1005),
    top_k=st.integers(-2, 120),
    seed=st.integers(0, 2**16),
)
def test_any_query_image_gets_an_answer_or_a_clear_error(
    tiny_explorer, width, height, mode, timestep, top_k, seed
):
    last_timestep = tiny_explorer.model.num_train_timesteps - 1
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).convert(mode)
    try:
        result = tiny_explorer.attribute_image(image, timestep, top_k=top_k)
    except ExplorerError as error:
        message = str(error)
        if not 0 <= timestep <= last_timestep:  # the timestep is checked first
            assert (
                message
                == f"timestep {timestep} is out of range: use a whole number from 0 to {last_timestep}"
            )
        else:
            assert not 1 <= top_k <= MAX_TOP_K, message
            assert message == f"top-k {top_k} is out of range: use a whole number from 1 to {MAX_TOP_K}"
    else:
        assert 0 <= timestep <= last_timestep and 1 <= top_k <= MAX_TOP_K
        assert result.timestep == timestep
        assert len(result.positive.ids) == len(result.negative.ids) == min(top_k, len(result.scores))


def _png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.arange(120, dtype=np.uint8).reshape(10, 12)).save(buffer, format="PNG")
    return buffer.getvalue()


PNG = _png_bytes()


@settings(max_examples=30, deadline=None)
@given(data=st.binary(max_size=512) | st.integers(0, len(PNG) - 1).map(lambda end: PNG[:end]))
def test_corrupt_image_bytes_are_refused_clearly(tmp_path_factory, data):
    from explorer.data import load_image_file

    path = tmp_path_factory.mktemp("img") / "upload.png"
    path.write_bytes(data)
    try:
        array = load_image_file(path, 8)
    except ExplorerError as error:
        message = str(error)
        assert message.startswith(f"image file {str(path)!r} ")
        assert "could not be read as an image" in message and message.endswith(": pass a valid PNG/JPEG file")
    else:
        assert array.shape == (8, 8) and array.dtype == np.uint8
