"""Every index method against a brute-force computation on the tiny model: per-example gradients by plain
autograd (no vmap), the seeded count-sketch, and the method's formula in float64 numpy; then the index's
own scores (explorer.index_methods.query_computer + AttributionIndex) must match."""

import dataclasses

import numpy as np
import pytest
import torch

from explorer.attribution import Explorer
from explorer.data import to_model_range
from explorer.errors import ExplorerError
from explorer.features import FeatureComputer, FeatureSpec
from explorer.index import AttributionIndex
from explorer.index_methods import checkpoint_model, query_computer
from explorer.projector import CountSketchProjector
from precompute.featurize.method_build import MethodOptions, history_checkpoints
from precompute.featurize.pipeline import FeaturizeOptions, featurize, reindex

SPEC = FeatureSpec(output="mean", buckets=2, proj_dim=64)
ROWS, QUERIES = 40, 3


def autograd_features(model, spec: FeatureSpec, images: torch.Tensor, bucket: int) -> np.ndarray:
    """(P, k): the count-sketch of each image's gradient of spec.output at `bucket`, one backward each."""
    computer = FeatureComputer(model, spec)  # for its noise bank, timesteps and output function only
    sketch = CountSketchProjector(computer.num_params, spec.proj_dim, spec.proj_seed)
    out = []
    for x0 in images:
        params = {name: p.detach().clone().requires_grad_(True) for name, p in computer.params.items()}
        f = computer._output(params, x0, computer.draw_timesteps[bucket], computer.noise[bucket])
        grads = torch.autograd.grad(f, [params[name] for name in computer.names])
        out.append(sketch.project([g[None] for g in grads])[0].double().numpy())
    return np.stack(out)


@pytest.fixture(scope="module")
def rows_and_queries(tiny_train_subset, digits_splits):
    train = tiny_train_subset.subset(np.arange(ROWS), "methods")
    queries = torch.from_numpy(to_model_range(digits_splits[1].images[:QUERIES]))
    return train, queries


def build(model, train, out, method: MethodOptions, **options):
    featurize(model, train, out, SPEC, FeaturizeOptions(chunk_size=16, method=method, **options))
    return AttributionIndex.load(out)


def index_scores(index: AttributionIndex, model, queries: torch.Tensor, bucket: int) -> np.ndarray:
    """(Q, N) through the explorer's path: the method's query featurizer, the scorers, the stored rows."""
    computer = query_computer(index.meta.method, index.meta.spec, index.directory, model)
    phi = computer.features(queries, torch.full((len(queries),), bucket)).numpy()
    vectors = index.query_vectors(phi, np.full(len(queries), bucket))
    return np.stack([index.scores(v, bucket) for v in vectors])


@pytest.mark.parametrize("kernel", ["output", "loss"])
def test_das_scores_are_the_output_change_of_the_newton_step(
    tiny_model, tiny_index_dir, rows_and_queries, tmp_path, kernel
):
    train, queries = rows_and_queries
    method = MethodOptions("das", das_kernel=kernel)
    index = build(tiny_model, train, tmp_path / "das", method, normalize=False, relative_lambda=0.1)
    assert index.meta.method.das_kernel == kernel
    images = torch.from_numpy(to_model_range(train.images))
    loss_spec = dataclasses.replace(SPEC, output="loss")
    for bucket in range(SPEC.buckets):
        kernel_rows = autograd_features(tiny_model, SPEC, images, bucket)  # grad f_i: the kernel (GGN of f)
        loss_rows = autograd_features(tiny_model, loss_spec, images, bucket)  # grad L_i = J_i^T r_i
        query = autograd_features(tiny_model, SPEC, queries, bucket)  # grad f(eps(x_q))
        fisher = loss_rows if kernel == "loss" else kernel_rows  # whose gradients approximate the GGN
        centered = fisher - fisher.mean(0)
        lam = index.meta.lambdas[bucket].value
        gram = centered.T @ centered + lam * np.eye(SPEC.proj_dim)
        expected = (query - kernel_rows.mean(0)) @ np.linalg.solve(gram, (loss_rows - loss_rows.mean(0)).T)
        got = index_scores(index, tiny_model, queries, bucket)
        np.testing.assert_allclose(got, expected, rtol=2e-3, atol=2e-3 * np.abs(expected).max())
    with pytest.raises(ExplorerError, match="--das-kernel applies to a das index"):
        reindex(tiny_index_dir, tmp_path / "x", FeaturizeOptions(), das_kernel="loss")  # a trak index


