"""A training set as the UNet sees it: pixels in [-1, 1] for a pixel model; for a latent text-to-image model,
the VAE latents of the pictures (encoded once, then read from a cache) and one prompt per image.

The latent cache lives in $DAX_CACHE (default ~/.cache/diffusion-attribution-explorer), one .npy per
(VAE weights, dataset fingerprint) pair: featurizing the same data again, with another output function, LoRA
or projection, skips the encoder. A cache file that does not match the data's shape is recomputed.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np
import torch

from explorer.atomic import save_npy_atomic
from explorer.data import Dataset, to_model_range
from explorer.errors import ExplorerError
from explorer.model import DiffusionModel

logger = logging.getLogger(__name__)


def cache_dir() -> Path:
    return Path(os.environ.get("DAX_CACHE", Path.home() / ".cache" / "diffusion-attribution-explorer"))


def latent_cache_path(model: DiffusionModel, dataset: Dataset) -> Path:
    key = hashlib.sha256(f"{model.latent.vae_hash}:{dataset.fingerprint()}".encode()).hexdigest()[:20]
    return cache_dir() / "latents" / f"{key}.npy"


def training_inputs(model: DiffusionModel, dataset: Dataset) -> torch.Tensor:
    """(N, C, H, W): what featurize differentiates through, in the UNet's space."""
    if dataset.resolution != model.image_size or dataset.channels != model.image_channels:
        raise ExplorerError(
            f"dataset images are {dataset.resolution}x{dataset.resolution} but the model expects "
            f"{model.image_size}x{model.image_size} ({dataset.channels} vs {model.image_channels} channels): "
            "load the data at the model's size"
        )
    pictures = torch.from_numpy(to_model_range(dataset.images))
    if model.latent is None:
        return pictures
    path = latent_cache_path(model, dataset)
    expected = (len(dataset), model.channels, model.sample_size, model.sample_size)
    if path.is_file():
        try:
            cached = np.load(path, allow_pickle=False)
            if cached.shape == expected:
                logger.info("VAE latents of %s read from %s", dataset.name, path)
                return torch.from_numpy(cached)
        except (OSError, ValueError) as error:
            logger.warning("latent cache %s is unreadable (%s): encoding again", path, error)
    latents = model.latent.encode(pictures)
    if tuple(latents.shape) != expected:
        raise ExplorerError(
            f"the VAE of {model.path!r} encodes {dataset.resolution}px images to {tuple(latents.shape[1:])}, "
            f"but the UNet takes {expected[1:]}: the pipeline's VAE and UNet do not match"
        )
    save_npy_atomic(path, latents.numpy())
    logger.info("VAE latents of %s cached in %s", dataset.name, path)
    return latents


def training_prompts(model: DiffusionModel, dataset: Dataset) -> list[str] | None:
    """One prompt per image for a text model: the caption (metadata `text`), else the class name; None for
    a pixel model."""
    if model.latent is None:
        return None
    if dataset.captions is not None:
        return list(dataset.captions)
    if len(dataset.class_names) > 1:
        return [dataset.class_names[label] for label in dataset.labels]
    raise ExplorerError(
        f"{dataset.name!r} has neither captions nor classes for the text model {model.path!r}: add a "
        "metadata.jsonl with file_name and text per image, or class subfolders"
    )


def prompt_batch(model: DiffusionModel, prompts: list[str] | None, rows) -> torch.Tensor | None:
    """The embeddings (rows, L, D) of prompts[rows] (a slice or positions), or None for a pixel model."""
    if prompts is None:
        return None
    chosen = prompts[rows] if isinstance(rows, slice) else [prompts[int(i)] for i in rows]
    return model.latent.encode_prompts(chosen)
