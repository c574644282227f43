"""explorer.scoring: the common-mode collapse on synthetic features, centering's fix, and the served index
reading exactly what the scoring module computes."""

import json
import shutil

import faiss
import numpy as np
import pytest

from explorer.errors import ExplorerError
from explorer.index import META_NAME, AttributionIndex, center_file
from explorer.scoring import all_scores, fit_bucket
from precompute.evaluation.shipped.step_quality import step_quality
from precompute.featurize.pipeline import FEATURES_NAME, FeaturizeOptions, reindex


def _collapsed_features(rng, n: int = 400, k: int = 32, classes: int = 4, common: float = 1e4):
    """Rows = one direction shared by every example (x_t is nearly the same input for all at high t) + a small
    class-specific part + noise, as the shipped model's raw gradients are at t >= 500 (pairwise cosine
    1.000)."""
    shared = rng.normal(size=k)
    means = rng.normal(size=(classes, k))
    labels = rng.integers(0, classes, n)
    rows = common * shared + means[labels] + 0.5 * rng.normal(size=(n, k))
    return rows, labels


def _stored_int8(vectors: np.ndarray) -> np.ndarray:
    """The rows as the shipped index's int8 FAISS scalar quantizer stores them."""
    index = faiss.IndexScalarQuantizer(
        vectors.shape[1], faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
    )
    index.train(vectors)
    index.add(vectors)
    return index.reconstruct_n(0, len(vectors))


def test_centering_removes_the_common_mode_collapse():
    rng = np.random.default_rng(0)
    train, train_labels = _collapsed_features(rng)
    queries, query_labels = train[:50] + 0.1 * rng.normal(size=(50, train.shape[1])), train_labels[:50]
    measured = {}
    for center in (False, True):
        scorer, _ = fit_bucket(train, 1.0, center=center, normalize=True)
        scores = all_scores(_stored_int8(scorer.vectors(train)), scorer.vectors(queries))
        measured[center] = step_quality(scores, query_labels, train_labels)
    plain, centered = measured[False], measured[True]
    # without centering: every score ties near 1, the "negatives" are positive, and int8 rounding orders the
    # list
    assert np.median(plain.spread) < 1e-3 and plain.positive_negative.mean() > 0.9
    # centered: distinct top scores, negative negatives, and the class signal kept through int8
    assert np.median(centered.spread) > 0.01 and centered.positive_negative.mean() == 0
    assert centered.agreement.mean() > plain.agreement.mean() + 0.1


def test_centered_scores_equal_the_exact_solve():
    rng = np.random.default_rng(1)
    train, _ = _collapsed_features(rng, n=120, k=16)
    query = train[3] + rng.normal(size=16)
    scorer, choice = fit_bucket(train, 1e-2, center=True, normalize=False)
    mean = train.mean(0)
    centered = train - mean
    kernel = centered.T @ centered + choice.value * np.eye(16)
    exact = centered @ np.linalg.solve(kernel, query - mean)
    served = all_scores(scorer.vectors(train), scorer.vectors(query[None]))[0]
    assert np.allclose(served, exact, rtol=1e-4, atol=1e-6 * np.abs(exact).max())


def test_served_index_reads_what_the_scoring_module_computes(tiny_index_dir, tmp_path):
    exact = reindex(tiny_index_dir, tmp_path / "fp32", FeaturizeOptions(storage="float32"))
    index = AttributionIndex.load(exact)
    assert index.meta.center is True and index.meta.format_version == 3
    raw = np.load(tiny_index_dir / FEATURES_NAME)  # (B, N, k)
    rng = np.random.default_rng(2)
    for bucket in range(index.buckets):
        phi_q = raw[bucket][:5] + rng.normal(scale=raw[bucket].std(), size=(5, raw.shape[2]))
        scorer, _ = fit_bucket(raw[bucket], index.meta.lambdas[bucket].relative, center=True, normalize=True)
        expected = all_scores(scorer.vectors(raw[bucket]), scorer.vectors(phi_q))
        served = all_scores(index.vectors(bucket), index.query_vectors(phi_q, np.full(5, bucket)))
        assert np.abs(served - expected).max() < 1e-6


