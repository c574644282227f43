"""The ground truth with signal: the ceiling estimator against synthetic truths with a known signal share,
and the subset models' shared seeds and identical evaluation draws on the tiny digits model."""

import numpy as np
import pytest
import torch

from explorer.data import to_model_range
from explorer.model import load_model
from precompute.evaluation.ceiling import ceiling, leave_one_seed_out, reliability, signal_share
from precompute.evaluation.shipped.ground_truth import (
    GroundTruthConfig,
    Measurement,
    draw_levels,
    prefix_means,
    result_path,
    run_ground_truth,
)
from precompute.evaluation.shipped.truth import TruthConfig, prepare


def synthetic_truth(icc: float, subsets: int, seeds: int, queries: int, seed: int = 0) -> np.ndarray:
    """y[s, m, q] = a[s, q] + b[m, q] + e[s, m, q] with var(a) / (var(a) + var(e)) = icc; the seed offset b is
    large, as shared seeds make it: the estimator must not count it as signal or as noise."""
    rng = np.random.default_rng(seed)
    a = rng.normal(0, np.sqrt(icc), (subsets, 1, queries))
    b = rng.normal(0, 3.0, (1, seeds, queries))
    e = rng.normal(0, np.sqrt(1 - icc), (subsets, seeds, queries))
    return 5.0 + a + b + e


@pytest.mark.parametrize("icc", [0.07, 0.3, 0.8])
def test_signal_share_recovers_a_known_icc(icc):
    share = signal_share(synthetic_truth(icc, subsets=64, seeds=3, queries=400))
    assert share.pooled == pytest.approx(icc, abs=0.04)
    assert share.median == pytest.approx(icc, abs=0.06)


def test_ceiling_of_a_seed_mean_matches_a_perfect_predictor():
    """A method that knows the subset effect a exactly reaches sqrt(reliability) against the m-seed mean."""
    icc, seeds, subsets, queries = 0.15, 3, 64, 600
    rng = np.random.default_rng(1)
    a = rng.normal(0, np.sqrt(icc), (subsets, queries))
    truth = a[:, None] + rng.normal(0, np.sqrt(1 - icc), (subsets, seeds, queries))
    from precompute.evaluation.metrics import spearman_columns

    perfect = np.nanmean(spearman_columns(truth.mean(1), a))
    assert perfect == pytest.approx(ceiling(icc, seeds), abs=0.03)
    assert reliability(icc, 1) == pytest.approx(icc) and ceiling(icc, 3) > ceiling(icc, 1)
    # one seed against the mean of the other two: below the 3-seed ceiling, above the 1-seed one's square
    held_out = np.nanmean(leave_one_seed_out(truth))
    expected = 6 / np.pi * np.arcsin(np.sqrt(icc * reliability(icc, seeds - 1)) / 2)
    assert held_out == pytest.approx(expected, abs=0.03)


@pytest.mark.parametrize("icc", [0.1, 0.4])
def test_pooled_icc_is_unbiased_with_few_subsets(icc):
    """The study has 4 subsets x 3 seeds: the per-query estimates are noisy, the pooled one must not drift."""
    share = signal_share(synthetic_truth(icc, subsets=4, seeds=3, queries=4000, seed=2))
    assert share.pooled == pytest.approx(icc, abs=0.04)


def test_no_signal_gives_a_ceiling_near_zero_and_bad_shapes_are_named():
    assert signal_share(synthetic_truth(0.0, 32, 3, 300)).pooled < 0.05
    with pytest.raises(ValueError, match=r"\(subsets >= 2, seeds >= 2, queries\)"):
        signal_share(np.zeros((8, 1, 5)))


def test_prefix_means_and_levels():
    assert draw_levels(8) == [1, 2, 4, 8] and draw_levels(48) == [1, 2, 4, 8, 16, 32, 48]
    assert draw_levels(1) == [1]
    losses = torch.arange(6.0).view(1, 6)
    assert prefix_means(losses, [1, 3, 6]).tolist() == [[0.0, 1.0, 2.5]]


TINY_QUERIES = TruthConfig(
    subsets=2,
    seed_repeats=0,
    steps=2,
    generated_seeds=(1000, 1001),
    dev_seeds=1,
    sampler_steps=10,
    journey_steps=(0, 5, 9),
    pairs_per_bucket=1,
    proxy_pairs=2,
    buckets=4,
)
TINY = GroundTruthConfig(
    subsets=2,
    seeds=(0, 1),
    stops=(2, 3),
    pairs_per_bucket=2,
    proxy_pairs=3,
    completions=2,
    buckets=4,
    sampler_steps=10,
)


