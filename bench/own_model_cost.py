"""What featurizing your own model costs, on models of the papers' sizes with random weights (the cost does
not depend on them, so no download is needed):

- cifar_ddpm: the UNet2DModel of the DDPM paper's CIFAR-10 model (~36M parameters), 32x32 RGB images;
- sd15_lora: a Stable Diffusion 1.5-sized latent text-to-image pipeline (UNet2DConditionModel 860M, its
  VAE and a CLIP ViT-L text encoder's shape) with a rank-4 LoRA adapter on the attention projections,
  512x512 captioned images, featurized with --params lora (D-TRAK's LoRA setting).

    python -m bench.own_model_cost --case cifar_ddpm --images 16 --json bench/results/own_model_cost.json
    python -m bench.own_model_cost --case sd15_lora --images 2 --json bench/results/own_model_cost.json

Builds the pipeline folder and an image folder in a temporary directory, runs `precompute featurize` with the
default spec (10 buckets, k = 512, count-sketch) on --images images, and reports the whole-process wall time,
the featurize report's gradients per second, and from it the hours per 1,000 images.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.results_file import write_case

ROOT = Path(__file__).resolve().parents[1]

# the featurize report: "... 20 gradients in 98.3 s = 0.2 gradient-examples/s ...; peak RSS 5.98 GB"
RATE = re.compile(r"([0-9]+) gradients in ([0-9.]+) s = .*peak RSS ([0-9.]+) GB")
CIFAR_UNET = dict(  # the DDPM paper's CIFAR-10 network as diffusers' UNet2DModel spells it
    sample_size=32,
    in_channels=3,
    out_channels=3,
    layers_per_block=2,
    block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
)


SD15_UNET = dict(  # Stable Diffusion 1.5's UNet (its unet/config.json)
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768,
    attention_head_dim=8,
)
SD15_VAE = dict(  # its vae/config.json
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    sample_size=512,
    scaling_factor=0.18215,
)


def build_sd15(root: Path, images: int, size: int = 512) -> tuple[Path, Path]:
    """The SD 1.5 shapes with random weights; the tokenizer is the tests' character one (77 tokens), whose
    smaller vocabulary changes only the embedding table's size."""
    import numpy as np
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from PIL import Image
    from transformers import CLIPTextConfig, CLIPTextModel

    from tests.latent_fixtures import write_tokenizer

    torch.manual_seed(0)
    model_dir, data_dir = root / "sd15-lora", root / "images"
    tokenizer = write_tokenizer(model_dir / "tokenizer", max_length=77)
    end = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    text = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        projection_dim=768,
        eos_token_id=end,
        pad_token_id=end,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|startoftext|>"),
    )
    CLIPTextModel(text).save_pretrained(model_dir / "text_encoder")
    AutoencoderKL(**dict(SD15_VAE, sample_size=size)).save_pretrained(model_dir / "vae")
    unet = UNet2DConditionModel(**dict(SD15_UNET, sample_size=size // 8))
    unet.save_pretrained(model_dir / "unet")
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear").save_pretrained(
        model_dir / "scheduler"
    )
    (model_dir / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    unet.add_adapter(config)
    StableDiffusionPipeline.save_lora_weights(
        model_dir / "lora",
        unet_lora_layers=get_peft_model_state_dict(unet),
        unet_lora_adapter_metadata=config.to_dict(),
    )
    rng = np.random.default_rng(0)
    data_dir.mkdir(parents=True)
    rows = []
    for i in range(images):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(data_dir / f"{i:04d}.png")
        rows.append(json.dumps({"file_name": f"{i:04d}.png", "text": f"a painting, number {i}"}))
    (data_dir / "metadata.jsonl").write_text("\n".join(rows))
    return model_dir, data_dir


def build(root: Path, images: int) -> tuple[Path, Path]:
    import numpy as np
    import torch
    from diffusers import DDPMScheduler, UNet2DModel
    from PIL import Image

    torch.manual_seed(0)
    model_dir, data_dir = root / "cifar-ddpm", root / "images"
    unet = UNet2DModel(**CIFAR_UNET)
    unet.save_pretrained(model_dir / "unet", safe_serialization=True)
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(model_dir / "scheduler")
    rng = np.random.default_rng(0)
    for i in range(images):
        folder = data_dir / f"class{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i:04d}.png")
    return model_dir, data_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", choices=("cifar_ddpm", "sd15_lora"), default="cifar_ddpm")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument(
        "--size", type=int, default=512, help="sd15_lora: image side in pixels (latents are 1/8)"
    )
    parser.add_argument("--workers", type=int, default=None, help="featurize --workers (default: its own)")
    parser.add_argument("--buckets", type=int, default=10)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    import torch

    sd15 = args.case == "sd15_lora"
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, data_dir = (
            build_sd15(Path(tmp), args.images, args.size) if sd15 else build(Path(tmp), args.images)
        )
        unet_class = "UNet2DConditionModel" if sd15 else "UNet2DModel"
        unet = getattr(__import__("diffusers"), unet_class).from_pretrained(model_dir / "unet")
        params = sum(p.numel() for p in unet.parameters())
        del unet
        index_dir = Path(tmp) / "index"
        command = [sys.executable, "-m", "precompute", "featurize", "--model", str(model_dir), "--data"]
        command += [str(data_dir), "--split", "all", "--out", str(index_dir), "--buckets", str(args.buckets)]
        command += ["--storage", "int8", "--chunk-size", str(1 if sd15 else min(args.images, 8))]
        command += ["--params", "lora"] if sd15 else []
        command += ["--workers", str(args.workers)] if args.workers else []
        environment = dict(os.environ, DAX_CACHE=str(Path(tmp) / "cache"))
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=environment)
        seconds = time.perf_counter() - started
        attributed = (
            json.loads((index_dir / "meta.json").read_text())["num_params"] if done.returncode == 0 else 0
        )
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    match = RATE.search(done.stdout)
    rate, rss = int(match.group(1)) / float(match.group(2)), float(match.group(3))  # unrounded
    model = (
        "StableDiffusionPipeline, SD 1.5 shapes (UNet2DConditionModel, VAE, CLIP ViT-L text encoder), "
        f"rank-4 LoRA on the attention projections, random weights, {args.size}x{args.size} images"
        if sd15
        else "UNet2DModel, DDPM CIFAR-10 configuration, random weights"
    )
    result = {
        "model": model,
        "parameters": params,
        "attributed_parameters": attributed,
        "images": args.images,
        "image_size": args.size if sd15 else 32,
        "workers": args.workers,
        "buckets": args.buckets,
        "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "wall_seconds": round(seconds, 1),
        "gradients_per_second": round(rate, 4),
        "hours_per_1000_images": round(1000 * args.buckets / rate / 3600, 2),
        "peak_rss_gb": rss,
        "command": f"python -m bench.own_model_cost --case {args.case} --images {args.images} "
        f"--buckets {args.buckets}"
        + (f" --size {args.size}" if sd15 else "")
        + (f" --workers {args.workers}" if args.workers else ""),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        write_case(args.json, f"{args.case}_{args.size}px_cpu" if sd15 else f"{args.case}_cpu", result)


if __name__ == "__main__":
    main()
