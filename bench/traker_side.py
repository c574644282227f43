"""bench/featurize_vs_traker.py's two sides and its arguments: traker's model output for our DDPM (the same
quantity as our features), each side's featurize call, the check that they compute the same gradients."""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.func import functional_call

from bench.fidelity import exact_gradients
from precompute.featurize.workers import Featurizer, default_workers

try:
    from trak import TRAKer
    from trak.modelout_functions import AbstractModelOutput
except ImportError:
    raise SystemExit("this bench needs traker: pip install -r bench/requirements-bench.txt") from None

ROOT = Path(__file__).resolve().parents[1]


class DiffusionSquareOutput(AbstractModelOutput):
    """traker model output for an eps-prediction DDPM: D-TRAK's square output averaged over timesteps.

    f(theta; x0) = mean_{j} mean eps_theta(x_{t_j}, t_j)^2,  x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps_j
    (DDPM eq. 4), with fixed timesteps t_j and noise eps_j shared by every example (D-TRAK).
    """

    def __init__(
        self, timesteps: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor, bf16: bool = False
    ):
        super().__init__()
        self.bf16 = bf16  # run the model under bfloat16 autocast (not a traker setting: --traker-bf16)
        self.timesteps = timesteps  # (m,)
        self.noise = noise  # (m, C, H, W)
        abar = alphas_cumprod.to(torch.float32)[timesteps].view(-1, 1, 1, 1)  # (m, 1, 1, 1)
        self.signal_scale, self.noise_scale = abar.sqrt(), (1 - abar).sqrt()

    def get_output(self, model, weights, buffers, image: torch.Tensor) -> torch.Tensor:
        """One example (traker vmaps over the batch): image (C, H, W) -> scalar."""
        noisy = self.signal_scale * image.unsqueeze(0) + self.noise_scale * self.noise  # (m, C, H, W)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            prediction = functional_call(model, (weights, buffers), (noisy, self.timesteps)).sample
        return prediction.float().pow(2).mean()

    def get_out_to_loss_grad(self, model, weights, buffers, batch) -> torch.Tensor:
        """D-TRAK uses no out-to-loss term (Q = I)."""
        return torch.ones(batch[0].shape[0], 1)


def traker_featurize(
    model,
    output: DiffusionSquareOutput,
    train: torch.Tensor,
    queries: torch.Tensor,
    proj_dim: int,
    batch: int,
    half: bool,
    projector=None,
) -> tuple[float, np.ndarray, np.ndarray]:
    """One traker featurization: (seconds for the N training images, train features (N, k), query features
    (Q, k))."""
    with tempfile.TemporaryDirectory() as save_dir:
        traker = TRAKer(
            model=model,
            task=output,
            train_set_size=len(train) + len(queries),
            save_dir=save_dir,
            device="cpu",
            proj_dim=proj_dim,
            projector=projector,
            use_half_precision=half,
            logging_level=logging.ERROR,
        )
        traker.load_checkpoint(model.state_dict(), model_id=0)
        started = time.perf_counter()
        for start in range(0, len(train), batch):
            traker.featurize(
                batch=(train[start : start + batch],), num_samples=len(train[start : start + batch])
            )
        seconds = time.perf_counter() - started
        for start in range(0, len(queries), batch):
            traker.featurize(
                batch=(queries[start : start + batch],), num_samples=len(queries[start : start + batch])
            )
        grads = np.asarray(traker.saver.current_store["grads"], dtype=np.float32)  # (N + Q, k)
    return seconds, grads[: len(train)], grads[len(train) :]


def ours_featurize(
    computer: Featurizer, train: torch.Tensor, queries: torch.Tensor
) -> tuple[float, np.ndarray, np.ndarray]:
    started = time.perf_counter()
    phi = computer.features(train, torch.zeros(len(train), dtype=torch.long)).numpy()  # (N, k)
    seconds = time.perf_counter() - started
    return seconds, phi, computer.features(queries, torch.zeros(len(queries), dtype=torch.long)).numpy()


