"""explorer.diagnostics on a real tiny index: each measure against a brute-force computation."""

import numpy as np
import pytest

from explorer.diagnostics import NEIGHBOURS, NearCopies, concentration, self_influence, timestep_bias
from explorer.errors import ExplorerError
from explorer.index import AttributionIndex
from explorer.index_meta import NORM_COLUMNS


@pytest.fixture(scope="module")
def index(tiny_index_dir) -> AttributionIndex:
    return AttributionIndex.load(tiny_index_dir)


def test_concentration_counts_shared_slots():
    every_own = np.arange(12).reshape(4, 3)  # four queries, three slots each, all different
    assert concentration(every_own, 20) == (3 / 12, 1.0)
    same = np.tile([5, 6, 7], (4, 1))  # every query lists the same three images
    assert concentration(same, 20) == (1.0, 3 / 12)


def test_timestep_bias_matches_a_brute_force_ranking(index):
    bias = timestep_bias(index, queries=40, top_k=5)
    assert bias.timesteps == [int(t[0]) for t in index.meta.timesteps] and bias.queries == 40
    rows = np.sort(np.random.default_rng(0).choice(index.meta.count, 40, replace=False))
    for bucket in (0, index.buckets - 1):
        norms = index.norms(bucket)
        for column, name in enumerate(NORM_COLUMNS):
            assert bias.norm_quantiles[name][bucket][2] == pytest.approx(
                np.median(norms[:, column]), rel=1e-6
            )
        units = index.vectors(bucket) / np.linalg.norm(index.vectors(bucket), axis=1, keepdims=True)
        for kind, weights in (("normalized", 1.0), ("raw", norms[:, 2])):
            lists = []
            for q in rows:
                scores = (units @ units[q]) * weights
                scores[q] = -np.inf  # the query's own row is left out
                lists.append(np.argsort(-scores, kind="stable")[:5])
            share, distinct = concentration(np.array(lists), index.meta.count)
            assert bias.top_share[kind][bucket] == pytest.approx(share)
            assert bias.distinct[kind][bucket] == pytest.approx(distinct)


def test_self_influence_is_the_squared_whitened_norm(index):
    last = index.buckets - 1
    assert np.allclose(self_influence(index, last), index.norms(last)[:, 2] ** 2)
    every = np.mean([index.norms(b)[:, 2] ** 2 for b in range(index.buckets)], axis=0)
    assert np.allclose(self_influence(index), every)
    with pytest.raises(ExplorerError, match=f"bucket {index.buckets} is out of range"):
        self_influence(index, index.buckets)


def test_near_copies_flag_a_training_image_and_not_a_fresh_one(index, digits_splits):
    copies = NearCopies(index)
    train = index.train_images
    found = copies.nearest(train[7])
    assert found.positions[0] == 7 and found.distances[0] == 0 and found.near_copy
    _, heldout = digits_splits
    fresh = heldout.images[0]
    found = copies.nearest(fresh)
    flat = train.reshape(len(train), -1) / 255.0
    distances = np.sqrt(((flat - fresh.reshape(-1) / 255.0) ** 2).mean(1))
    order = np.argsort(distances, kind="stable")
    assert found.positions.tolist() == order[:8].tolist()
    assert found.ratio == pytest.approx(
        distances[order[0]] / distances[order[1 : NEIGHBOURS + 1]].mean(), rel=1e-4
    )
    own = np.array(
        [np.sort(np.delete(np.sqrt(((flat - flat[i]) ** 2).mean(1)), i))[0] for i in range(len(flat))]
    )
    assert np.allclose(copies.own_nearest, own, atol=1e-4)
    with pytest.raises(ExplorerError, match="must be uint8"):
        copies.nearest(fresh[:4])
