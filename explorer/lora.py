"""LoRA adapters of a latent pipeline's UNet (and text encoder), in the forms diffusers and peft save them:

    pytorch_lora_weights.safetensors      StableDiffusionPipeline.save_lora_weights(DIR): keys unet.* (and
                                          text_encoder.*), the LoraConfig in its header
    adapter_config.json                   a peft adapter folder (PeftModel.save_pretrained) of the UNet
    + adapter_model.safetensors

Where an adapter is found, the first that applies:
  1. `--lora PATH`: that .safetensors file, a folder holding one of the above, or a Hub id in the local cache
     (explorer.hub); `--lora none`: the pipeline without the adapter it holds
  2. beside the pipeline's model_index.json (`save_lora_weights(pipeline_dir)`)
  3. MODEL/lora/

Every adapted layer computes W x + scale * (lora_alpha / r) B A x (Hu et al. 2021, eq. 3); scale is
`--lora-scale` (diffusers' set_adapters weight, default 1). The adapter's files, and a scale other than 1, are
hashed into the model's hash, and meta.json records the adapter as given and its scale (LoraRecord), so an
index refuses the model without its adapter.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

from explorer.errors import ExplorerError
from explorer.hub import local_or_cached
from explorer.model import file_hash

logger = logging.getLogger(__name__)

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
NO_LORA = "none"  # `--lora none`: ignore the adapter a pipeline folder holds
ADAPTER = "default_0"  # the adapter's name in the modules (diffusers' first default name)
LORA_FORMS = (
    f"a {LORA_WEIGHTS} file or a folder holding one (StableDiffusionPipeline.save_lora_weights), or a peft "
    f"adapter folder ({PEFT_CONFIG} + {PEFT_WEIGHTS})"
)


@dataclass(frozen=True)
class LoraRecord:
    """The adapter a model was loaded with, as meta.json keeps it."""

    # as given: a file, a folder or a Hub id ORG/NAME[@REVISION]; a found one: the file's path
    path: str
    # multiplies the adapter's update B A (diffusers' set_adapters weight)
    scale: float = 1.0

    def describe(self) -> str:
        return f"LoRA {self.path!r}" + ("" if self.scale == 1 else f" at scale {self.scale:g}")


@dataclass(frozen=True)
class LoraFiles:
    """An adapter's files on disk: weights, and a peft adapter's adapter_config.json (None: diffusers')."""

    weights: Path
    config: Path | None = None

    def hashes(self, scale: float) -> list[str]:
        """What the adapter adds to the model's hash."""
        found = [file_hash(self.weights)] + ([file_hash(self.config)] if self.config else [])
        return found + ([f"lora_scale={scale!r}"] if scale != 1 else [])


def describe_model(path: str, lora: LoraRecord | None) -> str:
    """'model' + its adapter, for messages: "'sd' with LoRA 'out/lora'" or "'sd' without a LoRA adapter"."""
    return f"{path!r} " + (f"with {lora.describe()}" if lora else "without a LoRA adapter")


def mismatch_fix(built: LoraRecord | None, loaded: LoraRecord | None) -> str:
    """How to load the model an index was built for, when the loaded one's hash differs."""
    rebuild = "or rebuild the index with `python -m precompute featurize --model YOUR_MODEL"
    if built is not None and built != loaded:
        scale = "" if built.scale == 1 else f" --lora-scale {built.scale:g}"
        return f"load the model with the index's adapter (--lora {built.path}{scale}), {rebuild} ...`"
    if built is None and loaded is not None:
        return f"load the model without its adapter (--lora {NO_LORA}), {rebuild} --lora ADAPTER ...`"
    return f"pass the matching --model, {rebuild} ...`"


def require_adapter(model) -> None:
    """`--params lora` attributes an adapter's matrices: refuse a model loaded without one, naming the fix."""
    if model.lora is None:
        looked = (
            f"found none beside its model_index.json ({LORA_WEIGHTS}) or in lora/"
            if model.latent is not None
            else "it is a pixel DDPM, and adapters load into a StableDiffusionPipeline's UNet"
        )
        raise ExplorerError(
            f"spec.params lora attributes a LoRA adapter's matrices, and the model {model.path!r} was loaded "
            f"without one ({looked}): pass --lora PATH ({LORA_FORMS}, or a Hub id)",
            ("spec.params",),
        )


def check_scale(scale: float) -> float:
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
        raise ExplorerError(f"--lora-scale {scale!r} must be a finite number (1: the adapter as trained)")
    return float(scale)


def adapter_in(folder: Path) -> LoraFiles | None:
    """The adapter a folder holds (diffusers' file first, then a peft adapter), or None."""
    if (folder / LORA_WEIGHTS).is_file():
        return LoraFiles(folder / LORA_WEIGHTS)
    if (folder / PEFT_CONFIG).is_file():
        if not (folder / PEFT_WEIGHTS).is_file():
            raise ExplorerError(
                f"the peft adapter {str(folder)!r} has no {PEFT_WEIGHTS}: only safetensors weights are "
                "loaded (pickled .bin files can run code); save it with "
                "save_pretrained(safe_serialization=True)"
            )
        return LoraFiles(folder / PEFT_WEIGHTS, folder / PEFT_CONFIG)
    return None


def given_adapter(lora: str) -> LoraFiles:
    """`--lora PATH`: a .safetensors file, a folder holding an adapter, or a Hub id in the local cache."""
    path = local_or_cached(lora, "LoRA adapter")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ExplorerError(
                f"--lora {lora!r} is not a .safetensors file: pass {LORA_FORMS} (pickled .bin files are not "
                "loaded: they can run code)"
            )
        beside = path.parent / PEFT_CONFIG
        return LoraFiles(path, beside if path.name == PEFT_WEIGHTS and beside.is_file() else None)
    if path.is_dir():
        found = adapter_in(path)
        if found is not None:
            return found
        weights = sorted(path.glob("*.safetensors"))
        if len(weights) == 1:  # e.g. a Hub LoRA saved under its own name
            return LoraFiles(weights[0])
        raise ExplorerError(
            f"--lora {lora!r} holds no LoRA adapter ({len(weights)} .safetensors files there): pass "
            f"{LORA_FORMS}"
        )
    raise ExplorerError(f"--lora {lora!r} does not exist: pass {LORA_FORMS}, or a Hub id ORG/NAME")


def find_lora(model_dir: Path, lora: str | None) -> tuple[LoraFiles, str] | None:
    """The adapter to load and the name to record: `--lora`, else the pipeline's own (beside model_index.json
    or in lora/), else None."""
    if lora is not None:
        return None if lora == NO_LORA else (given_adapter(lora), lora)
    beside, lora_dir = adapter_in(model_dir), model_dir / "lora"
    in_lora_dir = adapter_in(lora_dir) if lora_dir.is_dir() else None
    if lora_dir.is_dir() and in_lora_dir is None:
        raise ExplorerError(f"{str(lora_dir)!r} holds no LoRA adapter: put {LORA_FORMS} there, or remove it")
    if beside is not None and in_lora_dir is not None:
        raise ExplorerError(
            f"{str(model_dir)!r} holds two LoRA adapters, {str(beside.weights)!r} and "
            f"{str(in_lora_dir.weights)!r}: choose one with --lora PATH (or --lora none for neither)"
        )
    found = beside or in_lora_dir
    return None if found is None else (found, str(found.weights))


def load_lora(unet, text_encoder, files: LoraFiles, scale: float) -> None:
    """Add the adapter to the UNet (and the text encoder, where it has text_encoder.* matrices) at `scale`."""
    try:
        if files.config is None:
            text_adapted = _load_diffusers_lora(unet, text_encoder, files.weights)
        else:
            text_adapted = False
            _load_peft_adapter(unet, files)
        unet.set_adapters([ADAPTER], [scale])
        if text_adapted:
            from diffusers.utils.peft_utils import set_weights_and_activate_adapters

            set_weights_and_activate_adapters(text_encoder, [ADAPTER], [scale])
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as error:
        raise ExplorerError(
            f"could not load the LoRA adapter {str(files.weights)!r} into the pipeline: {error}"
        ) from error


def _load_diffusers_lora(unet, text_encoder, weights: Path) -> bool:
    """save_lora_weights' file (or a kohya-style one diffusers converts); True if it adapts the text
    encoder."""
    from diffusers import StableDiffusionPipeline

    state, alphas, metadata = StableDiffusionPipeline.lora_state_dict(
        str(weights.parent),
        weight_name=weights.name,
        use_safetensors=True,
        local_files_only=True,
        return_lora_metadata=True,
        unet_config=unet.config,
    )
    unet_keys = {key: value for key, value in state.items() if key.startswith("unet.")}
    text_keys = [key for key in state if key.startswith("text_encoder.")]
    if not unet_keys and not text_keys:
        raise ExplorerError(
            f"{str(weights)!r} has no unet.* or text_encoder.* LoRA matrices (keys such as "
            f"{', '.join(list(state)[:3])}): pass {LORA_FORMS}"
        )
    StableDiffusionPipeline.load_lora_into_unet(state, alphas, unet, adapter_name=ADAPTER, metadata=metadata)
    _check_loaded(unet, sum(v.numel() for k, v in unet_keys.items() if "alpha" not in k), weights)
    if text_keys:
        StableDiffusionPipeline.load_lora_into_text_encoder(
            state, alphas, text_encoder, prefix="text_encoder", adapter_name=ADAPTER, metadata=metadata
        )
    return bool(text_keys)


def _load_peft_adapter(unet, files: LoraFiles) -> None:
    """A peft adapter folder of the UNet: its LoraConfig injected, then its matrices set."""
    from peft import LoraConfig, set_peft_model_state_dict
    from safetensors.torch import load_file

    config = LoraConfig.from_pretrained(str(files.weights.parent))
    state = {key.removeprefix("base_model.model."): value for key, value in load_file(files.weights).items()}
    unet.add_adapter(config, adapter_name=ADAPTER)
    result = set_peft_model_state_dict(unet, state, adapter_name=ADAPTER)
    unexpected = [key for key in result.unexpected_keys if ".lora_" in key]
    if unexpected:
        raise ExplorerError(
            f"the peft adapter {str(files.weights)!r} has {len(unexpected)} matrices this UNet has no layer "
            f"for (e.g. {unexpected[0]}): it was trained on another model"
        )
    _check_loaded(unet, sum(value.numel() for value in state.values()), files.weights)


def _check_loaded(unet, expected: int, weights: Path) -> None:
    """Every LoRA matrix of the UNet came from the file, and every one of the file's found its layer."""
    loaded = sum(p.numel() for name, p in unet.named_parameters() if ".lora_A." in name or ".lora_B." in name)
    if loaded != expected:
        raise ExplorerError(
            f"the LoRA adapter {str(weights)!r} holds {expected} UNet LoRA weights but {loaded} were loaded: "
            "it does not match this UNet's layers (an adapter of another model?)"
        )
