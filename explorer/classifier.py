"""The feature classifier: a small CNN that names the class of a (clean or nearly clean) image.

It turns "which digit is this?" into probabilities for the feature-likelihood curves
(Journey-TRAK section 3.1). Saved as safetensors + a JSON config, like the UNet.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from explorer.errors import ExplorerError

WEIGHTS_NAME = "classifier.safetensors"
CONFIG_NAME = "classifier.json"


@dataclass
class ClassifierConfig:
    sample_size: int = 16  # image side in pixels
    channels: int = 1  # grayscale
    num_classes: int = 10
    width: int = 32  # channels of the first conv; the second has twice as many
    class_names: tuple[str, ...] = tuple(str(c) for c in range(10))


class FeatureClassifier(nn.Module):
    """conv-relu-conv-relu-pool x2 -> linear; inputs (B, C, H, W) in [-1, 1], logits (B, classes)."""

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = config
        w = config.width
        self.features = nn.Sequential(
            nn.Conv2d(config.channels, w, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
        )
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(8 * w, 128), nn.ReLU())
        self.head = nn.Linear(128, config.num_classes)

    @property
    def class_names(self) -> list[str]:
        return list(self.config.class_names)

    def embedding(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, 128): the penultimate features (used as a similarity baseline)."""
        return self.embed(self.features(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # Dropout only while training: 4,500 images are few for this head.
        return self.head(nn.functional.dropout(self.embedding(images), p=0.3, training=self.training))

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """(B, C, H, W) -> (B, classes) softmax probabilities."""
        self.eval()
        return torch.cat([self(chunk).softmax(-1) for chunk in images.split(batch_size)])


def save_classifier(model: FeatureClassifier, out_dir: str | Path) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out_dir / WEIGHTS_NAME))
    (out_dir / CONFIG_NAME).write_text(json.dumps(asdict(model.config), indent=2))


def load_classifier(directory: str | Path) -> FeatureClassifier:
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not (config_path.is_file() and weights_path.is_file()):
        raise ExplorerError(
            f"no feature classifier in {str(directory)!r} (expected {CONFIG_NAME} and {WEIGHTS_NAME}): "
            "`python -m precompute train` writes one next to the model"
        )
    try:
        fields = json.loads(config_path.read_text())
        fields["class_names"] = tuple(fields["class_names"])
        model = FeatureClassifier(ClassifierConfig(**fields))
        model.load_state_dict(load_file(str(weights_path)))
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as error:
        raise ExplorerError(
            f"the feature classifier in {str(directory)!r} is unreadable ({error}): retrain it"
        ) from error
    return model.eval().requires_grad_(False)