def check_same_quantity(
    model, output: DiffusionSquareOutput, computer: Featurizer, images: torch.Tensor
) -> float:
    """Max relative difference between traker's output gradient and ours on a few images (must be ~1e-6)."""
    weights = {name: p.detach() for name, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    ours = exact_gradients(computer.computer, images)
    worst = 0.0
    for row, image in enumerate(images):
        grads = torch.func.grad(output.get_output, argnums=1)(model, weights, buffers, image)
        flat = torch.cat([grads[name].reshape(-1) for name in computer.computer.names]).numpy()
        worst = max(worst, float(np.abs(flat - ours[row]).max() / np.abs(ours[row]).max()))
    return worst


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=str(ROOT / "assets/model"))
    parser.add_argument("--n", type=int, default=256, help="training images featurized")
    parser.add_argument("--queries", type=int, default=24, help="held-out images scored against them (>= 20)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per method (the median is reported)")
    parser.add_argument("--proj-dim", type=int, default=2048)
    parser.add_argument(
        "--projector", default="countsketch", help="our projector (countsketch, gaussian, kronecker, ...)"
    )
    parser.add_argument(
        "--precision",
        default="fp32",
        help="ours: fp32, bf16, or mixed (bf16 for the timesteps that "
        "--calibrate measures safe; kronecker only; FeatureSpec.precision)",
    )
    parser.add_argument(
        "--traker-bf16",
        action="store_true",
        help="also time traker best with its model under bfloat16 "
        "autocast (not one of traker's settings: the same arithmetic as ours with --precision bf16)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=default_workers(),
        help="our worker threads (precompute.featurize.workers "
        "workers; default: precompute featurize's, 2 on 2 or more cores)",
    )
    parser.add_argument(
        "--workers-baseline",
        type=int,
        default=0,
        help="also time ours on this many worker threads "
        "(e.g. 1), in the same repeats, for the speed-up of --workers alone (0: off)",
    )
    parser.add_argument(
        "--chunk",
        type=int,
        default=64,
        help="our examples per vmap chunk (the kronecker path "
        "caps a forward at explorer.features.KRONECKER_ROWS rows)",
    )
    parser.add_argument(
        "--traker-batch",
        type=int,
        default=32,
        help="images per featurize call in traker 'best' (its "
        "fastest here: 24-32 images run at 14.8 images/s, 16 at 13.2, 48 at 11.4, 64 at 9.5, 128 at 4.9)",
    )
    parser.add_argument(
        "--default-n", type=int, default=16, help="images timed with traker default (~18 s each)"
    )
    parser.add_argument(
        "--skip-default", action="store_true", help="leave out traker default (its slowest mode)"
    )
    parser.add_argument(
        "--calibrate",
        type=int,
        default=0,
        help="calibrate our spec on this many of the N training "
        "images (precompute.featurize.calibration; 0: off); its time counts in our setup",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="projection seeds the agreement is averaged over (traker "
        "best and ours; the timed runs use seed 0)",
    )
    parser.add_argument(
        "--first-seed",
        type=int,
        default=0,
        help="the agreement's seeds are --first-seed .. --first-seed "
        "+ --seeds - 1 (e.g. 5 for seeds 5-9, a second sample of them)",
    )
    parser.add_argument("--train-batch", type=int, default=64, help="samples per timed AdamW training step")
    parser.add_argument("--train-steps", type=int, default=10, help="AdamW training steps timed per repeat")
    parser.add_argument("--json", default=None, help="also write the results here, under cases[--case]")
    parser.add_argument("--case", default="main", help="the run's name in --json (main: the timed run)")
    return parser.parse_args()


def print_table(args: argparse.Namespace, seeds: range, rows: list[dict], ratios: dict) -> None:
    """The methods' speed and agreement, as a markdown table, and ours' speed-up over each."""
    print(
        f"\nN = {args.n} mnist5k training images, {args.queries} held-out queries, square output "
        "averaged over 10 "
        f"timesteps, k = {args.proj_dim}, {args.runs} runs, torch threads {torch.get_num_threads()}\n"
    )
    print(
        "Spearman vs exact: mean over queries, averaged over projection seed(s) "
        f"{seeds.start}..{seeds.stop - 1} "
        "(each seed's mean in brackets) / the worst query of any seed\n"
    )
    print(
        "| method | settings | images timed | setup s | images/s (median) | Spearman, inner product | "
        "Spearman, cosine |"
    )
    print("|---|---|---|---|---|---|---|")

    def cell(agreement_of: dict) -> str:
        seeds = ", ".join(f"{value:.4f}" for value in agreement_of["per_seed"])
        return f"{agreement_of['mean']:.4f} [{seeds}] / {agreement_of['min']:.4f}"

    for row in rows:
        s = row["spearman"]
        agree = f"{cell(s['inner'])} | {cell(s['cosine'])}" if s else "not measured | not measured"
        print(
            f"| {row['method']} | {row['settings']} | {row['n']} | {row['setup_s']:.1f} | "
            f"{row['median_images_per_s']:.3f} | {agree} |"
        )
    print(
        "\n"
        + ", ".join(f"ours / {name}: {ratio:.1f}x" for name, ratio in ratios.items())
        + " (median over repeats of the within-repeat ratio)"
    )


def print_cost(args: argparse.Namespace, cost: dict) -> None:
    print(
        f"ours: {cost['ms_per_example_timestep']:.3f} ms per (example, timestep); AdamW training step, batch "
        f"{args.train_batch}: {cost['train_step_ms_per_sample']:.3f} ms per sample; ours / training step "
        f"{cost['relative_to_train_step']:.2f}x ({', '.join(f'{r:.2f}' for r in cost['ratios'])}; "
        "median of the "
        "within-repeat ratios)"
    )
