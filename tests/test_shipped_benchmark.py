"""The shipped-model benchmark on the tiny digits model: split disjointness, the per-step truth, resuming, and
LDS scores read through an index equal to the scoring module's."""

import json

import numpy as np
import pytest
import torch

from explorer.data import load_dataset, to_model_range, train_heldout_split
from explorer.errors import ExplorerError
from explorer.features import FeatureComputer, FeatureSpec
from explorer.index import AttributionIndex
from explorer.model import load_model
from explorer.sampler import generate
from explorer.scoring import all_scores, fit_bucket
from precompute.evaluation.metrics import predictions
from precompute.evaluation.shipped.lds import index_predictions, run_shipped_lds, split
from precompute.evaluation.shipped.step_counterfactual import (
    StepCounterfactualConfig,
    removals,
    run_step_counterfactual,
    summarize,
)
from precompute.evaluation.shipped.step_quality import heldout_split
from precompute.evaluation.shipped.truth import Queries, Truth, TruthConfig, load_truth, run_truth
from precompute.featurize.pipeline import FEATURES_NAME, FeaturizeOptions, featurize, reindex

TRAIN_SIZE = 1617  # sklearn digits' training split
TINY = TruthConfig(
    subsets=4,
    seed_repeats=1,
    steps=2,
    generated_seeds=(1000, 1001, 1002, 1003),
    dev_seeds=2,
    sampler_steps=10,
    journey_steps=(0, 5, 9),
    pairs_per_bucket=1,
    proxy_pairs=2,
    buckets=4,
)


