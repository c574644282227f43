"""The command-line options that name a model, defined once for app.py, `python -m explorer` and
`python -m precompute`: --model (a folder or a Hub id in the local cache, explorer.hub), --lora and
--lora-scale (explorer.lora). Light: nothing here imports torch."""

from __future__ import annotations

import argparse

MODEL_HELP = (
    "a model folder (ours, a diffusers DDPM/UNet2DModel or StableDiffusionPipeline folder) or a Hub id "
    "ORG/NAME[@REVISION] in the local Hugging Face cache ($HF_HUB_CACHE or $HF_HOME/hub; nothing is "
    "downloaded)"
)


def add_model_arguments(parser: argparse.ArgumentParser, model_default: str | None, required: bool) -> None:
    """--model, --lora and --lora-scale."""
    default = " (default: %(default)s)" if model_default else ""
    parser.add_argument("--model", default=model_default, required=required, help=MODEL_HELP + default)
    add_lora_arguments(parser)


def add_lora_arguments(parser: argparse.ArgumentParser) -> None:
    """--lora and --lora-scale."""
    parser.add_argument(
        "--lora",
        default=None,
        metavar="PATH",
        help="a LoRA adapter of a StableDiffusionPipeline's UNet: a pytorch_lora_weights.safetensors file or "
        "its folder (save_lora_weights), a peft adapter folder (adapter_config.json + "
        "adapter_model.safetensors), or a Hub id; none: without the adapter the pipeline folder holds "
        "(default: the pytorch_lora_weights.safetensors beside model_index.json, else MODEL/lora/)",
    )
    parser.add_argument(
        "--lora-scale",
        type=float,
        default=None,
        metavar="S",
        help="multiply the adapter's update by S (diffusers' set_adapters weight; recorded in meta.json; "
        "default 1)",
    )
