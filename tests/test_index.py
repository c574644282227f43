import json
import shutil

import faiss
import numpy as np
import pytest
import torch

from explorer.data import to_model_range
from explorer.errors import ExplorerError
from explorer.features import FeatureComputer
from explorer.index import META_NAME, AttributionIndex, bucket_file
from precompute.featurize.pipeline import FEATURES_NAME, FeaturizeOptions, reindex


def _exact_scores(
    raw: np.ndarray, query: np.ndarray, lam: float, normalize: bool, center: bool = True
) -> np.ndarray:
    """The TRAK score computed from the raw features without FAISS or Cholesky: phi_q^T (Phi^T Phi + lam
    I)^-1 phi_i,
    with the mean training feature subtracted from both sides when `center`."""
    raw = raw.astype(np.float64)
    mean = raw.mean(axis=0) if center else np.zeros(raw.shape[1])
    raw, query = raw - mean, query - mean
    kernel = raw.T @ raw + lam * np.eye(raw.shape[1])
    scores = raw @ np.linalg.solve(kernel, query.astype(np.float64))
    if normalize:
        # cosine of the whitened vectors: divide by the whitened norms sqrt(x^T K^-1 x)
        norms_train = np.sqrt(np.einsum("ik,ik->i", raw, np.linalg.solve(kernel, raw.T).T))
        norm_query = np.sqrt(query @ np.linalg.solve(kernel, query))
        scores = scores / norms_train / norm_query
    return scores


@pytest.mark.parametrize("normalize", [True, False])
def test_faiss_top_k_equals_brute_force_trak(tiny_model, tiny_index_dir, tmp_path, digits_splits, normalize):
    directory = tiny_index_dir
    if not normalize:
        directory = reindex(tiny_index_dir, tmp_path / "raw", FeaturizeOptions(normalize=False))
    index = AttributionIndex.load(directory, model_hash=tiny_model.weights_hash)
    raw = np.load(tiny_index_dir / FEATURES_NAME)  # (B, N, k)
    computer = FeatureComputer(tiny_model, index.meta.spec)
    _, heldout = digits_splits
    queries = torch.from_numpy(to_model_range(heldout.images[:6]))
    for bucket in range(index.buckets):
        phi_q = computer.features(queries, torch.full((6,), bucket)).numpy()
        search_vectors = index.query_vectors(phi_q, np.full(6, bucket))
        lam = index.meta.lambdas[bucket].value
        for q in range(6):
            exact = _exact_scores(raw[bucket], phi_q[q], lam, normalize, center=index.meta.center)
            positive, negative = index.search(search_vectors[q], bucket, 10)
            assert positive.positions.tolist() == np.argsort(-exact)[:10].tolist()
            assert negative.positions.tolist() == np.argsort(exact)[:10].tolist()
            assert np.allclose(
                positive.scores, exact[positive.positions], rtol=1e-4, atol=1e-6 * np.abs(exact).max()
            )
            assert np.allclose(
                index.scores(search_vectors[q], bucket), exact, rtol=1e-4, atol=1e-6 * np.abs(exact).max()
            )


def test_index_round_trip(tiny_index_dir, tiny_train_subset, tiny_spec):
    index = AttributionIndex.load(tiny_index_dir)
    assert index.buckets == tiny_spec.buckets and index.meta.count == len(tiny_train_subset)
    assert np.array_equal(index.train_images, tiny_train_subset.images)
    assert np.array_equal(index.train_labels, tiny_train_subset.labels)
    assert np.array_equal(index.train_ids, tiny_train_subset.ids)
    assert index.meta.spec == tiny_spec
    norms = np.linalg.norm(index.vectors(0), axis=1)
    assert np.allclose(norms, 1.0, atol=1e-5), "the default index is ReTrac-normalized"


@pytest.mark.parametrize("storage, size_ratio", [("float16", 0.6), ("int8", 0.35)])
def test_lossy_storage_keeps_rankings(tiny_index_dir, tmp_path, storage, size_ratio):
    lossy = AttributionIndex.load(
        reindex(tiny_index_dir, tmp_path / storage, FeaturizeOptions(storage=storage))
    )
    full = AttributionIndex.load(tiny_index_dir)
    overlaps = []
    for row in range(0, 60, 6):
        query = full.vectors(1)[row]
        exact, approximate = full.search(query, 1, 10)[0], lossy.search(query, 1, 10)[0]
        assert approximate.positions[0] == exact.positions[0] == row
        overlaps.append(len(set(exact.positions) & set(approximate.positions)) / 10)
    assert np.mean(overlaps) >= 0.8, f"{storage} top-10 overlap {np.mean(overlaps):.2f}"
    assert np.abs(lossy.vectors(1) - full.vectors(1)).max() < 0.05
    assert (tmp_path / storage / bucket_file(0)).stat().st_size < (
        tiny_index_dir / bucket_file(0)
    ).stat().st_size * size_ratio
    assert lossy.factors[0].dtype == np.float32 and full.factors[0].dtype == np.float64


def test_index_of_another_model_is_refused(tiny_index_dir):
    with pytest.raises(
        ExplorerError, match="was built for the model with weights hash .* pass the matching --model"
    ):
        AttributionIndex.load(tiny_index_dir, model_hash="0123456789abcdef")


def _copy(source, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(FEATURES_NAME))
    return target


def test_damaged_indexes_give_clear_errors(tiny_index_dir, tmp_path):
    copy = _copy(tiny_index_dir, tmp_path)
    data = (copy / bucket_file(2)).read_bytes()
    (copy / bucket_file(2)).write_bytes(data[: len(data) // 2])
    with pytest.raises(ExplorerError, match="corrupt or truncated"):
        AttributionIndex.load(copy)
    (copy / bucket_file(2)).unlink()
    with pytest.raises(ExplorerError, match="is missing"):
        AttributionIndex.load(copy)
    meta = json.loads((copy / META_NAME).read_text())
    (copy / META_NAME).write_text(json.dumps(dict(meta, format_version=99)))
    with pytest.raises(ExplorerError, match="format version 99"):
        AttributionIndex.load(copy)
    (copy / META_NAME).write_text("{not json")
    with pytest.raises(ExplorerError, match="not valid JSON"):
        AttributionIndex.load(copy)
    (copy / META_NAME).unlink()
    with pytest.raises(ExplorerError, match="not a complete index directory"):
        AttributionIndex.load(copy)
    with pytest.raises(ExplorerError, match="does not exist"):
        AttributionIndex.load(tmp_path / "nowhere")


def test_nan_vectors_are_refused(tiny_index_dir, tmp_path):
    from explorer.index import sha256_file

    copy = _copy(tiny_index_dir, tmp_path)
    index = faiss.read_index(str(copy / bucket_file(0)))
    vectors = index.reconstruct_n(0, index.ntotal)
    vectors[3, 5] = np.nan
    poisoned = faiss.IndexFlatIP(vectors.shape[1])
    poisoned.add(vectors)
    faiss.write_index(poisoned, str(copy / bucket_file(0)))
    meta = json.loads((copy / META_NAME).read_text())
    meta["files"][bucket_file(0)] = sha256_file(copy / bucket_file(0))
    (copy / META_NAME).write_text(json.dumps(meta))
    with pytest.raises(ExplorerError, match="NaN"):
        AttributionIndex.load(copy)
