"""Zero-shot feature likelihoods from a CLIP model directory (transformers CLIPModel + its tokenizer).

For user-named concepts c_1..c_K, p(c_k | image) = softmax_k(s * cos(E_img(image), E_txt(c_k))), with CLIP's
learned logit scale s (Radford et al. 2021, zero-shot classification). It stands in for the feature classifier
when the data has no class labels (captioned images): the curves then say how likely each named concept is
at every denoising step.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from explorer.errors import ExplorerError

# CLIP's preprocessing constants (the OpenAI release); preprocessor_config.json overrides them
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_CONCEPTS = 20


def parse_concepts(text: str | list[str] | None) -> list[str]:
    """'a cat, a dog' or a list -> ['a cat', 'a dog'] (2..MAX_CONCEPTS distinct names)."""
    names = [part.strip() for part in (text.split(",") if isinstance(text, str) else text or [])]
    names = list(dict.fromkeys(name for name in names if name))
    if not 2 <= len(names) <= MAX_CONCEPTS:
        raise ExplorerError(
            f"concepts {text!r} must name 2 to {MAX_CONCEPTS} distinct concepts, comma-separated, "
            "e.g. --concepts 'a red square, a green square'"
        )
    return names


class ClipConcepts:
    """p(concept | image) for images (B, C, H, W) in [-1, 1], the interface of the feature classifier."""

    def __init__(self, clip_dir: str | Path, concepts: str | list[str]):
        from transformers import CLIPModel, CLIPTokenizer

        from explorer.hub import local_or_cached

        clip_dir = local_or_cached(clip_dir, "CLIP model")
        self.class_names = parse_concepts(concepts)
        if not (clip_dir / "model.safetensors").is_file():
            raise ExplorerError(
                f"{str(clip_dir)!r} has no model.safetensors: pass a CLIP model folder as "
                "CLIPModel.save_pretrained writes it (safetensors only)"
            )
        try:
            self.model = (
                CLIPModel.from_pretrained(clip_dir, use_safetensors=True).eval().requires_grad_(False)
            )
            tokenizer = CLIPTokenizer.from_pretrained(clip_dir)
        except (OSError, ValueError, RuntimeError, TypeError) as error:
            raise ExplorerError(f"could not load the CLIP model in {str(clip_dir)!r}: {error}") from error
        mean, std = CLIP_MEAN, CLIP_STD
        preprocessor = clip_dir / "preprocessor_config.json"
        if preprocessor.is_file():
            fields = json.loads(preprocessor.read_text())
            mean, std = fields.get("image_mean", mean), fields.get("image_std", std)
        self.mean, self.std = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
        self.image_size = int(self.model.config.vision_config.image_size)
        tokens = tokenizer(self.class_names, padding=True, truncation=True, return_tensors="pt")
        with torch.no_grad():
            text = self._features(self.model.get_text_features(**tokens))
        self.text = F.normalize(text, dim=-1)  # (K, D)

    @staticmethod
    def _features(output) -> torch.Tensor:
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """(B, C, H, W) in [-1, 1] -> (B, concepts) zero-shot probabilities."""
        out = []
        for batch in images.split(batch_size):
            pixels = (batch.float() + 1) / 2
            if pixels.shape[1] == 1:
                pixels = pixels.expand(-1, 3, -1, -1)
            pixels = F.interpolate(pixels, size=(self.image_size, self.image_size), mode="bicubic")
            pixels = (pixels.clamp(0, 1) - self.mean) / self.std
            embedded = F.normalize(self._features(self.model.get_image_features(pixel_values=pixels)), dim=-1)
            out.append((self.model.logit_scale.exp() * embedded @ self.text.T).softmax(-1))
        return torch.cat(out)