@pytest.mark.parametrize("name", ["tracin", "retrac"])
def test_tracin_and_retrac_sum_over_checkpoints(tiny_model, tiny_model_dir, rows_and_queries, tmp_path, name):
    train, queries = rows_and_queries
    history = tiny_model_dir / "checkpoint" / "history"
    method = MethodOptions(name, checkpoints=str(history), num_checkpoints=2)
    index = build(tiny_model, train, tmp_path / name, method, normalize=False, center=False)
    assert [c.step for c in index.meta.method.checkpoints] == [
        step for _, step, _ in history_checkpoints(history, 2)
    ]
    images = torch.from_numpy(to_model_range(train.images))
    one = dataclasses.replace(SPEC, proj_dim=SPEC.proj_dim // 2)
    for bucket in range(SPEC.buckets):
        expected = 0.0
        for checkpoint in index.meta.method.checkpoints:
            weights = checkpoint_model(tiny_model, index.directory / checkpoint.file)
            g_rows = autograd_features(weights, one, images, bucket)
            g_query = autograd_features(weights, one, queries, bucket)
            if name == "retrac":  # unit-norm gradients per checkpoint
                g_rows = g_rows / np.linalg.norm(g_rows, axis=1, keepdims=True)
                g_query = g_query / np.linalg.norm(g_query, axis=1, keepdims=True)
                expected = expected + g_query @ g_rows.T
            else:
                expected = expected + checkpoint.learning_rate * g_query @ g_rows.T
        got = index_scores(index, tiny_model, queries, bucket)
        np.testing.assert_allclose(got, expected, rtol=2e-3, atol=2e-3 * np.abs(expected).max())


def test_the_explorer_serves_every_method(tiny_model_dir, tiny_model, rows_and_queries, tmp_path):
    train, _ = rows_and_queries
    history = str(tiny_model_dir / "checkpoint" / "history")
    built = [
        build(tiny_model, train, tmp_path / "das", MethodOptions("das")),
        build(
            tiny_model,
            train,
            tmp_path / "retrac",
            MethodOptions("retrac", checkpoints=history, num_checkpoints=2),
        ),
    ]
    explorer = Explorer.from_dirs(tiny_model_dir, [index.directory for index in built])
    labels = []
    for name in explorer.indexes:
        attribution = explorer.generate(seed=3, steps=10, index_name=name, top_k=5)
        for step in attribution.steps:
            assert len(step.positive.ids) == 5 and np.isfinite(step.scores).all()
            assert step.positive.scores[0] >= step.negative.scores[0]
        labels.append(explorer.indexes[name].label)
    assert labels[0].startswith("DAS") and labels[1].startswith("ReTrac")
    image = (train.images[0]).astype(np.uint8)
    with pytest.raises(ExplorerError, match="region attribution needs one model"):
        explorer.attribute_image(
            image, 10, index_name=list(explorer.indexes)[1], top_k=3, region=(0, 0, 4, 4)
        )


def test_bad_method_inputs_are_named(tiny_model, tiny_model_dir, rows_and_queries, tmp_path):
    train, _ = rows_and_queries
    with pytest.raises(ExplorerError, match="needs --checkpoints DIR"):
        build(tiny_model, train, tmp_path / "a", MethodOptions("tracin"))
    with pytest.raises(ExplorerError, match="holds no step_"):
        build(tiny_model, train, tmp_path / "b", MethodOptions("tracin", checkpoints=str(tmp_path)))
    history = str(tiny_model_dir / "checkpoint" / "history")
    with pytest.raises(ExplorerError, match="exceeds the 3 checkpoints"):
        build(
            tiny_model, train, tmp_path / "c", MethodOptions("tracin", checkpoints=history, num_checkpoints=9)
        )
    with pytest.raises(ExplorerError, match="does not split across 3 checkpoints"):
        build(
            tiny_model, train, tmp_path / "d", MethodOptions("retrac", checkpoints=history, num_checkpoints=3)
        )
    kronecker = dataclasses.replace(SPEC, projector="kronecker")
    with pytest.raises(
        ExplorerError, match="replaces the count-sketch of exact gradients, not the 'kronecker'"
    ):
        FeatureComputer(tiny_model, kronecker, projector=CountSketchProjector(10, 4, 0))
    with pytest.raises(ExplorerError, match="does not combine with --method das"):
        build(tiny_model, train, tmp_path / "e", MethodOptions("das"), das_weights=True)


def preconditioned(plain: FeatureComputer, preconditioner, images: torch.Tensor, bucket: int) -> np.ndarray:
    """(P, width): (H + lambda I)^-1/2 of each image's autograd gradient, the blocks concatenated."""
    rows = []
    for x0 in images:
        params = {name: p.detach().clone().requires_grad_(True) for name, p in plain.params.items()}
        f = plain._output(params, x0, plain.draw_timesteps[bucket], plain.noise[bucket])
        grads = torch.autograd.grad(f, [params[name] for name in plain.names])
        blocks = preconditioner.precondition([g[None] for g in grads])
        rows.append(torch.cat([b.reshape(1, -1) for b in blocks], 1)[0].double().numpy())
    return np.stack(rows)


def test_ekfac_scores_are_preconditioned_inner_products(tiny_model, rows_and_queries, tmp_path):
    """At proj_dim = the parameter count the sketch is the identity, so the index must give exactly
    <(H + lambda I)^-1/2 grad f_q, (H + lambda I)^-1/2 grad L_i> with the stored factors."""
    train, queries = rows_and_queries
    width = FeatureComputer(tiny_model, SPEC).num_params
    spec = dataclasses.replace(SPEC, output="loss", proj_dim=width)
    out = tmp_path / "ekfac"
    method = MethodOptions("ekfac", relative_damping=0.1, fit_images=16, fit_samples_per_image=2)
    featurize(
        tiny_model,
        train,
        out,
        spec,
        FeaturizeOptions(chunk_size=16, method=method, normalize=False, center=False),
    )
    index = AttributionIndex.load(out)
    assert index.meta.method.fit_images == 16 and index.meta.method.relative_damping == 0.1
    computer = query_computer(index.meta.method, index.meta.spec, index.directory, tiny_model)
    preconditioner = computer.projector
    images = torch.from_numpy(to_model_range(train.images))
    plain = FeatureComputer(tiny_model, spec)
    for bucket in range(spec.buckets):
        expected = (
            preconditioned(plain, preconditioner, queries, bucket)
            @ preconditioned(plain, preconditioner, images, bucket).T
        )
        got = index_scores(index, tiny_model, queries, bucket)
        np.testing.assert_allclose(got, expected, rtol=2e-3, atol=2e-3 * np.abs(expected).max())


def test_reindex_as_retrac_equals_featurize_retrac(tiny_model, tiny_model_dir, rows_and_queries, tmp_path):
    train, _ = rows_and_queries
    history = str(tiny_model_dir / "checkpoint" / "history")
    flat = {"normalize": False, "center": False}
    tracin = build(
        tiny_model,
        train,
        tmp_path / "t",
        MethodOptions("tracin", checkpoints=history, num_checkpoints=2),
        keep_features=True,
        **flat,
    )
    retrac = build(
        tiny_model,
        train,
        tmp_path / "r",
        MethodOptions("retrac", checkpoints=history, num_checkpoints=2),
        **flat,
    )
    derived = AttributionIndex.load(
        reindex(tracin.directory, tmp_path / "d", FeaturizeOptions(**flat), as_retrac=True)
    )
    assert derived.meta.method == retrac.meta.method
    for bucket in range(SPEC.buckets):
        np.testing.assert_allclose(derived.vectors(bucket), retrac.vectors(bucket), rtol=1e-5, atol=1e-6)
    with pytest.raises(ExplorerError, match="--as-retrac turns a tracin index"):
        reindex(retrac.directory, tmp_path / "e", FeaturizeOptions(), as_retrac=True)


def test_the_app_offers_every_method_in_its_dropdown(tiny_model_dir, tiny_model, rows_and_queries, tmp_path):
    """A real Gradio server over DAS, ReTrac and EK-FAC indexes: generate with one, switch to the others."""
    from app_fixtures import start_app
    from gradio_client import Client

    from explorer.web.session import ReattributeOutputs

    train, _ = rows_and_queries
    history = str(tiny_model_dir / "checkpoint" / "history")
    directories = [
        build(tiny_model, train, tmp_path / "das", MethodOptions("das")).directory,
        build(
            tiny_model,
            train,
            tmp_path / "retrac",
            MethodOptions("retrac", checkpoints=history, num_checkpoints=2),
        ).directory,
        build(
            tiny_model,
            train,
            tmp_path / "ekfac",
            MethodOptions("ekfac", fit_images=8, fit_samples_per_image=1),
        ).directory,
    ]
    app = start_app(tiny_model_dir, *directories)
    names = list(app.explorer.indexes)
    assert [name.split(" (")[1].split(",")[0] for name in names] == ["DAS", "ReTrac", "EK-FAC IF"]
    client = Client(app.url, verbose=False)
    client.predict(3, 10, 4, names[0], "", 1.0, api_name="/generate")  # the page's events take every input
    for name in names[1:]:
        status = dict(
            zip(ReattributeOutputs._fields, client.predict(9, name, 4, api_name="/reattribute_index"))
        )
        status = status["status"]
        assert name in status
