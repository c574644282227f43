"""Region attribution: the influencers of the output inside a box of the image, query-side only.

A region's output f_A (explorer.outputs.region_output) has its own common gradient direction. Centering
(explorer.scoring, step 1) must subtract the mean training feature *of that output*, c_A = mean_i phi_A(x_i),
not the whole image's c: subtracting c from a region query leaves c_A - c, one fixed vector that dominates
every region query at high t, so every digit got the same region list and it shared almost nothing with the
whole-image list (bench/region_overlap.py measured overlaps near 0 before this).

The projection P is linear, so c_A = P grad_theta (1/n sum_i f_A(x_i)): one backward through a batch of
training images per bucket, not n per-example gradients. With c_A the region scores are consistent with the
whole image's: the whole image's mean output is the area-weighted sum of its regions', so its centered
feature is the weighted sum of theirs and its scores are a weighted sum of the regions' scores.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from torch.func import functional_call, vmap

from explorer.data import to_model_range
from explorer.features import FeatureComputer
from explorer.noising import forward_noise

CENTER_SAMPLE = 256  # training images whose batch-mean gradient estimates c_A (seeded, fixed per index)


def sample_rows(count: int, sample: int = CENTER_SAMPLE, seed: int = 0) -> np.ndarray:
    """The training rows that estimate a region's centers: the same ones for every box of one index."""
    if count <= sample:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, sample, replace=False))


def mean_feature(computer: FeatureComputer, images: torch.Tensor, bucket: int) -> np.ndarray:
    """(k,) mean_i phi^bucket(x_i) over images (n, C, H, W), as the projection of the batch-mean gradient."""
    n = len(images)
    timesteps = computer.draw_timesteps[bucket].expand(n, -1)
    noise = computer.noise[bucket].expand(n, *computer.noise[bucket].shape)
    if computer.kronecker is not None:
        total, records = computer._capture(images, timesteps, noise, bf16=False)
        return (computer.kronecker.project(total, records, groups=1)[0] / n).double().numpy()

    params = {name: p.detach().requires_grad_(True) for name, p in computer.params.items()}
    draws = timesteps.shape[1]
    abar = computer.abar[timesteps].view(n, draws, 1, 1, 1)
    noisy = forward_noise(images.unsqueeze(1), noise, abar)  # x_t, DDPM eq. 4
    with torch.enable_grad():
        prediction = functional_call(
            computer.model.unet, {**computer._frozen, **params}, (noisy.flatten(0, 1), timesteps.flatten())
        ).sample.view(n, draws, *noise.shape[2:])
        batch_mean = vmap(computer.output_fn)(prediction, noise).mean()  # rows do not interact in the UNet
        gradients = torch.autograd.grad(batch_mean, [params[name] for name in computer.names])
    return computer.projector.project([g[None] for g in gradients])[0].double().numpy()


class RegionCenters:
    """c_A per (box, bucket) for one index, estimated once and cached (drawn once, scrubbed often)."""

    def __init__(self, train_images: np.ndarray):
        self.rows = sample_rows(len(train_images))
        self.images = torch.from_numpy(to_model_range(train_images[self.rows]))  # the sample, in [-1, 1]
        self._cache: dict[tuple, np.ndarray] = {}

    def center(self, computer: FeatureComputer, box: tuple, bucket: int) -> np.ndarray:
        key = (tuple(box), int(bucket))
        if key not in self._cache:
            self._cache[key] = mean_feature(computer, self.images, int(bucket))
        return self._cache[key]

    def scorers(self, scorers: list, computer: FeatureComputer, box: tuple, buckets) -> dict[int, object]:
        """The index's BucketScorers with the region's own centers, for the buckets a query needs."""
        return {
            int(b): scorers[int(b)]
            if scorers[int(b)].center is None
            else replace(scorers[int(b)], center=self.center(computer, box, int(b)))
            for b in np.unique(buckets)
        }
