"""The query side: attribute every step of a trajectory, or a real image, against an index.

At generate time the query features of all steps are computed in one batched pass (the x0hat of
step s featurized at the bucket of its timestep, with the shared noise bank), whitened, and
scored against every training row; scrubbing the steps afterwards is a lookup.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
import torch

from explorer.classifier import FeatureClassifier, load_classifier
from explorer.concepts import ClipConcepts
from explorer.data import image_to_array, to_model_range
from explorer.errors import ExplorerError, whole_number
from explorer.features import FeatureComputer, bucket_of_timestep
from explorer.index import AttributionIndex, SearchResult
from explorer.index_methods import CHECKPOINT_METHODS, query_computer
from explorer.likelihood import RolloutCurves, evenly_spaced_steps, proxy_curves, rollout_curves
from explorer.model import DiffusionModel, load_model
from explorer.region import RegionCenters
from explorer.sampler import Trajectory, generate, prompt_context

logger = logging.getLogger(__name__)

MAX_TOP_K = 100


@dataclass
class StepAttribution:
    """Influencers of one query at one step."""

    timestep: int
    bucket: int
    positive: SearchResult
    negative: SearchResult
    scores: np.ndarray  # (N,) every training row's score, for percentiles and curves

    @property
    def negative_count(self) -> int:
        """Training rows whose score is below 0: the only ones that are negative influencers at all."""
        return int((self.scores < 0).sum())

    def negatives_note(self) -> str:
        """Says how many of the listed negatives really have a negative score (the rest are only least
        aligned)."""
        listed = len(self.negative.scores)
        below = int((self.negative.scores < 0).sum())
        if below == listed:
            return f"all {listed} listed negatives have negative scores"
        return (
            f"only {self.negative_count} training images have a negative score: the last "
            f"{listed - below} of the "
            f"{listed} listed are the least aligned, not negative influencers"
        )

    def percentile(self, position: int) -> float:
        """Share of training rows (in %) whose score is <= this row's score."""
        return float((self.scores <= self.scores[position]).mean() * 100.0)


@dataclass
class TrajectoryAttribution:
    trajectory: Trajectory
    index_name: str
    steps: list[StepAttribution]
    proxy: np.ndarray  # (S, classes) classifier probabilities of x0hat
    timings: dict[str, float] = field(default_factory=dict)

    def score_curve(self, position: int) -> np.ndarray:
        """(S,) the score of one training row at every step: when did this image matter?"""
        return np.array([step.scores[position] for step in self.steps])


NO_CLASSIFIER = (
    "no feature classifier next to the model, so no likelihood curves: train one on class-labelled data "
    "with `python -m precompute train --classifier-only --data DIR --size SIZE --out MODEL` or pass "
    "--classifier DIR"
)


def check_top_k(top_k: int) -> int:
    return whole_number(top_k, "top-k", 1, MAX_TOP_K)


