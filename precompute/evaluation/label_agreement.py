"""Evaluations of attribution quality that need no retraining.

label agreement: for held-out real images used as queries at a timestep, the share of the top-k
positive influencers whose label equals the query's label (chance is about 1 / classes).
"""

from __future__ import annotations

import numpy as np
import torch

from explorer.attribution import Explorer
from explorer.classifier import load_classifier
from explorer.data import load_dataset, to_model_range, train_heldout_split
from explorer.index import AttributionIndex
from explorer.model import load_model


def label_agreement(
    explorer: Explorer, name: str, images: np.ndarray, labels: np.ndarray, timestep: int, top_k: int
) -> float:
    """Mean over queries of the share of top-k positive influencers with the query's label."""
    _, index = explorer.index(name)
    tensor = torch.from_numpy(to_model_range(images))
    results = explorer._attribute(name, tensor, np.full(len(images), timestep), top_k)
    shares = [(index.train_labels[r.positive.positions] == label).mean() for r, label in zip(results, labels)]
    return float(np.mean(shares))


def label_agreement_table(
    model_dir: str, index_dirs: list[str], data: str, timesteps: list[int], top_k: int, queries: int | None
) -> str:
    model = load_model(model_dir)
    indexes = {
        directory: AttributionIndex.load(directory, model_hash=model.weights_hash) for directory in index_dirs
    }
    explorer = Explorer(model, indexes, load_classifier(f"{model_dir}/classifier"))
    _, heldout = train_heldout_split(load_dataset(data, model.sample_size, model.channels))
    images, labels = heldout.images[:queries], heldout.labels[:queries]
    chance = 1.0 / len(heldout.class_names)
    header = "| index (method) | " + " | ".join(f"t={t}" for t in timesteps) + " |"
    lines = [
        f"label agreement of the top-{top_k} positive influencers, {len(labels)} held-out {data} queries "
        f"(chance {chance:.2f})",
        "",
        header,
        "|---|" + "---|" * len(timesteps),
    ]
    for directory, index in indexes.items():
        values = [label_agreement(explorer, directory, images, labels, t, top_k) for t in timesteps]
        lines.append(f"| {directory} ({index.label}) | " + " | ".join(f"{v:.3f}" for v in values) + " |")
    return "\n".join(lines)
