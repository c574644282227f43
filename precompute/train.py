"""Train the DDPM (with EMA) and the feature classifier; resumable from periodic checkpoints.

Every random draw of step s (the batch, the timesteps, the noise) comes from a generator seeded
by (seed, s), so a run resumed from a checkpoint continues exactly as if never stopped.
Checkpoints are safetensors + JSON, never pickles.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from explorer.atomic import write_atomic, write_json_atomic
from explorer.classifier import ClassifierConfig, FeatureClassifier, save_classifier
from explorer.data import Dataset, to_model_range
from explorer.errors import ExplorerError
from explorer.model import UNetConfig, make_scheduler, save_model
from explorer.noising import forward_noise

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
# In CHECKPOINT_DIR: the raw (non-EMA) weights of every checkpoint, for TracIn
# (precompute.featurize.method_build).
HISTORY_DIR = "history"


@dataclass
class TrainConfig:
    steps: int = 2500  # optimizer steps (~35 epochs of mnist5k's 4,500 training images)
    batch_size: int = 64
    learning_rate: float = 1e-3  # AdamW
    ema_decay: float = 0.999  # the saved model is the EMA of the weights
    seed: int = 0
    checkpoint_every: int = 250  # steps between resumable checkpoints
    classifier_epochs: int = 30  # enough for >= 97% held-out accuracy on mnist5k


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def _ema_decay(decay: float, step: int) -> float:
    # Warm-up as in diffusers' EMAModel: early averages should not be dominated by the random init.
    return min(decay, (1 + step) / (10 + step))


def _save_checkpoint(
    directory: Path, step: int, unet, ema, optimizer, config: TrainConfig, unet_config: UNetConfig
) -> None:
    tensors = {f"unet.{k}": v.contiguous() for k, v in unet.state_dict().items()}
    tensors.update({f"ema.{k}": v.contiguous() for k, v in ema.state_dict().items()})
    opt_state = optimizer.state_dict()
    for index, state in opt_state["state"].items():
        for name, value in state.items():
            tensors[f"opt.{index}.{name}"] = torch.as_tensor(value).contiguous()
    write_atomic(directory / "state.safetensors", lambda tmp: save_file(tensors, tmp))
    # The training iterates theta_c and their learning rate, for Diffusion-TracIn / ReTrac (arXiv 2401.09031
    # eq. 2: sum_c eta_c <grad L(q; theta_c), grad L(z_i; theta_c)>); the state file above is overwritten.
    weights = {k: v.contiguous() for k, v in unet.state_dict().items()}
    lr = str(optimizer.param_groups[0]["lr"])
    history = directory / HISTORY_DIR / f"step_{step:06d}.safetensors"
    history.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(
        history, lambda tmp: save_file(weights, tmp, metadata={"step": str(step), "learning_rate": lr})
    )
    write_json_atomic(
        directory / "progress.json",
        {
            "step": step,
            "train": asdict(config),
            "unet": asdict(unet_config),
            "param_groups": opt_state["param_groups"],
        },
    )


def _load_checkpoint(
    directory: Path, unet, ema, optimizer, config: TrainConfig, unet_config: UNetConfig
) -> int:
    progress_path = directory / "progress.json"
    if not progress_path.is_file():
        return 0
    progress = json.loads(progress_path.read_text())
    recorded = {k: v for k, v in progress["train"].items() if k != "steps"}
    wanted = {k: v for k, v in asdict(config).items() if k != "steps"}
    if recorded != wanted or progress["unet"] != json.loads(json.dumps(asdict(unet_config))):
        raise ExplorerError(
            f"the checkpoint in {str(directory)!r} was made with other settings ({recorded}); "
            "use another --out directory or delete that checkpoint folder to start over"
        )
    tensors = load_file(str(directory / "state.safetensors"))
    unet.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("unet.")})
    ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": progress["param_groups"]})
    logger.info("resuming from step %d of %s", progress["step"], directory)
    return int(progress["step"])


def train_ddpm(dataset: Dataset, out_dir: str | Path, config: TrainConfig, unet_config: UNetConfig) -> Path:
    """Train an eps-prediction DDPM on `dataset`, save the EMA weights to out_dir (pipeline layout)."""
    out_dir = Path(out_dir)
    if dataset.resolution != unet_config.sample_size:
        raise ExplorerError(
            f"dataset resolution {dataset.resolution} != model sample_size {unet_config.sample_size}"
        )
    torch.manual_seed(config.seed)  # the initial weights
    unet = unet_config.build().train()
    ema = copy.deepcopy(unet).requires_grad_(False)
    scheduler = make_scheduler()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.learning_rate)
    checkpoint_dir = out_dir / CHECKPOINT_DIR
    start = _load_checkpoint(checkpoint_dir, unet, ema, optimizer, config, unet_config)

    images = torch.from_numpy(to_model_range(dataset.images))  # (N, 1, H, W)
    alphas_cumprod = scheduler.alphas_cumprod
    progress = tqdm(
        range(start, config.steps), initial=start, total=config.steps, desc="train ddpm", unit="step"
    )
    started, losses = time.time(), []
    for step in progress:
        generator = step_generator(config.seed, step)
        batch = images[torch.randint(0, len(images), (config.batch_size,), generator=generator)]
        timesteps = torch.randint(
            0, scheduler.config.num_train_timesteps, (config.batch_size,), generator=generator
        )
        noise = torch.randn(batch.shape, generator=generator)
        abar = alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        noisy = forward_noise(batch, noise, abar)  # forward process, DDPM eq. 4
        loss = F.mse_loss(unet(noisy, timesteps).sample, noise)  # L_simple, DDPM eq. 14
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        decay = _ema_decay(config.ema_decay, step)
        with torch.no_grad():
            for ema_param, param in zip(ema.parameters(), unet.parameters()):
                ema_param.lerp_(param, 1 - decay)
        losses.append(loss.item())
        if step % 25 == 0:
            progress.set_postfix(loss=f"{np.mean(losses[-100:]):.4f}")
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
            # The last one too: a later run with a larger --steps continues from it.
            _save_checkpoint(checkpoint_dir, step + 1, unet, ema, optimizer, config, unet_config)
    elapsed = time.time() - started
    logger.info("trained %d steps in %.0f s", config.steps - start, elapsed)
    save_model(ema, scheduler, out_dir)
    write_json_atomic(
        out_dir / "training.json",
        {
            "train": asdict(config),
            "unet": asdict(unet_config),
            "dataset": dataset.name,
            "dataset_fingerprint": dataset.fingerprint(),
            "seconds": round(elapsed, 1),
        },
    )
    return out_dir


def _shift(images: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Random translations by up to max_shift pixels: cheap augmentation for a small training set."""
    dx, dy = torch.randint(-max_shift, max_shift + 1, (2,), generator=generator).tolist()
    return torch.roll(images, shifts=(dy, dx), dims=(2, 3))


