"""What featurizing your own pixel model costs: a CIFAR-10-sized DDPM (the UNet2DModel configuration of the
DDPM paper's CIFAR-10 model, ~36M parameters, 32x32 RGB) with random weights, on images of that size.

    python bench/own_model_cost.py --images 16 --json bench/results/own_model_cost.json

Builds the pipeline folder and an image folder in a temporary directory, runs `precompute featurize` with the
default spec (10 buckets, k = 512, count-sketch) on --images images, and reports the whole-process wall time,
the featurize report's gradients per second, and from it the hours per 1,000 images at 10 buckets. Weights do
not change the cost, so no download is needed.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.results_file import write_case  # noqa: E402

RATE = re.compile(r"= ([0-9.]+) gradient-examples/s .*peak RSS ([0-9.]+) GB")
CIFAR_UNET = dict(  # the DDPM paper's CIFAR-10 network as diffusers' UNet2DModel spells it
    sample_size=32,
    in_channels=3,
    out_channels=3,
    layers_per_block=2,
    block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
)


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
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--buckets", type=int, default=10)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        model_dir, data_dir = build(Path(tmp), args.images)
        params = sum(
            p.numel()
            for p in __import__("diffusers").UNet2DModel.from_pretrained(model_dir / "unet").parameters()
        )
        command = [
            sys.executable,
            "-m",
            "precompute",
            "featurize",
            "--model",
            str(model_dir),
            "--data",
            str(data_dir),
        ]
        command += ["--split", "all", "--out", str(Path(tmp) / "index"), "--buckets", str(args.buckets)]
        command += ["--chunk-size", str(min(args.images, 8)), "--storage", "int8"]
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ))
        seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    match = RATE.search(done.stdout)
    rate, rss = float(match.group(1)), float(match.group(2))
    result = {
        "model": "UNet2DModel, DDPM CIFAR-10 configuration, random weights",
        "parameters": params,
        "images": args.images,
        "buckets": args.buckets,
        "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "wall_seconds": round(seconds, 1),
        "gradients_per_second": rate,
        "hours_per_1000_images": round(1000 * args.buckets / rate / 3600, 2),
        "peak_rss_gb": rss,
        "command": f"python bench/own_model_cost.py --images {args.images} --buckets {args.buckets}",
    }
    print(json.dumps(result, indent=2))
    if args.json:
        write_case(args.json, "cifar_ddpm_cpu", result)


if __name__ == "__main__":
    main()
