"""The processes of one featurize: a single process, or the ranks torchrun starts.

    torchrun --standalone --nproc-per-node 2 -m precompute featurize ...            # one machine
    torchrun --nnodes 4 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29400 \\
        -m precompute featurize ...                                                 # a cluster

torchrun sets RANK, WORLD_SIZE and LOCAL_WORLD_SIZE; with WORLD_SIZE > 1 the ranks join one process group
over gloo and sum their per-bucket statistics with all-reduce. The sums are of (k, k) float64 host arrays,
a few MB per bucket, so gloo is used on GPU machines too (nccl would only add a copy to the device).
Without torchrun every collective is the identity, so the same code runs in one process.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch

from explorer.errors import ExplorerError

logger = logging.getLogger(__name__)

# Ranks wait for each other at the ends of the featurize phase: a resumed run can leave one rank with
# most of the missing chunks, so the wait may last as long as featurizing a whole shard.
WAIT_HOURS = 24


@dataclass
class Collective:
    rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    _group: bool = False

    @classmethod
    def from_env(cls) -> Collective:
        """The process group torchrun describes in the environment, or a single process."""
        world = _env_int("WORLD_SIZE", 1)
        if world <= 1:
            return cls()
        rank, local = _env_int("RANK", 0), _env_int("LOCAL_WORLD_SIZE", world)
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo", timeout=datetime.timedelta(hours=WAIT_HOURS))
        # each rank gets its share of the machine's cores (torch would give every rank all of them)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
        logger.info("rank %d of %d", rank, world)
        return cls(rank, world, local, True)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mine(self, items: list[int] | np.ndarray) -> list[int]:
        """This rank's share of a list every rank holds in the same order: every world_size-th item."""
        return [int(item) for item in list(items)[self.rank :: self.world_size]]

    def sum(self, array: np.ndarray) -> np.ndarray:
        """The element-wise sum of `array` over the ranks (float64), the same result on every rank."""
        array = np.ascontiguousarray(array, dtype=np.float64)
        if not self._group:
            return array
        import torch.distributed as dist

        tensor = torch.from_numpy(array.copy())
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.numpy()

    def barrier(self) -> None:
        if self._group:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self._group:
            import torch.distributed as dist

            dist.destroy_process_group()
            self._group = False


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ExplorerError(
            f"environment variable {name}={value!r} is not an integer: launch with torchrun"
        ) from None
