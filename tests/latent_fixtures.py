"""A tiny latent text-to-image pipeline built from configs (no downloads): AutoencoderKL,
UNet2DConditionModel, CLIP text encoder and a byte-level tokenizer, a LoRA adapter, a CLIP model for
concept curves, and a captioned image folder (metadata.jsonl)."""

import json
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {"red": (210, 30, 30), "green": (30, 190, 40), "blue": (40, 60, 220)}
PLACES = {"left": 1, "right": 8}  # the square's left edge, in pixels of a 16-pixel image
IMAGE_PX, TOKENS, WIDTH = 16, 16, 32


def _byte_characters() -> list[str]:
    """The 256 printable stand-ins byte-level BPE tokenizers (GPT-2, CLIP) give the bytes."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in kept]
    return [chr(b) for b in kept] + [chr(256 + i) for i in range(len(extra))]


def write_tokenizer(folder: Path, max_length: int = TOKENS):
    """A CLIPTokenizer over single characters (no merges): every prompt tokenizes, one token per character."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    characters = _byte_characters()
    vocab = {c: i for i, c in enumerate(characters + [c + "</w>" for c in characters])}
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length
    )
    tokenizer.save_pretrained(folder)
    return tokenizer


def _text_config(tokenizer):
    from transformers import CLIPTextConfig

    end = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=WIDTH,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=TOKENS,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|startoftext|>"),
        eos_token_id=end,
        pad_token_id=end,
    )


def write_text_pipeline(root: Path, lora: bool = True, seed: int = 0) -> Path:
    """A StableDiffusionPipeline folder: 16 px RGB images, 4 x 8 x 8 latents, 16-token prompts, a DDIM
    scheduler; lora: a rank-4 adapter on the attention projections in lora/ (write_lora)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = write_tokenizer(root / "tokenizer")
    CLIPTextModel(_text_config(tokenizer)).save_pretrained(root / "text_encoder")
    AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=IMAGE_PX,
    ).save_pretrained(root / "vae")
    unet = UNet2DConditionModel(
        sample_size=IMAGE_PX // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=WIDTH,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    unet.save_pretrained(root / "unet")
    DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear").save_pretrained(root / "scheduler")
    components = {
        "vae": ["diffusers", "AutoencoderKL"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"],
    }
    (root / "model_index.json").write_text(
        json.dumps({"_class_name": "StableDiffusionPipeline", **components})
    )
    if lora:
        write_lora(root, root / "lora")
    return root


def write_lora(pipeline: Path, out: Path, form: str = "diffusers", seed: int = 1, text: bool = False) -> Path:
    """A rank-4 adapter of the pipeline's attention projections, nonzero as fine-tuned, saved as diffusers'
    training scripts do (form "diffusers": StableDiffusionPipeline.save_lora_weights(out), text: the text
    encoder's too) or as a peft adapter folder (form "peft": PeftModel.save_pretrained(out))."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig, get_peft_model, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(pipeline / "unet")
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    if form == "peft":
        adapted = get_peft_model(unet, config)
        _fine_tuned(adapted)
        adapted.save_pretrained(out)
        return out
    unet.add_adapter(config)
    _fine_tuned(unet)
    layers = {
        "unet_lora_layers": get_peft_model_state_dict(unet),
        "unet_lora_adapter_metadata": config.to_dict(),
    }
    if text:
        text_encoder = CLIPTextModel.from_pretrained(pipeline / "text_encoder")
        text_config = LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"])
        inject_adapter_in_model(text_config, text_encoder)  # transformers' add_adapter wants peft >= 0.22
        _fine_tuned(text_encoder)
        layers.update(
            text_encoder_lora_layers=get_peft_model_state_dict(text_encoder),
            text_encoder_lora_adapter_metadata=text_config.to_dict(),
        )
    StableDiffusionPipeline.save_lora_weights(out, **layers)
    return out


def _fine_tuned(module) -> None:
    """lora_B is zero at initialization; a fine-tuned adapter's is not."""
    import torch

    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)


def write_clip(root: Path, seed: int = 0) -> Path:
    """A tiny CLIPModel (vision 16 px) with the same character tokenizer: zero-shot concept curves."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig

    torch.manual_seed(seed)
    tokenizer = write_tokenizer(root)
    vision = CLIPVisionConfig(
        hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=16
    )
    vision.patch_size = 4
    config = CLIPConfig(text_config=_text_config(tokenizer).to_dict(), vision_config=vision.to_dict())
    config.projection_dim = 16
    CLIPModel(config).save_pretrained(root)
    return root


def caption(colour: str, place: str) -> str:
    return f"a {colour} square on the {place}"


def write_captioned_images(root: Path, per_pair: int = 6) -> Path:
    """Coloured squares left or right on dark noise, 18 x 20 px (resized and cropped to 16), captioned in
    metadata.jsonl; each (colour, place) pair has per_pair images."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    rows = []
    for colour, rgb in COLOURS.items():
        for place, left in PLACES.items():
            for i in range(per_pair):
                pixels = rng.integers(0, 50, (18, 20, 3)).astype(np.uint8)
                top = int(rng.integers(2, 8))
                pixels[top : top + 7, left + 2 : left + 9] = rgb
                name = f"{colour}_{place}_{i}.png"
                Image.fromarray(pixels).save(root / name)
                rows.append({"file_name": name, "text": caption(colour, place)})
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    return root
