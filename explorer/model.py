"""Load and save a diffusers DDPM (UNet2DModel + DDPMScheduler) as safetensors.

A model directory is laid out like a diffusers DDPMPipeline folder, so either side can read the
other's:

    model_dir/model_index.json
    model_dir/unet/config.json + diffusion_pytorch_model.safetensors
    model_dir/scheduler/scheduler_config.json

A bare UNet folder (config.json + weights, no scheduler) loads too, with a default scheduler. The scheduler
is the class its scheduler_config.json names, one of SCHEDULERS (DDPM, DDIM, DPM-Solver): the sampler runs
the pipeline's own; the features only use its training noise schedule (alphas_cumprod), which every one of
them shares with the DDPM it was trained as. The UNet takes any number of channels (1 and 3 are loaded as
grayscale and RGB images) and any size.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import diffusers
import torch
from diffusers import DDPMScheduler, UNet2DModel

from explorer.errors import ExplorerError

if TYPE_CHECKING:
    from explorer.latent import LatentParts
    from explorer.lora import LoraRecord

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


@dataclass
class UNetConfig:
    """The small UNet of the embedded default (~1.06M parameters at 16x16)."""

    sample_size: int = 16  # image side in pixels
    channels: int = 1  # grayscale
    block_out_channels: tuple[int, ...] = (32, 64, 64)  # one entry per resolution level
    layers_per_block: int = 1  # resnets per level
    norm_num_groups: int = 8  # GroupNorm groups; must divide every block width

    def build(self) -> UNet2DModel:
        # Down/UpBlock2D only and no mid-block attention: diffusers' attention has no vmap
        # batching rule on CPU, and per-example gradients need vmap.
        levels = len(self.block_out_channels)
        return UNet2DModel(
            sample_size=self.sample_size,
            in_channels=self.channels,
            out_channels=self.channels,
            block_out_channels=self.block_out_channels,
            layers_per_block=self.layers_per_block,
            down_block_types=("DownBlock2D",) * levels,
            up_block_types=("UpBlock2D",) * levels,
            add_attention=False,
            norm_num_groups=self.norm_num_groups,
        )


def tiny_config(sample_size: int = 8) -> UNetConfig:
    """A UNet small enough for tests (~100k parameters)."""
    return UNetConfig(sample_size=sample_size, block_out_channels=(16, 32), norm_num_groups=8)


SCHEDULERS = ("DDPMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler")


def load_scheduler(scheduler_dir: Path):
    """The scheduler class scheduler_config.json names, if it is one of SCHEDULERS."""
    config_path = scheduler_dir / "scheduler_config.json"
    try:
        name = json.loads(config_path.read_text()).get("_class_name", "DDPMScheduler")
    except (OSError, ValueError) as error:
        raise ExplorerError(f"{str(config_path)!r} is unreadable ({error}): fix or remove it") from error
    if name not in SCHEDULERS:
        raise ExplorerError(
            f"{str(config_path)!r} names scheduler {name!r}, which is not supported: use one of "
            f"{', '.join(SCHEDULERS)} (e.g. DDIMScheduler.from_config(config).save_pretrained(...))"
        )
    return getattr(diffusers, name).from_pretrained(scheduler_dir)


def make_scheduler(num_train_timesteps: int = 1000) -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps, beta_schedule="linear", prediction_type="epsilon"
    )


@dataclass
class DiffusionModel:
    """A frozen eps-prediction UNet, its scheduler and where it came from; `latent` holds a latent
    text-to-image pipeline's VAE and text encoder (explorer.latent), None for a pixel model. sample_size and
    channels are the UNet's (latent space); image_size and image_channels are the pictures'."""

    unet: UNet2DModel
    scheduler: DDPMScheduler
    weights_hash: str
    path: str  # as given: a folder or a Hub id ORG/NAME[@REVISION] (explorer.hub)
    latent: LatentParts | None = None
    lora: LoraRecord | None = None  # the LoRA adapter loaded into the UNet (explorer.lora)

    @property
    def description(self) -> str:
        """The model and its adapter, for messages."""
        from explorer.lora import describe_model

        return describe_model(self.path, self.lora)

    @property
    def sample_size(self) -> int:
        size = self.unet.config.sample_size
        return int(size if isinstance(size, int) else size[0])

    @property
    def channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def image_size(self) -> int:
        return self.sample_size if self.latent is None else self.sample_size * self.latent.downscale

    @property
    def image_channels(self) -> int:
        return self.channels if self.latent is None else self.latent.image_channels

    def eps(self, sample: torch.Tensor, t, context: torch.Tensor | None = None) -> torch.Tensor:
        """The UNet's noise prediction; context (N, L, D): a text model's prompt embeddings."""
        self.check_context(context, len(sample))
        if context is None:
            return self.unet(sample, t).sample
        return self.unet(sample, t, encoder_hidden_states=context).sample

    def check_context(self, context: torch.Tensor | None, count: int) -> None:
        """A text model needs one prompt embedding per sample; a pixel model takes none."""
        if self.latent is None:
            if context is not None:
                raise ExplorerError(f"{self.path!r} is not text-conditioned: it takes no prompt")
            return
        expected = (count, *self.latent.context_shape)
        if context is None or tuple(context.shape) != expected:
            got = None if context is None else tuple(context.shape)
            raise ExplorerError(
                f"{self.path!r} is text-conditioned: give a prompt per image (embeddings {expected}, "
                f"got {got})"
            )

    def to_images(self, samples: torch.Tensor) -> torch.Tensor:
        """UNet space -> pictures in [-1, 1] (a latent model decodes through its VAE)."""
        return samples if self.latent is None else self.latent.decode(samples)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)


def save_model(unet: UNet2DModel, scheduler: DDPMScheduler, out_dir: str | Path) -> Path:
    """Write a DDPMPipeline-compatible folder with safetensors weights."""
    out_dir = Path(out_dir)
    unet.save_pretrained(out_dir / "unet", safe_serialization=True)
    scheduler.save_pretrained(out_dir / "scheduler")
    index = {
        "_class_name": "DDPMPipeline",
        "unet": ["diffusers", "UNet2DModel"],
        "scheduler": ["diffusers", "DDPMScheduler"],
    }
    (out_dir / "model_index.json").write_text(json.dumps(index, indent=2))
    return out_dir


def file_hash(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def _unet_folder(model_dir: Path) -> Path:
    if (model_dir / "unet" / "config.json").is_file():
        return model_dir / "unet"
    if (model_dir / "config.json").is_file():
        return model_dir
    raise ExplorerError(
        f"model directory {str(model_dir)!r} has neither unet/config.json nor config.json: pass a "
        "folder written by `python -m precompute train` or a diffusers DDPM pipeline/UNet2DModel folder"
    )


def load_model(
    model_dir: str | Path,
    device: str | torch.device = "cpu",
    lora: str | None = None,
    lora_scale: float = 1.0,
) -> DiffusionModel:
    """Load a UNet2DModel (safetensors only, never pickle) and its scheduler, frozen in eval mode, or a latent
    text-to-image pipeline (explorer.latent) with its LoRA adapter (explorer.lora: `lora` a file, folder or
    Hub id, "none" for no adapter, None for the pipeline's own). model_dir: a folder, or a Hub id
    ORG/NAME[@REV] in the local Hugging Face cache (explorer.hub)."""
    from explorer.hub import local_or_cached

    name = str(model_dir)
    model_dir = local_or_cached(model_dir, "model")
    if not model_dir.is_dir():
        raise ExplorerError(
            f"model directory {str(model_dir)!r} does not exist: train one with "
            "`python -m precompute train --data mnist5k --out assets/model`, or pass --model DIR or a Hub id "
            "ORG/NAME from the local Hugging Face cache"
        )
    if pipeline_class(model_dir) in LATENT_PIPELINES:
        from explorer.latent import load_latent_model

        return load_latent_model(model_dir, device, lora, lora_scale, name)
    if lora not in (None, "none") or lora_scale != 1:
        raise ExplorerError(
            f"--lora {lora!r} (scale {lora_scale:g}): LoRA adapters load into a StableDiffusionPipeline's "
            f"UNet; {name!r} is a pixel DDPM: featurize it without --lora"
        )
    unet_dir = _unet_folder(model_dir)
    weights = require_safetensors(unet_dir, WEIGHTS_NAME)
    try:
        unet = UNet2DModel.from_pretrained(unet_dir, use_safetensors=True, low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError, json.JSONDecodeError) as error:
        raise ExplorerError(f"could not load the UNet from {str(unet_dir)!r}: {error}") from error
    scheduler = pipeline_scheduler(model_dir)
    disable_attention_for_vmap(unet)
    unet.to(device).eval().requires_grad_(False)
    return DiffusionModel(unet=unet, scheduler=scheduler, weights_hash=file_hash(weights), path=name)


PIXEL_PIPELINES = ("DDPMPipeline", "DDIMPipeline")
LATENT_PIPELINES = ("StableDiffusionPipeline",)


def pipeline_class(model_dir: Path) -> str | None:
    """The `_class_name` of model_index.json (None: no model_index.json, a bare UNet folder), if supported."""
    index_path = model_dir / "model_index.json"
    if not index_path.is_file():
        return None
    try:
        name = json.loads(index_path.read_text()).get("_class_name")
    except (OSError, ValueError) as error:
        raise ExplorerError(f"{str(index_path)!r} is unreadable ({error}): fix or remove it") from error
    if name not in PIXEL_PIPELINES + LATENT_PIPELINES:
        raise ExplorerError(
            f"{str(index_path)!r} names pipeline {name!r}, which is not supported: use a pixel "
            f"{' or '.join(PIXEL_PIPELINES)} (UNet2DModel) or a latent {', '.join(LATENT_PIPELINES)} "
            "(AutoencoderKL + UNet2DConditionModel + CLIP text encoder)"
        )
    return name


def require_safetensors(folder: Path, name: str) -> Path:
    """folder/name, or an ExplorerError: weights load from safetensors only, never pickle."""
    weights = folder / name
    if not weights.is_file():
        raise ExplorerError(
            f"{str(folder)!r} has no {name}: only safetensors weights are loaded (pickled .bin "
            "files can run code); convert them with diffusers' save_pretrained(safe_serialization=True)"
        )
    return weights


def pipeline_scheduler(model_dir: Path):
    """model_dir/scheduler/ (one of SCHEDULERS), else a linear-beta DDPM; epsilon prediction only."""
    scheduler_dir = model_dir / "scheduler"
    if (scheduler_dir / "scheduler_config.json").is_file():
        scheduler = load_scheduler(scheduler_dir)
    else:
        logger.info("no scheduler/ in %s: using a linear-beta DDPM scheduler with 1000 steps", model_dir)
        scheduler = make_scheduler()
    check_prediction_type(scheduler)
    return scheduler


def check_prediction_type(scheduler) -> None:
    prediction_type = scheduler.config.prediction_type
    if prediction_type != "epsilon":
        raise ExplorerError(
            f"scheduler prediction_type {prediction_type!r} is not supported: the output functions "
            "assume an epsilon-prediction DDPM"
        )


def disable_attention_for_vmap(unet: UNet2DModel) -> None:
    """Give every diffusers Attention the plain AttnProcessor: the SDPA one has no vmap rule on CPU."""
    from diffusers.models.attention_processor import Attention, AttnProcessor

    for module in unet.modules():
        if isinstance(module, Attention):
            module.set_processor(AttnProcessor())