class Explorer:
    """A model, its feature classifier (None: no likelihood curves) and one or more attribution indexes."""

    def __init__(
        self,
        model: DiffusionModel,
        indexes: dict[str, AttributionIndex],
        classifier: FeatureClassifier | None,
    ):
        if not indexes:
            raise ExplorerError("no attribution index given: pass --index DIR")
        self.model, self.indexes, self.classifier = model, indexes, classifier
        self._computers: dict[str, FeatureComputer] = {}
        self._region_centers: dict[str, RegionCenters] = {}
        faiss.omp_set_num_threads(1)  # single queries: threads only add overhead (and a 2nd OpenMP pool)

    @classmethod
    def from_dirs(
        cls,
        model_dir: str | Path,
        index_dirs: list[str | Path],
        classifier_dir: str | Path | None = None,
        clip_dir: str | Path | None = None,
        concepts: str | list[str] | None = None,
        device: str | torch.device = "cpu",
        lora: str | None = None,
        lora_scale: float = 1.0,
    ) -> Explorer:
        """clip_dir + concepts: zero-shot concept curves (explorer.concepts) instead of the classifier; lora,
        lora_scale: the model's LoRA adapter (explorer.lora; None: the pipeline's own). model_dir and clip_dir
        may be Hub ids in the local cache (explorer.hub)."""
        if (clip_dir is None) != (concepts is None):
            raise ExplorerError(
                "--clip and --concepts go together: a CLIP model folder and the concepts to score"
            )
        model = load_model(model_dir, device, lora, lora_scale)
        indexes = {}
        for directory in index_dirs:
            index = AttributionIndex.load(directory, model=model)
            name = f"{Path(directory).name} ({index.label})"
            if name in indexes:  # two folders with the same name and method: tell them apart by path
                name = f"{directory} ({index.label})"
            if name in indexes:
                raise ExplorerError(f"index {str(directory)!r} is given twice: pass each --index once")
            indexes[name] = index
        if clip_dir is not None:
            return cls(model, indexes, ClipConcepts(clip_dir, concepts))
        default = Path(model_dir) / "classifier"
        if classifier_dir is None and not default.exists():
            logger.warning("%s", NO_CLASSIFIER)
            return cls(model, indexes, None)
        classifier = load_classifier(classifier_dir if classifier_dir is not None else default)
        return cls(model, indexes, classifier)

    @property
    def class_names(self) -> list[str]:
        return [] if self.classifier is None else list(self.classifier.class_names)

    def index(self, name: str | None = None) -> tuple[str, AttributionIndex]:
        if name is None:
            name = next(iter(self.indexes))
        if name not in self.indexes:
            raise ExplorerError(f"unknown index {name!r}: choose one of {', '.join(self.indexes)}")
        return name, self.indexes[name]

    def computer(self, name: str) -> FeatureComputer:
        """The query featurizer of an index's method (explorer.index_methods), built once."""
        if name not in self._computers:
            index = self.indexes[name]
            self._computers[name] = query_computer(
                index.meta.method, index.meta.spec, index.directory, self.model
            )
        return self._computers[name]

    def region_box(self, box) -> tuple[int, int, int, int]:
        """A box (x0, y0, x1, y1) in model pixels, x1 and y1 exclusive, checked, or an ExplorerError naming
        the box and the valid range."""
        size = self.model.sample_size
        try:
            x0, y0, x1, y1 = (int(v) for v in box)
        except (TypeError, ValueError):
            raise ExplorerError(f"region {box!r} must be four whole numbers x0, y0, x1, y1") from None
        if not (0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size):
            raise ExplorerError(
                f"region {(x0, y0, x1, y1)} must satisfy 0 <= x0 < x1 <= {size} and 0 <= y0 < y1 <= {size} "
                f"(model pixels, x1 and y1 exclusive)"
            )
        return x0, y0, x1, y1

    def region_mask(self, box) -> torch.Tensor:
        """A box (see region_box) -> mask (H, W) of 0/1."""
        x0, y0, x1, y1 = self.region_box(box)
        size = self.model.sample_size
        mask = torch.zeros(size, size)
        mask[y0:y1, x0:x1] = 1
        return mask

    def _attribute(
        self, name: str, images: torch.Tensor, timesteps: np.ndarray, top_k: int, region=None, context=None
    ) -> list[StepAttribution]:
        """images (P, C, H, W) in the UNet's space queried at train timesteps (P,); region: a box (see
        region_mask) whose output alone is attributed; context (1, L, D): a text model's prompt embeddings."""
        top_k = check_top_k(top_k)
        if region is not None and self.model.latent is not None:
            raise ExplorerError("region attribution works on pixel models: this one runs on VAE latents")
        _, index = self.index(name)
        T = index.meta.num_train_timesteps
        buckets = np.array([bucket_of_timestep(int(t), index.buckets, T) for t in timesteps])
        computer, scorers = self.computer(name), None
        size = self.model.sample_size
        box = None if region is None else self.region_box(region)
        # the whole image needs no region: the index's own centers are exact
        if box is not None and box != (0, 0, size, size):
            if index.meta.method.name in CHECKPOINT_METHODS:
                raise ExplorerError(
                    f"region attribution needs one model; {index.meta.method.name} queries every checkpoint: "
                    "choose a trak, das or ekfac index for a region"
                )
            computer = computer.for_region(self.region_mask(box))
            if name not in self._region_centers:
                self._region_centers[name] = RegionCenters(index.train_images)
            scorers = self._region_centers[name].scorers(index.scorers, computer, box, buckets)
        context = None if context is None else context.expand(len(images), -1, -1)
        phi = computer.features(images, torch.from_numpy(buckets), context).numpy()  # (P, k)
        queries = index.query_vectors(phi, buckets, scorers)
        results = []
        for query, bucket, timestep in zip(queries, buckets, timesteps):
            positive, negative = index.search(query, int(bucket), top_k)
            results.append(
                StepAttribution(
                    int(timestep), int(bucket), positive, negative, index.scores(query, int(bucket))
                )
            )
        return results

    def generate(
        self,
        seed: int,
        steps: int = 50,
        index_name: str | None = None,
        top_k: int = 8,
        on_stage=None,
        prompt: str | None = None,
        guidance: float = 1.0,
    ) -> TrajectoryAttribution:
        """Sample (a text model: for the prompt, with classifier-free guidance), then attribute every step
        with the prompt's conditional output and compute the x0hat likelihood proxy; on_stage(fraction done,
        what runs next) before each stage, for progress."""
        stage = on_stage or (lambda done, what: None)
        name, _ = self.index(index_name)
        timings = {}
        stage(0.0, f"sampling {steps} steps")
        started = time.perf_counter()
        trajectory = generate(self.model, seed, steps, prompt, guidance)
        timings["sample_s"] = time.perf_counter() - started
        stage(0.3, f"attributing all {trajectory.steps} steps")
        started = time.perf_counter()
        steps_attr = self._attribute(
            name, trajectory.x0hat, trajectory.timesteps, top_k, context=trajectory.context
        )
        timings["attribute_s"] = time.perf_counter() - started
        stage(0.9, "classifying every x0hat")
        started = time.perf_counter()
        proxy = (
            np.zeros((trajectory.steps, 0), np.float32)
            if self.classifier is None
            else proxy_curves(self.classifier, trajectory)
        )
        timings["proxy_s"] = time.perf_counter() - started
        return TrajectoryAttribution(trajectory, name, steps_attr, proxy, timings)

    def reattribute(
        self, attribution: TrajectoryAttribution, index_name: str, top_k: int, region=None
    ) -> TrajectoryAttribution:
        """The same trajectory against another index or top-k (no resampling), or for a region of the image
        (a box x0, y0, x1, y1 in model pixels: the influencers of the output inside it, at every step)."""
        name, _ = self.index(index_name)
        started = time.perf_counter()
        trajectory = attribution.trajectory
        steps_attr = self._attribute(
            name, trajectory.x0hat, trajectory.timesteps, top_k, region, trajectory.context
        )
        timings = dict(attribution.timings, attribute_s=time.perf_counter() - started)
        return TrajectoryAttribution(attribution.trajectory, name, steps_attr, attribution.proxy, timings)

    def attribute_steps(
        self, attribution: TrajectoryAttribution, steps: list[int], top_k: int, region=None
    ) -> list[StepAttribution]:
        """Only some steps of a trajectory, under its index (e.g. a region's step on screen before the others:
        a region needs one center per bucket, explorer.region); reattribute does every step."""
        trajectory, chosen = attribution.trajectory, np.asarray(steps, dtype=int)
        images, timesteps = trajectory.x0hat[chosen], trajectory.timesteps[chosen]
        return self._attribute(attribution.index_name, images, timesteps, top_k, region, trajectory.context)

    def rollouts(
        self, trajectory: Trajectory, count: int = 12, completions: int = 16, seed: int = 0, on_step=None
    ) -> RolloutCurves:
        if self.classifier is None:
            raise ExplorerError(NO_CLASSIFIER)
        return rollout_curves(
            self.model,
            self.classifier,
            trajectory,
            evenly_spaced_steps(trajectory.steps, count),
            completions,
            seed,
            on_step,
        )

    def attribute_image(
        self,
        image: np.ndarray,
        timestep: int,
        index_name: str | None = None,
        top_k: int = 8,
        region=None,
        prompt: str | None = None,
    ) -> StepAttribution:
        """A real image (uint8 (H, W), (H, W, 3) for RGB models, or a PIL image of any size) as the query at
        one train timestep (region: a box, see region_mask, whose output alone is attributed; prompt: a text
        model's caption for it, encoded through the VAE first)."""
        name, index = self.index(index_name)
        timestep = whole_number(timestep, "timestep", 0, index.meta.num_train_timesteps - 1)
        context = prompt_context(self.model, prompt)
        size, channels = self.model.image_size, self.model.image_channels
        if not isinstance(image, np.ndarray):
            image = image_to_array(image, size, channels)
        expected = (size, size) if channels == 1 else (size, size, channels)
        if image.shape != expected:
            kind = "grayscale" if channels == 1 else "RGB"
            raise ExplorerError(
                f"query image of shape {image.shape} must be {expected} {kind}: resize it first"
            )
        tensor = torch.from_numpy(to_model_range(image[None]))
        if self.model.latent is not None:
            tensor = self.model.latent.encode(tensor)
        return self._attribute(name, tensor, np.array([int(timestep)]), top_k, region, context)[0]
