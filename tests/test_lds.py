"""The LDS harness: metrics against brute force, ground truth, masks, and the smoke benchmark end to end."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from explorer.model import DiffusionModel, make_scheduler, tiny_config
from precompute.evaluation.digits.ground_truth import QuerySet, query_losses, truth_pairs
from precompute.evaluation.metrics import LDSBootstrap, distinctness, predictions, spearman_columns
from precompute.evaluation.retrain import subset_masks


def test_spearman_columns_matches_scipy():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(20, 7)), rng.normal(size=(20, 7))
    b[:, 0] = a[:, 0] * 3 + 1  # a perfect monotone column
    b[:5, 1] = b[0, 1]  # ties
    expected = [spearmanr(a[:, q], b[:, q]).statistic for q in range(7)]
    np.testing.assert_allclose(spearman_columns(a, b), expected, atol=1e-12)
    assert np.isnan(spearman_columns(a, np.ones_like(a))).all(), (
        "a constant prediction has no rank correlation"
    )


def test_a_linear_datamodel_has_lds_one_and_random_scores_do_not():
    rng = np.random.default_rng(1)
    masks = subset_masks(32, 50, 0.5, seed=3)
    tau = rng.normal(size=(6, 50))
    truth = -(masks @ tau.T)  # f_j(q) exactly linear in the subset, positive tau lowers the loss
    boot = LDSBootstrap(
        truth,
        {
            "exact": predictions(masks, tau),
            "flipped": predictions(masks, -tau),
            "random": predictions(masks, rng.normal(size=(6, 50))),
        },
        {"all": np.arange(6)},
        resamples=50,
    )
    assert boot.interval("exact", "all").mean == pytest.approx(1.0)
    assert boot.interval("flipped", "all").mean == pytest.approx(-1.0)
    random = boot.interval("random", "all")
    assert -1 <= random.low <= random.mean <= random.high <= 1 and abs(random.mean) < 0.9
    difference = boot.difference("exact", "random", "all")
    assert difference.mean == pytest.approx(1.0 - random.mean)


def test_subset_masks_are_seeded_and_exact_size():
    masks = subset_masks(5, 101, 0.5, seed=7)
    assert masks.shape == (5, 101) and (masks.sum(1) == 50).all()
    np.testing.assert_array_equal(masks, subset_masks(5, 101, 0.5, seed=7))
    assert not (masks[0] == masks[1]).all()
    np.testing.assert_array_equal(masks[:3], subset_masks(3, 101, 0.5, seed=7)), "mask j does not depend on M"


def test_distinctness_counts_distinct_top_lists():
    same = np.tile(np.arange(20.0), (4, 1))  # every query has the same top-10
    assert distinctness(same, top=10) == pytest.approx(10 / 40)
    own = np.zeros((2, 20))
    own[0, :10], own[1, 10:] = 1, 1
    assert distinctness(own, top=10) == 1.0


def _untrained_model() -> DiffusionModel:
    torch.manual_seed(0)
    unet = tiny_config(8).build().eval().requires_grad_(False)
    return DiffusionModel(unet=unet, scheduler=make_scheduler(), weights_hash="x", path="x")


def test_truth_pairs_cover_the_right_timesteps_and_losses_match_brute_force():
    rng = np.random.default_rng(0)
    queries = QuerySet(
        images=rng.uniform(-1, 1, (3, 1, 8, 8)).astype(np.float32),
        kinds=np.array(["heldout", "journey", "journey"]),
        timesteps=np.array([-1, 250, 999]),
        sources=np.arange(3),
        steps=np.array([-1, 3, 0]),
    )
    pairs = truth_pairs(queries, pairs=10, truth_buckets=10, num_train_timesteps=1000, seed=1)
    assert pairs.timesteps[0].min() < 100 and pairs.timesteps[0].max() >= 900, (
        "whole-image queries span [0, T)"
    )
    assert ((pairs.timesteps[1] >= 200) & (pairs.timesteps[1] < 300)).all(), (
        "a journey query stays in its bucket"
    )
    assert ((pairs.timesteps[2] >= 900) & (pairs.timesteps[2] < 1000)).all()
    np.testing.assert_array_equal(pairs.noise[0], pairs.noise[2]), "every query shares the noise"
    model = _untrained_model()
    fast = query_losses(model, queries, pairs, batch=7)
    abar = model.scheduler.alphas_cumprod
    for q in range(3):
        losses = []
        for t, eps in zip(pairs.timesteps[q], pairs.noise[q]):
            x0 = torch.from_numpy(queries.images[q])
            noisy = abar[t].sqrt() * x0 + (1 - abar[t]).sqrt() * eps
            losses.append(((model.unet(noisy[None], t.view(1)).sample[0] - eps) ** 2).mean().item())
        assert fast[q] == pytest.approx(np.mean(losses), rel=1e-5)


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    """The smoke benchmark 'killed' after 2 of 4 subset models, resumed, then run a third time."""
    from precompute.evaluation.digits.config import smoke_config
    from precompute.evaluation.digits.lds import run_lds

    cache = tmp_path_factory.mktemp("lds_smoke")
    config = smoke_config(subsets=4)
    first = run_lds(replace(config, stop_after_subsets=2), cache)
    second = run_lds(config, cache)
    third = run_lds(config, cache)
    return cache, config, first, second, third


@pytest.mark.slow
def test_smoke_benchmark_resumes_and_reports_valid_lds(smoke_runs, tmp_path):
    from precompute.evaluation.digits.report import lds_markdown, save_run

    cache, config, first, second, third = smoke_runs
    assert not first.complete and first.trained_subsets == 2
    assert second.complete and second.trained_subsets == 2, "the resumed run trains only the missing subsets"
    assert third.trained_subsets == 0, "a finished benchmark retrains nothing"
    assert len(list((cache / "subsets").iterdir())) == 4
    run = second
    q, n = len(run.queries), config.train_size
    assert q == config.heldout_queries + config.generated + config.trajectories * len(config.journey_steps)
    assert run.truth.shape == (4, q) and np.isfinite(run.truth).all() and (run.truth > 0).all()
    assert run.masks.shape == (4, n) and (run.masks.sum(1) == n // 2).all()
    expected = {
        "trak-loss",
        "trak-loss-norm",
        "dtrak-square",
        "dtrak-square-norm",
        "dtrak-mean",
        "dtrak-l1",
        "dtrak-l2-norm",
        "das-square",
        "das-square-norm",
        "tracin",
        "retrac",
        "pixel",
        "embedding",
        "random",
    }
    assert expected <= set(run.results["methods"])
    for name, method in run.results["methods"].items():
        assert run.scores[name].shape == (q, n) and run.predictions[name].shape == (4, q)
        for group, entry in method["lds"].items():
            low, high = entry["ci95"]
            assert -1 <= low <= high <= 1 and -1 <= entry["mean"] <= 1, (name, group)
        assert all(0 < d <= 1 for d in method["distinctness"].values())
    for name in run.results["methods"]:  # cached features give the same scores
        np.testing.assert_allclose(third.scores[name], run.scores[name], rtol=1e-5, atol=1e-6)
    assert set(run.results["ablations"]) == {
        f"{run.results['methods'][run.results['best_method']]['output']}"
        f"{'-norm' if run.results['methods'][run.results['best_method']]['normalize'] else ''}@buckets=2"
    }
    paths = save_run(run, tmp_path, cache)
    with np.load(paths[1]) as data:
        masks = np.unpackbits(data["masks_packed"], axis=1)[:, :n].astype(bool)
        np.testing.assert_array_equal(masks, run.masks)
        assert data["lds_per_query"].shape == (len(run.predictions), q)
    assert "trak-loss" in lds_markdown(run.results)


@pytest.mark.slow
def test_cache_of_other_settings_is_refused(smoke_runs):
    from explorer.errors import ExplorerError
    from precompute.evaluation.digits.lds import run_lds

    cache, config, *_ = smoke_runs
    with pytest.raises(ExplorerError, match="other settings"):
        run_lds(replace(config, truth_pairs=config.truth_pairs + 1), cache)


def test_folded_count_sketch_equals_features_computed_at_the_smaller_k():
    from explorer.errors import ExplorerError
    from explorer.features import FeatureSpec
    from precompute.evaluation.digits.scores import compute_features, fold_features

    rng = np.random.default_rng(0)
    queries = QuerySet(
        images=rng.uniform(-1, 1, (2, 1, 8, 8)).astype(np.float32),
        kinds=np.array(["heldout", "journey"]),
        timesteps=np.array([-1, 600]),
        sources=np.arange(2),
        steps=np.array([-1, 20]),
    )
    train = rng.uniform(-1, 1, (3, 1, 8, 8)).astype(np.float32)
    model = _untrained_model()
    spec = FeatureSpec(output="mean", buckets=4, proj_dim=64)
    folded = fold_features(compute_features(model, spec, train, queries), 16)
    direct = compute_features(model, replace(spec, proj_dim=16), train, queries)
    assert folded.spec == direct.spec and set(folded.train) == set(direct.train)
    for b in direct.train:
        np.testing.assert_allclose(folded.train[b], direct.train[b], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(folded.query, direct.query, rtol=1e-4, atol=1e-6)
    with pytest.raises(ExplorerError, match="divides"):
        fold_features(direct, 5)


def test_shipped_defaults_picks_the_lambda_that_generated_the_truth(tmp_path):
    """Synthetic features whose truth is an exact linear datamodel of one (k, lambda) row: the fair protocol
    must pick that lambda, with LDS 1 on the test half."""
    from explorer.features import FeatureSpec
    from precompute.evaluation.digits.defaults import DefaultsConfig, shipped_defaults
    from precompute.evaluation.digits.report import defaults_markdown
    from precompute.evaluation.digits.scores import (
        GLOBAL,
        FeatureSet,
        fold_features,
        save_feature_set,
        spec_key,
        trak_scores,
        whiten_features,
    )
    from precompute.evaluation.metrics import fair_split

    rng = np.random.default_rng(0)
    n, q, m = 40, 12, 12
    bucket = np.array(
        [GLOBAL] * 8 + [1] * 4
    )  # 6 heldout + 2 generated whole-image queries, 4 journey queries
    groups = {
        "all": np.arange(q),
        "heldout": np.arange(6),
        "generated": np.arange(6, 8),
        "journey": np.arange(8, 12),
    }
    base = FeatureSpec(output="loss", buckets=4, proj_dim=16)
    for output in ("mean", "square"):
        spec = replace(base, output=output)
        features = FeatureSet(
            spec=spec,
            train={
                GLOBAL: rng.normal(size=(n, 16)).astype(np.float32),
                1: rng.normal(size=(n, 16)).astype(np.float32),
            },
            query=rng.normal(size=(q, 16)).astype(np.float32),
            query_bucket=bucket,
            residuals=None,
        )
        save_feature_set(features, tmp_path / f"full_{spec_key(spec)}.npz")
        if output == "mean":
            small = fold_features(features, 8)
            tau = trak_scores(whiten_features(small, relative_lambda=1.0), bucket, normalize=True)
    masks = subset_masks(m, n, 0.5, seed=0)
    truth = -(masks @ tau.T)  # f_j(q) exactly linear in the mean-norm k=8 lambda=1 scores
    config = DefaultsConfig(
        dims=(8, 16),
        shippable=(8,),
        compare=("square",),
        lambdas=(1e-3, 1.0),
        reference=1.0,
        storages=("float16", "int8"),
    )
    defaults = shipped_defaults(
        config, base, tmp_path, masks, truth, groups, fair_split(m, groups, 0), resamples=20
    )
    exact = defaults["fair"]["dtrak-mean-norm@k=8"]
    assert exact["chosen"] == "1" and exact["test"]["1"]["all"]["mean"] == pytest.approx(1.0)
    assert set(defaults["fair"]) == {
        "dtrak-mean@k=8",
        "dtrak-mean-norm@k=8",
        "dtrak-mean@k=16",
        "dtrak-mean-norm@k=16",
        "dtrak-square-norm@k=8",
    }
    assert len(defaults["rows"]) == (4 + 1) * 3 + 2  # (4 mean + 1 square variants) x 3 lambdas + 2 storages
    for row in defaults["rows"].values():
        assert all(-1 <= e["ci95"][0] <= e["ci95"][1] <= 1 for e in row["lds"].values())
    fp16 = defaults["rows"]["dtrak-mean-norm@k=8,lambda=1,float16"]
    assert fp16["lds"]["all"]["mean"] == pytest.approx(1.0, abs=0.02), (
        "fp16 storage barely changes the scores"
    )
    assert "@k=8: mean-norm minus square-norm (chosen lambdas)" in defaults["differences"]
    assert "dtrak-square-norm" in defaults_markdown(defaults)