@pytest.fixture(scope="module")
def truth_dir(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("truth")
    results, cache = folder / "results", folder / "cache"
    assert run_truth(results, cache, str(tiny_model_dir), "digits", TINY, stop_after=2) == 2
    first = {path.name: path.read_bytes() for path in results.glob("subset_*.npz")}
    assert (
        run_truth(results, cache, str(tiny_model_dir), "digits", TINY) == 3
    )  # resumes: only the missing three
    assert all(
        (results / name).read_bytes() == data for name, data in first.items()
    )  # finished files untouched
    return results


def test_dev_and_test_share_no_query_no_trajectory_and_no_model(truth_dir, tiny_model_dir):
    queries = Queries.load(truth_dir / "queries.npz")
    table = load_truth(truth_dir, TRAIN_SIZE)
    parts = split(table, queries, TINY)
    for rows in (parts.models, parts.heldout, parts.generated):
        assert len(rows["dev"]) and len(rows["test"]) and not set(rows["dev"]) & set(rows["test"])
    assert set(queries.seeds[parts.generated["dev"]]).isdisjoint(queries.seeds[parts.generated["test"]])
    assert len(parts.heldout["dev"]) + len(parts.heldout["test"]) == len(queries.heldout_ids)
    assert set(table.subsets[parts.models["dev"]] % 2) == {0} and set(
        table.subsets[parts.models["test"]] % 2
    ) == {1}
    # the label-agreement evaluation splits the held-out digits the same way
    assert np.array_equal(queries.heldout_dev, heldout_split(len(queries.heldout_ids)))
    # seed repeats are kept apart from the LDS models
    assert (table.seeds == 1).sum() == 1 and not set(np.flatnonzero(table.seeds == 1)) & set(
        parts.models["dev"]
    )


def test_per_step_truth_is_the_loss_at_the_trajectorys_own_xt(truth_dir, tiny_model_dir):
    model = load_model(tiny_model_dir)
    queries = Queries.load(truth_dir / "queries.npz")
    _, heldout = train_heldout_split(load_dataset("digits", model.sample_size))
    measured = Truth(queries, to_model_range(heldout.images), TINY, model.num_train_timesteps).measure(model)
    g, j = 1, 2
    t = int(queries.timesteps[g, j])
    abar = model.scheduler.alphas_cumprod[t]
    xt, final = torch.from_numpy(queries.xt[g, j][None]), torch.from_numpy(queries.finals[g][None])
    target = (xt - abar.sqrt() * final) / (1 - abar).sqrt()  # the noise that joins x_t to the final image
    with torch.no_grad():
        expected = (model.unet(xt, torch.tensor([t])).sample - target).pow(2).mean().item()
    assert measured["step_trajectory"][g, j] == pytest.approx(expected, rel=1e-5)
    assert measured["step_proxy"][g, j] != pytest.approx(
        expected, rel=1e-3
    )  # the re-noised proxy is another measure
    assert measured["whole_by_bucket"].shape == (len(heldout) + len(queries.seeds), TINY.buckets)
    # the results folder holds subset models' truth, which differs from the full model's
    recorded = load_truth(truth_dir, TRAIN_SIZE).rows["step_trajectory"]
    assert not np.allclose(recorded[0], measured["step_trajectory"])


def test_truth_folder_refuses_other_settings(truth_dir, tiny_model_dir, tmp_path):
    changed = TruthConfig(
        **{
            **json.loads((truth_dir / "config.json").read_text())["truth"],
            "steps": 3,
            "generated_seeds": TINY.generated_seeds,
            "journey_steps": TINY.journey_steps,
        }
    )
    with pytest.raises(ExplorerError, match="differs in truth"):
        run_truth(truth_dir, tmp_path / "cache", str(tiny_model_dir), "digits", changed)


def test_lds_predictions_through_the_index_equal_the_scoring_module(
    truth_dir, tiny_model, tiny_index_dir, tmp_path
):
    exact = AttributionIndex.load(
        reindex(tiny_index_dir, tmp_path / "fp32", FeaturizeOptions(storage="float32"))
    )
    queries = Queries.load(truth_dir / "queries.npz")
    whole = queries.finals  # (G, C, S, S)
    masks = np.random.default_rng(0).random((5, exact.meta.count)) < 0.5
    served = index_predictions(exact, tiny_model, whole, queries, masks)
    raw = np.load(tiny_index_dir / FEATURES_NAME)  # (B, N, k)
    computer = FeatureComputer(tiny_model, exact.meta.spec)
    query_phi = computer.all_bucket_features(torch.from_numpy(whole)).numpy()  # (G, B, k)
    for bucket in range(exact.buckets):
        scorer, _ = fit_bucket(raw[bucket], exact.meta.lambdas[bucket].relative, center=True, normalize=True)
        expected = predictions(
            masks, all_scores(scorer.vectors(raw[bucket]), scorer.vectors(query_phi[:, bucket]))
        )
        assert np.abs(served.whole_by_bucket[:, :, bucket] - expected).max() < 1e-4 * np.abs(expected).max()


@pytest.fixture(scope="module")
def full_index(tmp_path_factory, tiny_model, digits_splits):
    """A tiny index of the whole digits training split (what the truth's subsets are drawn from)."""
    out = tmp_path_factory.mktemp("full") / "index"
    featurize(
        tiny_model,
        digits_splits[0],
        out,
        FeatureSpec(output="square", buckets=TINY.buckets, proj_dim=32),
        FeaturizeOptions(chunk_size=400),
    )
    return out


@pytest.mark.slow
def test_lds_table_on_the_tiny_truth(
    truth_dir, tiny_model, tiny_index_dir, full_index, digits_splits, tmp_path
):
    train, heldout = digits_splits
    with pytest.raises(
        ExplorerError, match="rows, the ground truth"
    ):  # the tiny index holds 200 of the 1617 rows
        run_shipped_lds([str(tiny_index_dir)], tiny_model, truth_dir, train.images, heldout.images, tmp_path)
    full = full_index
    results = run_shipped_lds([str(full)], tiny_model, truth_dir, train.images, heldout.images, tmp_path)
    assert results["truth"]["models"] == TINY.subsets and results["ceiling"]["subsets"] == 1
    for name in (str(full), "pixel", "random"):
        test = results["methods"][name]["test"]
        for column in ("heldout", "generated", "step_trajectory", "step_proxy"):
            low, high = test[column]["ci95"]
            assert -1 <= low <= high <= 1 or np.isnan(test[column]["mean"])
        assert len(test["heldout_by_bucket"]) == TINY.buckets and len(test["step_trajectory_by_step"]) == 3
    # with two models per split the rank correlation is +-1 for every query: a check that predictions are
    # wired
    dev = results["methods"][str(full)]["dev"]["heldout"]
    assert dev["models"] == 2 and dev["queries"] == len(heldout) // 2


@pytest.mark.slow
def test_step_counterfactual_removes_the_served_top_k_and_resumes(
    tiny_model_dir, tiny_model, full_index, tmp_path
):
    config = StepCounterfactualConfig(
        seeds=(2000, 2001), steps=(3, 7), sampler_steps=10, fraction=0.01, random_sets=1, completions=4
    )
    results, cache = tmp_path / "results", tmp_path / "cache"

    def run() -> int:
        return run_step_counterfactual(
            results, cache, str(tiny_model_dir), str(full_index), config, TINY, "digits"
        )

    assert run() == 2 + 2 + 2 * 2  # reference, one random set, pixel per query, top-k per (query, step)
    assert run() == 0  # everything is in the results folder: nothing is retrained
    index = AttributionIndex.load(full_index)
    expected = removals(index, tiny_model, {2000: generate(tiny_model, 2000, 10)}, config, 16)[
        ("topk", 2000, 7)
    ]
    recorded = json.loads((results / "topk_seed2000_step7.json").read_text())
    assert (
        recorded["removed_ids"] == index.train_ids[expected].tolist()
    )  # the explorer's own top-16 at that step
    assert json.loads((results / "reference.json").read_text())["removed_ids"] == []
    summary = summarize(results)
    assert set(summary["steps"]) == {"3", "7"} and all(
        entry["queries"] == 2 for entry in summary["steps"].values()
    )
    for entry in summary["steps"].values():
        assert all(0 <= entry["tv"][kind]["mean"] <= 1 for kind in ("topk", "random", "pixel"))


def test_step_quality_of_a_served_index_from_uncached_features(tiny_model, tiny_index_dir, digits_splits):
    """`evaluate step-quality` end to end on the tiny model, with query features computed, not cached."""
    from precompute.evaluation.shipped.step_quality import served_quality

    _, heldout = digits_splits
    result = served_quality(tiny_model, [str(tiny_index_dir)], heldout.images[:20], heldout.labels[:20])
    per_bucket = result[str(tiny_index_dir)]["per_bucket"]
    index = AttributionIndex.load(tiny_index_dir)
    assert list(per_bucket) == [str(t[0]) for t in index.meta.timesteps]
    for entry in per_bucket.values():
        assert set(entry) == {"dev", "test", "all"} and 0 <= entry["all"]["label_agreement"] <= 1
