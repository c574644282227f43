"""Latent text-to-image pipelines (the Stable Diffusion layout, as diffusers' save_pretrained writes it):

    model_dir/model_index.json    _class_name StableDiffusionPipeline
    model_dir/vae/                AutoencoderKL
    model_dir/unet/               UNet2DConditionModel (epsilon prediction)
    model_dir/text_encoder/       CLIPTextModel (transformers)
    model_dir/tokenizer/          CLIPTokenizer
    model_dir/scheduler/          one of explorer.model.SCHEDULERS
    model_dir/pytorch_lora_weights.safetensors or model_dir/lora/: an optional LoRA adapter (explorer.lora)

The diffusion and its attribution run on the VAE's latents z = scaling_factor * mean(E(x)) (the posterior's
mean: deterministic, so a training image has one latent, encoded once and cached by explorer.training_inputs);
pictures are decoded x = D(z / scaling_factor) for display and for the likelihood scorers. A prompt's
conditioning is the text encoder's last hidden state for the padded prompt, as Stable Diffusion uses it.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from explorer.errors import ExplorerError
from explorer.model import (
    WEIGHTS_NAME,
    DiffusionModel,
    disable_attention_for_vmap,
    file_hash,
    pipeline_scheduler,
    require_safetensors,
)

logger = logging.getLogger(__name__)

TEXT_WEIGHTS = "model.safetensors"
MAX_PROMPT_CHARS = 1000
ENCODE_BATCH = 16  # images per VAE encode or decode


@dataclass
class LatentParts:
    """The pieces of a latent text-to-image pipeline around its UNet."""

    vae: torch.nn.Module  # diffusers AutoencoderKL
    text_encoder: torch.nn.Module  # transformers CLIPTextModel
    tokenizer: object  # transformers CLIPTokenizer
    scaling_factor: float
    vae_hash: str  # what a training image's cached latent depends on (explorer.training_inputs)

    @property
    def downscale(self) -> int:
        """Image pixels per latent pixel: the VAE halves the size at every level but the last."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def image_channels(self) -> int:
        return int(self.vae.config.in_channels)

    @property
    def context_shape(self) -> tuple[int, int]:
        return int(self.tokenizer.model_max_length), int(self.text_encoder.config.hidden_size)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> the text encoder's last hidden states (N, L, D), padded to the tokenizer's length."""
        for prompt in prompts:
            if not isinstance(prompt, str) or len(prompt) > MAX_PROMPT_CHARS:
                raise ExplorerError(
                    f"prompt {str(prompt)[:60]!r} must be text of at most {MAX_PROMPT_CHARS} characters"
                )
        tokens = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        return self.text_encoder(tokens.input_ids.to(self.text_encoder.device))[0].float()

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Pictures (N, C, H, W) in [-1, 1] -> latents (N, c, H / downscale, W / downscale)."""
        device = next(self.vae.parameters()).device
        parts = [
            self.vae.encode(batch.to(device)).latent_dist.mean.cpu() for batch in images.split(ENCODE_BATCH)
        ]
        return torch.cat(parts) * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> pictures in [-1, 1]; a single latent (c, h, w) gives a single picture."""
        single = latents.ndim == 3
        batches = (latents[None] if single else latents).split(ENCODE_BATCH)
        device = next(self.vae.parameters()).device
        images = torch.cat(
            [self.vae.decode(z.to(device) / self.scaling_factor).sample.cpu() for z in batches]
        )
        images = images.clamp(-1, 1)
        return images[0] if single else images


def _require(folder: Path, what: str) -> Path:
    if not (folder / "config.json").is_file():
        raise ExplorerError(
            f"{str(folder)!r} has no config.json: a latent text-to-image pipeline folder needs {what} there "
            "(StableDiffusionPipeline.save_pretrained writes it)"
        )
    return folder


def load_latent_model(
    model_dir: Path,
    device: str | torch.device = "cpu",
    lora: str | None = None,
    lora_scale: float = 1.0,
    name: str | None = None,
) -> DiffusionModel:
    """A StableDiffusionPipeline folder + its LoRA adapter (explorer.lora.find_lora: `lora` given, else the
    pipeline's own) as a frozen DiffusionModel with `latent` set; name: the model as given (a Hub id)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from explorer.lora import LoraRecord, check_scale, find_lora, load_lora

    unet_dir = _require(model_dir / "unet", "the conditional UNet")
    vae_dir = _require(model_dir / "vae", "the VAE (AutoencoderKL)")
    text_dir = _require(model_dir / "text_encoder", "the CLIP text encoder")
    hashes = [
        file_hash(require_safetensors(unet_dir, WEIGHTS_NAME)),
        file_hash(require_safetensors(vae_dir, WEIGHTS_NAME)),
        file_hash(require_safetensors(text_dir, TEXT_WEIGHTS)),
    ]
    try:
        unet = UNet2DConditionModel.from_pretrained(unet_dir, use_safetensors=True, low_cpu_mem_usage=False)
        vae = AutoencoderKL.from_pretrained(vae_dir, use_safetensors=True, low_cpu_mem_usage=False)
        text_encoder = CLIPTextModel.from_pretrained(text_dir, use_safetensors=True)
        tokenizer = CLIPTokenizer.from_pretrained(model_dir / "tokenizer")
    except (OSError, ValueError, RuntimeError, TypeError) as error:
        raise ExplorerError(f"could not load the latent pipeline in {str(model_dir)!r}: {error}") from error
    lora_scale, adapter = check_scale(lora_scale), find_lora(model_dir, lora)
    if adapter is None and lora_scale != 1:
        raise ExplorerError(
            f"--lora-scale {lora_scale:g} scales a LoRA adapter, and {str(model_dir)!r} is loaded without "
            "one: pass --lora PATH"
        )
    if adapter is not None:
        files, recorded = adapter
        hashes += files.hashes(lora_scale)
        load_lora(unet, text_encoder, files, lora_scale)
    scheduler = pipeline_scheduler(model_dir)
    disable_attention_for_vmap(unet)
    for module in (unet, vae, text_encoder):
        module.to(device).eval().requires_grad_(False)
    parts = LatentParts(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scaling_factor=float(vae.config.scaling_factor),
        vae_hash=hashes[1],
    )
    weights_hash = hashlib.sha256("".join(hashes).encode()).hexdigest()[:16]
    return DiffusionModel(
        unet=unet,
        scheduler=scheduler,
        weights_hash=weights_hash,
        path=str(model_dir) if name is None else name,
        latent=parts,
        lora=None if adapter is None else LoraRecord(recorded, lora_scale),
    )