def train_classifier(train: Dataset, heldout: Dataset, out_dir: str | Path, config: TrainConfig) -> float:
    """Train the feature classifier on the labels; returns held-out accuracy."""
    torch.manual_seed(config.seed)
    classes = len(train.class_names)
    model = FeatureClassifier(
        ClassifierConfig(
            sample_size=train.resolution,
            num_classes=classes,
            class_names=tuple(train.class_names),
            channels=train.channels,
        )
    ).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    images = torch.from_numpy(to_model_range(train.images))
    labels = torch.from_numpy(train.labels)
    generator = torch.Generator().manual_seed(config.seed)
    steps_per_epoch = max(1, len(images) // config.batch_size)
    total = steps_per_epoch * config.classifier_epochs
    lr_schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=total)
    for _ in tqdm(range(config.classifier_epochs), desc="train classifier", unit="epoch"):
        order = torch.randperm(len(images), generator=generator)
        for batch in order[: steps_per_epoch * config.batch_size].split(config.batch_size):
            # Light noise too, so the classifier also reads the x0 estimates of early steps.
            x = _shift(images[batch], generator) + 0.1 * torch.randn(images[batch].shape, generator=generator)
            loss = F.cross_entropy(model(x), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            lr_schedule.step()
    model.eval().requires_grad_(False)
    predictions = model.probabilities(torch.from_numpy(to_model_range(heldout.images))).argmax(-1).numpy()
    accuracy = float((predictions == heldout.labels).mean())
    save_classifier(model, out_dir)
    write_json_atomic(
        Path(out_dir) / "classifier_eval.json", {"heldout_accuracy": accuracy, "heldout_size": len(heldout)}
    )
    logger.info("classifier held-out accuracy %.4f on %d images", accuracy, len(heldout))
    return accuracy
