"""Where the model runs: --device auto|cpu|cuda|mps for featurize and the app.

auto takes a CUDA GPU when torch sees one, else Apple's MPS, else the CPU. The pinned torch of
requirements.txt is the CPU build: for a GPU, install a CUDA build of the same version first
(pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128)."""

from __future__ import annotations

from explorer.errors import ExplorerError

DEVICES = ("auto", "cpu", "cuda", "mps")


def _mps_available() -> bool:
    import torch

    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(name: str):
    """A --device value -> the torch device, or an ExplorerError that names it and what this machine has."""
    import torch  # here, not at import: the command lines list DEVICES before loading torch

    if name not in DEVICES:
        raise ExplorerError(f"--device {name!r} is unknown: use one of {', '.join(DEVICES)}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if _mps_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ExplorerError(
            f"--device cuda: torch {torch.__version__} sees no CUDA GPU (a CPU build, or no driver): use "
            "--device cpu, or install a CUDA build of torch on a machine with a GPU"
        )
    if name == "mps" and not _mps_available():
        raise ExplorerError("--device mps: this machine has no Apple MPS backend: use --device cpu")
    return torch.device(name)


def cuda_chunk_size(probe, limit: int = 256, share: float = 0.6) -> int:
    """Pairs per forward on a CUDA GPU, chosen from free memory: probe() featurizes one pair; its peak memory
    above the resident model sets how many fit in `share` of what is free (at least 1, at most limit)."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    resident = torch.cuda.memory_allocated()
    probe()
    per_pair = max(torch.cuda.max_memory_allocated() - resident, 1)
    free, _ = torch.cuda.mem_get_info()
    return int(max(1, min(limit, share * free // per_pair)))
