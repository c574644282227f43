"""The one fixed training recipe of the evaluations, and a resumable cache of models trained with it.

LDS trains one model per random training subset and the counterfactual test one model per removal
set; every one of them uses the same `Recipe` (tiny UNet, steps, batch, lr, seed), so the only
difference between two models is their training data. A model directory counts as finished once
`train_ddpm` has written its `training.json` (it writes it last); a killed run resumes from the
model's periodic checkpoint, and a finished model is never trained again.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from explorer.data import Dataset
from explorer.errors import ExplorerError
from explorer.model import DiffusionModel, UNetConfig, file_hash, make_scheduler, tiny_config
from precompute.train import CHECKPOINT_DIR, TrainConfig, train_ddpm

logger = logging.getLogger(__name__)

TRACIN_DIR = "tracin"
EMA_DECAY = 0.999  # fixed here, not taken from TrainConfig's default, so the recipe cannot drift
# train_ddpm ignores classifier_epochs, but its checkpoints record it and refuse to resume when it
# differs: pinned here so a new TrainConfig default cannot strand a half-trained cached model.
CHECKPOINT_CLASSIFIER_EPOCHS = 12
WEIGHT_SETTINGS = (
    "steps",
    "batch_size",
    "learning_rate",
    "ema_decay",
    "seed",
)  # what the DDPM weights depend on  # raw (non-EMA) weights of the full model at its TracIn checkpoints


@dataclass(frozen=True)
class Recipe:
    """How every evaluation model is trained (one recipe for all: only the data differs)."""

    steps: int = 400  # optimizer steps; ~30 s for the tiny UNet on one loaded CPU core
    batch_size: int = 64
    learning_rate: float = 1e-3  # AdamW
    seed: int = 0  # the same init and the same batch/timestep/noise draws for every model
    checkpoint_every: int = 100  # resumable checkpoints (and the TracIn checkpoints of the full model)
    unet: UNetConfig = field(default_factory=lambda: tiny_config(8))  # ~160k parameters at 8x8

    def train_config(self, steps: int | None = None) -> TrainConfig:
        return TrainConfig(
            steps=self.steps if steps is None else steps,
            batch_size=self.batch_size,
            learning_rate=self.learning_rate,
            ema_decay=EMA_DECAY,
            seed=self.seed,
            checkpoint_every=self.checkpoint_every,
            classifier_epochs=CHECKPOINT_CLASSIFIER_EPOCHS,
        )

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


def is_trained(model_dir: Path, dataset: Dataset, recipe: Recipe) -> bool:
    """True when model_dir holds a finished model of this recipe on exactly this dataset."""
    record_path = Path(model_dir) / "training.json"
    if not record_path.is_file():
        return False
    record = json.loads(record_path.read_text())
    wanted = asdict(recipe.train_config())
    expected = {"train": {key: wanted[key] for key in WEIGHT_SETTINGS}, "fingerprint": dataset.fingerprint()}
    found = {
        "train": {key: record.get("train", {}).get(key) for key in WEIGHT_SETTINGS},
        "fingerprint": record.get("dataset_fingerprint"),
    }
    if found != expected:
        raise ExplorerError(
            f"{str(model_dir)!r} holds a model trained with other settings or data ({found}, expected "
            f"{expected}): "
            "use another --cache directory, or delete that folder to retrain it"
        )
    return True


def train_cached(
    dataset: Dataset, model_dir: str | Path, recipe: Recipe, keep_checkpoint: bool = False
) -> bool:
    """Train `dataset` into model_dir with the recipe unless it is already there. Returns True if it
    trained."""
    model_dir = Path(model_dir)
    if is_trained(model_dir, dataset, recipe):
        return False
    train_ddpm(dataset, model_dir, recipe.train_config(), recipe.unet)
    if not keep_checkpoint:
        shutil.rmtree(
            model_dir / CHECKPOINT_DIR, ignore_errors=True
        )  # optimizer state: 3x the weights, not needed again
    return True


def train_full_with_checkpoints(dataset: Dataset, model_dir: str | Path, recipe: Recipe) -> list[Path]:
    """The full model, trained in segments so that the raw weights at every checkpoint are kept for TracIn.

    train_ddpm is deterministic and resumable, so training to step 100, then to 200, ... gives the
    same final weights as one straight run. Returns the TracIn weight files, in training order.
    """
    model_dir = Path(model_dir)
    tracin_dir = model_dir / TRACIN_DIR
    stops = list(range(recipe.checkpoint_every, recipe.steps, recipe.checkpoint_every)) + [recipe.steps]
    files = [tracin_dir / f"step_{stop:05d}.safetensors" for stop in stops]
    if is_trained(model_dir, dataset, recipe) and all(f.is_file() for f in files):
        return files
    for stop, path in zip(stops, files):
        if path.is_file():
            continue
        train_ddpm(dataset, model_dir, recipe.train_config(stop), recipe.unet)
        state = load_file(str(model_dir / CHECKPOINT_DIR / "state.safetensors"))
        weights = {k[len("unet.") :]: v for k, v in state.items() if k.startswith("unet.")}
        tracin_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file(weights, str(tmp))
        tmp.replace(path)
    return files


def load_raw_weights(path: Path, recipe: Recipe) -> DiffusionModel:
    """A frozen DiffusionModel from raw UNet weights saved by train_full_with_checkpoints."""
    unet = recipe.unet.build()
    unet.load_state_dict(load_file(str(path)))
    unet.eval().requires_grad_(False)
    return DiffusionModel(unet=unet, scheduler=make_scheduler(), weights_hash=file_hash(path), path=str(path))


def subset_masks(count: int, size: int, alpha: float, seed: int) -> np.ndarray:
    """(count, size) bool: mask j keeps round(alpha * size) examples drawn by a generator seeded by (seed,
    j)."""
    if not 0 < alpha < 1:
        raise ExplorerError(f"subset fraction alpha {alpha} must lie strictly between 0 and 1, e.g. 0.5")
    keep = int(round(alpha * size))
    masks = np.zeros((count, size), dtype=bool)
    for j in range(count):
        masks[j, np.random.default_rng([seed, j]).choice(size, keep, replace=False)] = True
    return masks


def torch_threads(threads: int | None) -> None:
    """Limit torch's intra-op threads (the evaluation machine is shared)."""
    if threads is not None:
        torch.set_num_threads(threads)