def test_stored_norms_are_the_raw_centered_and_whitened_norms(tiny_index_dir, tmp_path):
    """norms_BB.npy: |phi_i|, |phi_i - c| and |psi_i|, whose square is TRAK's self-influence
    phi_c,i^T (Phi_c^T Phi_c + lambda I)^-1 phi_c,i; an index written before norms were kept says so."""
    index = AttributionIndex.load(
        reindex(tiny_index_dir, tmp_path / "fp32", FeaturizeOptions(storage="float32"))
    )
    raw = np.load(tiny_index_dir / FEATURES_NAME).astype(np.float64)  # (B, N, k)
    for bucket in (0, index.buckets - 1):
        phi = raw[bucket]
        centered = phi - phi.mean(0)
        kernel = centered.T @ centered + index.meta.lambdas[bucket].value * np.eye(phi.shape[1])
        leverage = np.einsum("ik,ik->i", centered, np.linalg.solve(kernel, centered.T).T)
        norms = index.norms(bucket)
        assert np.allclose(norms[:, 0], np.linalg.norm(phi, axis=1), rtol=1e-5)
        assert np.allclose(norms[:, 1], np.linalg.norm(centered, axis=1), rtol=1e-4)
        assert np.allclose(norms[:, 2] ** 2, leverage, rtol=1e-3)
    older = shutil.copytree(index.directory, tmp_path / "older")
    meta = json.loads((older / META_NAME).read_text())
    meta["files"] = {name: digest for name, digest in meta["files"].items() if not name.startswith("norms_")}
    (older / META_NAME).write_text(json.dumps({k: v for k, v in meta.items() if k != "norms"}))
    with pytest.raises(ExplorerError, match="stores no gradient norms.*rebuild"):
        AttributionIndex.load(older).norms(0)


def test_a_centered_index_without_its_centers_is_refused(tiny_index_dir, tmp_path):
    directory = shutil.copytree(tiny_index_dir, tmp_path / "copy")
    AttributionIndex.load(directory)
    meta = json.loads((directory / META_NAME).read_text())
    assert meta["center"] and center_file(0) in meta["files"]
    downgraded = dict(meta, format_version=1)
    (directory / META_NAME).write_text(json.dumps(downgraded))
    with pytest.raises(ExplorerError, match="center needs format_version 3"):
        AttributionIndex.load(directory)
    (directory / META_NAME).write_text(json.dumps(meta))
    (directory / center_file(0)).unlink()
    with pytest.raises(ExplorerError, match="center_00.npy.*missing"):
        AttributionIndex.load(directory)


def test_plain_index_stays_readable_by_older_explorers(tiny_index_dir, tmp_path):
    plain = AttributionIndex.load(reindex(tiny_index_dir, tmp_path / "plain", FeaturizeOptions(center=False)))
    assert plain.meta.center is False and plain.meta.format_version == 1
    assert not any(name.startswith("center_") for name in plain.meta.file_hashes)


def test_blocked_predictions_equal_the_whole_matrix_under_a_tiny_memory_bound():
    from explorer.scoring import blocked_predictions, score_blocks
    from precompute.evaluation.metrics import predictions

    rng = np.random.default_rng(3)
    train, queries = rng.standard_normal((300, 16)), rng.standard_normal((70, 16))
    masks = rng.random((12, 300)) < 0.5
    bound = 4 * 40 * 9  # 40 rows x 9 queries of float32 scores per block
    blocks = list(score_blocks(train, queries, bound))
    assert len(blocks) > 10 and max(b[2].nbytes for b in blocks) <= bound
    exact = predictions(masks, all_scores(train, queries))
    np.testing.assert_allclose(blocked_predictions(masks, train, queries, bound), exact, rtol=1e-4, atol=1e-3)
