"""Featurization throughput and fidelity: ours (explorer.features) vs traker 0.3.2, both on CPU.

    pip install -r bench/requirements-bench.txt        # traker, bench-only (torch stays 2.13.0 CPU)
    python bench/featurize_vs_traker.py                # N=256, 24 queries, 3 runs, countsketch
    python bench/featurize_vs_traker.py --projector kronecker --runs 5

Both sides featurize the same N training images of the shipped model (assets/model, mnist5k
train split) with the same quantity: the gradient of D-TRAK's `square` output averaged over the
same 10 timesteps (t = 50, 150, ..., 950) with the same shared noise, projected to k = 2048.

1. traker: a diffusion model-output class (DiffusionSquareOutput below, a subclass of traker's
   AbstractModelOutput) built from our FeatureComputer's timesteps and noise bank, so the two sides
   cannot drift apart; its gradient is checked against ours before anything is timed.
   - "default": what TRAKer(device="cpu") does by itself: float16 store, a BasicProjector with
     traker's block size of 100 columns (the Gaussian blocks are regenerated on every call), the
     model as a trained nn.Module (parameters requiring grad). On this CPU (AVX2, no fp16 matmul)
     its float16 projection costs ~18 s per image, so it is timed on --default-n images in one
     featurize call, and its Spearman agreement is not measured (it would take ~1.5 h; its
     projection is the same dense Gaussian as "best", stored in float16).
   - "best": every CPU option traker offers set for speed: float32 (this CPU has no fast fp16
     matmul), the model frozen and in eval mode, one BasicProjector block of all k columns
     (generated once, outside the timed region: its setup time is printed separately), and
     --traker-batch images per featurize call.
2. ours: FeatureComputer(FeatureSpec(output="square", buckets=1, timesteps_per_bucket=10,
   proj_dim=2048, projector=--projector)).features(images, bucket 0).

Throughput is images/s of the featurize calls alone (median of --runs runs). Fidelity: for each
of --queries held-out images, the Spearman correlation between its projected scores against the
N training images (inner products, and cosines as the explorer's normalized index uses) and the
exact scores from the full, unprojected per-example gradients; mean over queries.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr
from torch.func import functional_call

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from explorer.data import load_dataset, to_model_range, train_heldout_split  # noqa: E402
from explorer.features import FeatureComputer, FeatureSpec  # noqa: E402
from explorer.model import load_model  # noqa: E402

try:
    from trak import TRAKer
    from trak.modelout_functions import AbstractModelOutput
    from trak.projectors import BasicProjector, ProjectionType
except ImportError:
    raise SystemExit("this bench needs traker: pip install -r bench/requirements-bench.txt") from None


class DiffusionSquareOutput(AbstractModelOutput):
    """traker model output for an eps-prediction DDPM: D-TRAK's square output averaged over timesteps.

    f(theta; x0) = mean_{j} mean eps_theta(x_{t_j}, t_j)^2,  x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps_j
    (DDPM eq. 4), with fixed timesteps t_j and noise eps_j shared by every example (D-TRAK).
    """

    def __init__(self, timesteps: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.timesteps = timesteps  # (m,)
        self.noise = noise  # (m, C, H, W)
        abar = alphas_cumprod.to(torch.float32)[timesteps].view(-1, 1, 1, 1)  # (m, 1, 1, 1)
        self.signal_scale, self.noise_scale = abar.sqrt(), (1 - abar).sqrt()

    def get_output(self, model, weights, buffers, image: torch.Tensor) -> torch.Tensor:
        """One example (traker vmaps over the batch): image (C, H, W) -> scalar."""
        noisy = self.signal_scale * image.unsqueeze(0) + self.noise_scale * self.noise  # (m, C, H, W)
        prediction = functional_call(model, (weights, buffers), (noisy, self.timesteps)).sample
        return prediction.pow(2).mean()

    def get_out_to_loss_grad(self, model, weights, buffers, batch) -> torch.Tensor:
        """D-TRAK uses no out-to-loss term (Q = I)."""
        return torch.ones(batch[0].shape[0], 1)


def traker_featurize(model, output: DiffusionSquareOutput, train: torch.Tensor, queries: torch.Tensor,
                     proj_dim: int, batch: int, half: bool, projector=None) -> tuple[float, np.ndarray, np.ndarray]:
    """One traker featurization: (seconds for the N training images, train features (N, k), query features (Q, k))."""
    with tempfile.TemporaryDirectory() as save_dir:
        traker = TRAKer(model=model, task=output, train_set_size=len(train) + len(queries), save_dir=save_dir,
                        device="cpu", proj_dim=proj_dim, projector=projector, use_half_precision=half,
                        logging_level=logging.ERROR)
        traker.load_checkpoint(model.state_dict(), model_id=0)
        started = time.perf_counter()
        for start in range(0, len(train), batch):
            traker.featurize(batch=(train[start : start + batch],), num_samples=len(train[start : start + batch]))
        seconds = time.perf_counter() - started
        for start in range(0, len(queries), batch):
            traker.featurize(batch=(queries[start : start + batch],), num_samples=len(queries[start : start + batch]))
        grads = np.asarray(traker.saver.current_store["grads"], dtype=np.float32)  # (N + Q, k)
    return seconds, grads[: len(train)], grads[len(train) :]


def ours_featurize(computer: FeatureComputer, train: torch.Tensor, queries: torch.Tensor) -> tuple[float, np.ndarray, np.ndarray]:
    started = time.perf_counter()
    phi = computer.features(train, torch.zeros(len(train), dtype=torch.long)).numpy()  # (N, k)
    seconds = time.perf_counter() - started
    return seconds, phi, computer.features(queries, torch.zeros(len(queries), dtype=torch.long)).numpy()


def exact_gradients(computer: FeatureComputer, images: torch.Tensor, chunk: int = 32) -> np.ndarray:
    """Full per-example gradients of the averaged output, (P, d) float32, in named_parameters order."""
    rows = []
    for start in range(0, len(images), chunk):
        x0 = images[start : start + chunk]
        bucket = torch.zeros(len(x0), dtype=torch.long)
        grads = computer._per_example_grad(computer.params, x0, computer.draw_timesteps[bucket], computer.noise[bucket])
        rows.append(torch.cat([grads[name].reshape(len(x0), -1) for name in computer.names], dim=1).numpy())
    return np.concatenate(rows)


def check_same_quantity(model, output: DiffusionSquareOutput, computer: FeatureComputer, images: torch.Tensor) -> float:
    """Max relative difference between traker's output gradient and ours on a few images (must be ~1e-6)."""
    weights = {name: p.detach() for name, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    ours = exact_gradients(computer, images)
    worst = 0.0
    for row, image in enumerate(images):
        grads = torch.func.grad(output.get_output, argnums=1)(model, weights, buffers, image)
        flat = torch.cat([grads[name].reshape(-1) for name in computer.names]).numpy()
        worst = max(worst, float(np.abs(flat - ours[row]).max() / np.abs(ours[row]).max()))
    return worst


def agreement(train: np.ndarray, queries: np.ndarray, exact_train: np.ndarray, exact_queries: np.ndarray) -> dict:
    """Mean (and min) over queries of Spearman(projected scores, exact scores) over the training images."""
    def cosine(a, b):
        return (a / np.linalg.norm(a, axis=1, keepdims=True)) @ (b / np.linalg.norm(b, axis=1, keepdims=True)).T

    out = {}
    for name, projected, exact in (("inner", queries @ train.T, exact_queries @ exact_train.T),
                                   ("cosine", cosine(queries, train), cosine(exact_queries, exact_train))):
        rho = [spearmanr(p, e).statistic for p, e in zip(projected.astype(np.float64), exact)]
        out[name] = {"mean": float(np.mean(rho)), "min": float(np.min(rho))}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "assets/model"))
    parser.add_argument("--n", type=int, default=256, help="training images featurized")
    parser.add_argument("--queries", type=int, default=24, help="held-out images scored against them (>= 20)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per method (the median is reported)")
    parser.add_argument("--proj-dim", type=int, default=2048)
    parser.add_argument("--projector", default="countsketch", help="our projector (countsketch, gaussian, kronecker, ...)")
    parser.add_argument("--chunk", type=int, default=64, help="our examples per vmap chunk")
    parser.add_argument("--traker-batch", type=int, default=128, help="images per featurize call in traker 'best'")
    parser.add_argument("--default-n", type=int, default=16, help="images timed with traker default (~18 s each)")
    parser.add_argument("--skip-default", action="store_true", help="leave out traker default (its slowest mode)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = load_model(args.model)
    train_set, heldout = train_heldout_split(load_dataset("mnist5k", model.sample_size))
    train = torch.from_numpy(to_model_range(train_set.images[: args.n]))  # (N, 1, 16, 16)
    queries = torch.from_numpy(to_model_range(heldout.images[: args.queries]))  # (Q, 1, 16, 16)
    spec = FeatureSpec(output="square", buckets=1, timesteps_per_bucket=10, proj_dim=args.proj_dim, projector=args.projector)
    started = time.perf_counter()
    computer = FeatureComputer(model, spec, chunk_size=args.chunk)
    our_setup = time.perf_counter() - started
    # traker's output is built from our FeatureComputer's timesteps and noise bank (bucket 0 of 1).
    output = DiffusionSquareOutput(computer.draw_timesteps[0], computer.noise[0], model.scheduler.alphas_cumprod)
    unet = model.unet
    print(f"timesteps {computer.draw_timesteps[0].tolist()}, noise bank {tuple(computer.noise[0].shape)}; "
          f"{computer.num_params:,} parameters; torch threads {torch.get_num_threads()}", flush=True)
    mismatch = check_same_quantity(unet, output, computer, train[:3])
    print(f"traker output gradient vs ours, max relative difference: {mismatch:.2e}", flush=True)
    if mismatch > 1e-4:
        raise SystemExit("the traker model output does not compute the same gradient as ours: fix it before timing")

    exact = exact_gradients(computer, torch.cat([train, queries]))  # (N + Q, d)
    exact_train, exact_queries = exact[: args.n], exact[args.n :]
    del exact

    rows = []

    def measure(name: str, settings: str, setup_s: float, run, n: int = args.n) -> None:
        times, features = [], None
        for index in range(args.runs):
            seconds, phi_train, phi_queries = run()
            times.append(seconds)
            features = (phi_train, phi_queries)
            print(f"  {name} run {index + 1}: {n / seconds:.3f} images/s", flush=True)
        rows.append({"method": name, "settings": settings, "setup_s": round(setup_s, 2), "n": n,
                     "images_per_s": [round(n / t, 4) for t in times],
                     "median_images_per_s": n / statistics.median(times),
                     "spearman": agreement(*features, exact_train, exact_queries) if len(features[1]) else None})

    if not args.skip_default:
        trainable = load_model(args.model).unet.requires_grad_(True)  # as a trained nn.Module comes out of training
        measure("traker default", f"fp16, BasicProjector 100-col blocks regenerated per call, {args.default_n} images in one "
                "call, params require grad", 0.0,
                lambda: traker_featurize(trainable, output, train[: args.default_n], queries[:0], args.proj_dim, args.default_n,
                                         half=True), n=args.default_n)
        del trainable
    started = time.perf_counter()
    projector = BasicProjector(grad_dim=computer.num_params, proj_dim=args.proj_dim, seed=0, proj_type=ProjectionType.normal,
                               device="cpu", block_size=args.proj_dim, dtype=torch.float32)
    traker_setup = time.perf_counter() - started
    unet.eval().requires_grad_(False)
    measure("traker best", f"fp32, one {args.proj_dim}-col BasicProjector block built once, batch {args.traker_batch}, "
            "model frozen + eval", traker_setup,
            lambda: traker_featurize(unet, output, train, queries, args.proj_dim, args.traker_batch, half=False, projector=projector))
    del projector
    measure(f"ours ({args.projector})", f"FeatureComputer, vmap chunk {args.chunk}", our_setup,
            lambda: ours_featurize(computer, train, queries))

    print(f"\nN = {args.n} mnist5k training images, {args.queries} held-out queries, square output averaged over 10 "
          f"timesteps, k = {args.proj_dim}, {args.runs} runs, torch threads {torch.get_num_threads()}\n")
    print("| method | settings | images timed | setup s | images/s (median) | Spearman vs exact, inner product (mean / min) "
          "| cosine (mean / min) |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        s = row["spearman"]
        agree = (f"{s['inner']['mean']:.4f} / {s['inner']['min']:.4f} | {s['cosine']['mean']:.4f} / {s['cosine']['min']:.4f}"
                 if s else "not measured | not measured")
        print(f"| {row['method']} | {row['settings']} | {row['n']} | {row['setup_s']:.1f} | {row['median_images_per_s']:.3f} | {agree} |")
    ours = rows[-1]["median_images_per_s"]
    ratios = {row["method"]: ours / row["median_images_per_s"] for row in rows[:-1]}
    print("\n" + ", ".join(f"ours / {name}: {ratio:.1f}x" for name, ratio in ratios.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows, "ratios": ratios,
                                               "gradient_mismatch": mismatch}, indent=2))


if __name__ == "__main__":
    main()
