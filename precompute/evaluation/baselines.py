"""Attribution baselines that look only at the images: pixel cosine, classifier-embedding cosine, random.

Scores use the same convention as the gradient methods (tau (Q, N), higher = "more helpful"): a
similarity baseline says that the training images most similar to the query lower its loss most.
"""

from __future__ import annotations

import numpy as np
import torch

from explorer.classifier import FeatureClassifier
from explorer.whitening import normalize_rows


def pixel_vectors(images: np.ndarray) -> np.ndarray:
    """Unit pixel vectors in [0, 1] (ink = 1, background = 0) of images in [-1, 1]: (P, pixels)."""
    return normalize_rows(((images + 1.0) / 2.0).reshape(len(images), -1))


def pixel_cosine(query_images: np.ndarray, train_images: np.ndarray) -> np.ndarray:
    """Cosine of the pixel vectors: (Q, N)."""
    return pixel_vectors(query_images) @ pixel_vectors(train_images).T


@torch.no_grad()
def embedding_cosine(
    classifier: FeatureClassifier, query_images: np.ndarray, train_images: np.ndarray
) -> np.ndarray:
    """Cosine of the feature classifier's penultimate embeddings (a CLIP-similarity stand-in): (Q, N)."""
    classifier.eval()
    embed = lambda images: classifier.embedding(torch.from_numpy(images)).numpy()  # noqa: E731
    return normalize_rows(embed(query_images)) @ normalize_rows(embed(train_images)).T


def random_scores(queries: int, train: int, seed: int) -> np.ndarray:
    """Independent standard normal scores, seeded: the LDS of this is 0 in expectation."""
    return np.random.default_rng(seed).standard_normal((queries, train)).astype(np.float32)