@pytest.fixture(scope="module")
def ground_truth(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("ground")
    queries_dir = folder / "queries"
    prepare(queries_dir, str(tiny_model_dir), "digits", TINY_QUERIES)
    results, cache = folder / "results", folder / "cache"
    assert (
        run_ground_truth(results, cache, str(tiny_model_dir), "digits", TINY, queries_dir, stop_after=1) == 1
    )
    first = result_path(results, 2, 0, 0).read_bytes()
    assert run_ground_truth(results, cache, str(tiny_model_dir), "digits", TINY, queries_dir) == 3
    assert result_path(results, 2, 0, 0).read_bytes() == first  # finished files untouched on resume
    return results, cache


def test_every_subset_is_trained_with_the_same_seeds_and_measured_at_every_stop(ground_truth):
    results, cache = ground_truth
    for stop in TINY.stops:
        for j in range(TINY.subsets):
            for seed in TINY.seeds:
                with np.load(result_path(results, stop, j, seed)) as data:
                    assert (int(data["subset"]), int(data["seed"]), int(data["steps"])) == (j, seed, stop)
                    assert data["proxy_levels"].shape[-1] == len(draw_levels(TINY.proxy_pairs))
                    # the full truth is the last nested level
                    assert np.allclose(data["proxy_levels"][..., -1], data["step_proxy"], atol=1e-6)
                    assert np.allclose(
                        data["whole_levels"][:, -1], data["whole_by_bucket"].mean(1), atol=1e-6
                    )
    # seed m of subset 0 and seed m of subset 1 start from the same weights and draw the same timesteps
    # and noise (only the images differ), so the recipes agree in everything but the data
    recipes = [TINY.recipe(None, seed) for seed in TINY.seeds]
    assert [r.seed for r in recipes] == list(TINY.seeds)
    trained = [load_model(cache / f"subset_{j:03d}_seed0") for j in range(TINY.subsets)]
    assert all(m.weights_hash for m in trained) and trained[0].weights_hash != trained[1].weights_hash


def test_evaluation_draws_are_identical_for_every_model(ground_truth, tiny_model_dir):
    results, cache = ground_truth
    from precompute.evaluation.shipped.ground_truth import TARGETS_NAME
    from precompute.evaluation.shipped.truth import Queries

    queries = Queries.load(results / "queries.npz")
    with np.load(results / TARGETS_NAME) as stored:
        targets = stored["targets"].astype(np.float32)
    heldout = to_model_range(np.zeros((3, 8, 8), dtype=np.float32))
    made = [Measurement(queries, heldout, targets, TINY, 1000) for _ in range(2)]
    for name in ("whole_t", "whole_eps", "proxy_t", "proxy_eps"):
        assert torch.equal(getattr(made[0], name), getattr(made[1], name))
    # the same draws measure two different models: the same model measured twice gives the same rows
    model = load_model(cache / "subset_000_seed1")
    first, second = made[0].measure(model), made[1].measure(model)
    assert all(np.array_equal(first[key], second[key]) for key in first)
    # the proxy draws stay inside the bucket of each step's timestep
    width = 1000 / TINY.buckets
    assert np.all(made[0].proxy_t.numpy() // width == (queries.timesteps // width)[..., None])


def test_the_benchmark_uses_the_seed_mean_and_reports_the_ceiling(ground_truth, digits_splits):
    from precompute.evaluation.shipped.lds import Benchmark, truth_ceiling

    results, _ = ground_truth
    train, heldout = digits_splits
    bench = Benchmark.load(results / "steps_0003", train.images, heldout.images)
    assert bench.seeds_used == len(TINY.seeds) and bench.config.steps == 3
    assert bench.table.subsets.tolist() == [0, 1] and len(bench.per_seed.seeds) == 4
    for j in range(TINY.subsets):
        rows = [np.load(result_path(results, 3, j, seed))["step_proxy"] for seed in TINY.seeds]
        assert np.allclose(bench.table.rows["step_proxy"][j], np.mean(rows, axis=0), atol=1e-6)
    found = truth_ceiling(bench.per_seed, bench.queries, bench.parts, bench.seeds_used)
    assert (found["subsets"], found["seeds"], found["seeds_used"]) == (2, 2, 2)
    for column in ("heldout", "generated", "step_trajectory", "step_proxy"):
        assert 0 <= found[column]["icc"] <= 1 and 0 <= found[column]["ceiling"] <= 1
