"""EK-FAC influence-function indexes of the shipped model at several dampings, from one gradient pass.

    python -m bench.ekfac_damping --out runs/ekfac2048 --dampings 1e-4 1e-3 1e-2 1e-1

The damping acts inside the preconditioner, before the sketch, so a damping grid cannot be reindexed
from kept features as TRAK's lambda is. This computes every training row's loss gradient once (vmap), rotates
it into each layer's Kronecker eigenbasis once (explorer.ekfac.EkfacProjector.rotate), then scales and
sketches it once per damping; each damping's columns become a real index, OUT-d{damping}, exactly what
`python -m precompute featurize --method ekfac --damping D` writes (same factors, spec and seeds), which
`python app.py --index` serves and `precompute evaluate shipped-lds` scores. Chunks of finished rows are
kept in OUT/.partial, so a killed run resumes.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from explorer.atomic import save_npy_atomic
from explorer.data import load_dataset, to_model_range, train_heldout_split
from explorer.ekfac import FACTOR_FILES, EkfacFactors
from explorer.ekfac_fit import fit_ekfac
from explorer.features import FeatureSpec
from explorer.index_meta import DatasetInfo, FeatureSource
from explorer.index_methods import IndexMethod, ekfac_projector
from explorer.model import load_model
from precompute.featurize.chunks import ArrayChunks
from precompute.featurize.pipeline import FeaturizeOptions, build_index
from precompute.featurize.workers import Featurizer, default_workers

ROOT = Path(__file__).resolve().parents[1]

CHUNK = 64


class DampingGrid:
    """project(grads) -> [sketch(psi at damping d) for d in dampings] side by side (B, D k)."""

    def __init__(self, projector, relative_dampings: list[float]):
        """projector: an EkfacProjector built with relative damping relative_dampings[0]."""
        self.projector = projector
        mean_eigenvalue = projector.damping / relative_dampings[0]
        self.dampings = [relative * mean_eigenvalue for relative in relative_dampings]

    def project(self, grads: list[torch.Tensor]) -> torch.Tensor:
        rotated = self.projector.rotate(grads)  # once: the costly part
        sketch, scale = self.projector.sketch, self.projector.scale
        return torch.cat([sketch.project(scale(rotated, damping)) for damping in self.dampings], 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="assets/model")
    parser.add_argument("--data", default="mnist5k")
    parser.add_argument("--limit", type=int, default=None, help="only the first N training images (trials)")
    parser.add_argument("--out", default="runs/ekfac2048")
    parser.add_argument("--dampings", type=float, nargs="+", default=[1e-4, 1e-3, 1e-2, 1e-1])
    parser.add_argument("--proj-dim", type=int, default=2048)
    parser.add_argument("--fit-images", type=int, default=1000)
    parser.add_argument("--fit-samples-per-image", type=int, default=4)
    parser.add_argument("--fit-seed", type=int, default=0)
    args = parser.parse_args()
    out = ROOT / args.out
    partial = out / ".partial"
    partial.mkdir(parents=True, exist_ok=True)
    model = load_model(ROOT / args.model)
    dataset, _ = train_heldout_split(load_dataset(args.data))
    if args.limit is not None:
        dataset = dataset.subset(np.arange(args.limit), f"first{args.limit}")
    images = torch.from_numpy(to_model_range(dataset.images))
    spec = FeatureSpec(output="loss", proj_dim=args.proj_dim)
    plain = Featurizer(model, spec, CHUNK, 1).computer
    if all((partial / name).is_file() for name in FACTOR_FILES):
        factors = EkfacFactors.load(partial, model, plain.names)
    else:
        started = time.time()
        generator = torch.Generator().manual_seed(args.fit_seed)
        subset = images[torch.randperm(len(images), generator=generator)[: args.fit_images]]
        factors = fit_ekfac(model, subset, args.fit_samples_per_image, args.fit_seed, names=plain.names)
        factors.save(partial)
        print(f"fitted EK-FAC factors on {len(subset)} images in {time.time() - started:.0f} s", flush=True)
    projector = ekfac_projector(factors, plain, args.dampings[0])
    grid = DampingGrid(projector, args.dampings)
    wide = dataclasses.replace(spec, proj_dim=args.proj_dim * len(args.dampings))
    featurizer = Featurizer(model, wide, CHUNK, default_workers(), projector=grid)
    n, k = len(images), args.proj_dim
    started = time.time()
    for start in range(0, n, CHUNK):
        path = partial / f"chunk_{start // CHUNK:06d}.npy"
        if not path.is_file():
            save_npy_atomic(path, featurizer.all_bucket_features(images[start : start + CHUNK]).numpy())
            done = min(n, start + CHUNK)
            print(f"{done}/{n} rows, {time.time() - started:.0f} s", flush=True)
    features = np.concatenate([np.load(partial / f"chunk_{c:06d}.npy") for c in range(-(-n // CHUNK))])
    source = FeatureSource(
        model_hash=model.weights_hash,
        model_path=str(model.path),
        dataset=DatasetInfo(
            dataset.name, n, dataset.fingerprint(), tuple(dataset.class_names), dataset.resolution
        ),
        spec=spec,
        timesteps=tuple(map(tuple, plain.timesteps)),
        num_train_timesteps=model.num_train_timesteps,
        num_params=plain.num_params,
    )
    options = FeaturizeOptions(center=False, normalize=False, storage="int8")  # the served storage
    for d, relative in enumerate(args.dampings):
        directory = ROOT / f"{args.out}-d{relative:g}"
        if (directory / "meta.json").is_file():
            continue
        directory.mkdir(parents=True, exist_ok=True)
        for name in FACTOR_FILES:
            shutil.copyfile(partial / name, directory / name)
        columns = np.ascontiguousarray(features[:, :, d * k : (d + 1) * k].transpose(1, 0, 2))  # (B, N, k)
        method = IndexMethod(
            "ekfac", relative_damping=relative, fit_images=args.fit_images, fit_seed=args.fit_seed
        )
        build_index(directory, source, ArrayChunks(columns, None), dataset, options, method=method)
        shutil.rmtree(directory / ".partial", ignore_errors=True)
        print(f"index written to {directory}", flush=True)


if __name__ == "__main__":
    main()
