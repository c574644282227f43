"""The counterfactual harness end to end on tiny models, and its pure helpers."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from explorer.errors import ExplorerError
from precompute.evaluation.counterfactual import energy_distance, parse_method, pixel_nearest


def test_parse_method():
    assert parse_method("dtrak-square-norm") == ("square", True, False)
    assert parse_method("trak-loss") == ("loss", False, False)
    assert parse_method("das-mean-norm") == ("mean", True, True)
    for bad in ("tracin", "pixel", "dtrak-square-raw"):
        with pytest.raises(ExplorerError, match="not a TRAK-family method"):
            parse_method(bad)


def test_pixel_nearest_matches_brute_force():
    rng = np.random.default_rng(0)
    train, finals = rng.uniform(-1, 1, (30, 1, 4, 4)), rng.uniform(-1, 1, (2, 1, 4, 4))
    train[7] = finals[0]
    nearest = pixel_nearest(finals, train, 3)
    assert nearest[0, 0] == 7
    for q in range(2):
        distances = [np.linalg.norm(finals[q] - t) for t in train]
        assert list(nearest[q]) == list(np.argsort(distances)[:3])


def test_energy_distance_is_zero_for_equal_sets_and_grows_with_a_shift():
    a = torch.randn(40, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    assert energy_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    assert energy_distance(a, a + 0.5) < energy_distance(a, a + 2.0)


@pytest.mark.slow
def test_smoke_counterfactual_trains_every_removal_once(tmp_path):
    from precompute.evaluation.counterfactual import KINDS, run_counterfactual, smoke_counterfactual

    config = replace(smoke_counterfactual(), queries=2, fractions=(0.05,), completions=4)
    results = run_counterfactual(config, tmp_path)
    k = results["ks"][0]
    assert k == 8
    models = sorted(p.name for p in (tmp_path / "counterfactual").rglob("training.json"))
    assert len(models) == 2 * 2 + config.random_sets, "top-k and pixel per query, shared random sets"
    for kind in KINDS:
        entry = results["summary"][f"{kind}_k{k}"]
        assert 0 <= entry["tv"]["mean"] <= 1 and -1 <= entry["drop"]["mean"] <= 1
        assert len(results["removed_ids"].get(f"{kind}_k{k}", [[0] * k] * 2)[0]) == k
    assert len(results["per_query"][f"topk_k{k}"]) == 2 and len(results["per_query"][f"random_k{k}"]) == 2
    again = run_counterfactual(config, tmp_path)  # every model cached: same numbers, nothing retrained
    assert again["summary"] == results["summary"]
