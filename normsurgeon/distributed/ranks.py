"""What ``finetune`` needs to know about the processes it runs in (torchrun, one process per device).

``Ranks.current()`` is None in a single process (or a group of one); otherwise rank, world size and
whether this rank is the one that logs and writes (rank 0). ``shard`` is DistributedSampler's rule on
one global batch: the global batch of B·W samples (the same on every rank, from the shared seed) is
split as rows r, r + W, r + 2W, … for rank r, so W ranks at batch B see exactly the samples of one
process at batch B·W. ``ddp`` wraps a model in DistributedDataParallel with ``broadcast_buffers=False`` (torch ≥ 2.14:
``forward_sync_buffers=False``)
(synchronized layers keep every rank's buffers identical, so the broadcast would only cost time).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Ranks:
    rank: int
    world: int

    @property
    def main(self) -> bool:
        return self.rank == 0

    @staticmethod
    def current() -> "Ranks | None":
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return None
        return Ranks(dist.get_rank(), dist.get_world_size())

    def shard(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's rows of one global batch (indices ``rows``)."""
        return rows[self.rank::self.world]

    def ddp(self, model: nn.Module) -> nn.Module:
        device = next(model.parameters()).device
        ids = [device.index] if device.type == "cuda" else None
        import inspect
        keyword = ("forward_sync_buffers" if "forward_sync_buffers" in
                   inspect.signature(nn.parallel.DistributedDataParallel).parameters else "broadcast_buffers")
        return nn.parallel.DistributedDataParallel(model, device_ids=ids, **{keyword: False})

    def barrier(self) -> None:
        dist.barrier()

    def sum_over_ranks(self, sums: dict[str, float], count: int, flag: bool) -> tuple[dict[str, float], int, bool]:
        """``sums`` and ``count`` added over every rank, ``flag`` true when true on some rank (one
        float64 all-reduce): metrics every rank computes alike."""
        values = torch.tensor(list(sums.values()) + [float(count), 1.0 if flag else 0.0], dtype=torch.float64)
        dist.all_reduce(values)
        total = values.tolist()
        return dict(zip(sums, total[:len(sums)])), int(total[-2]), total[-1] > 0

    def any(self, flag: bool) -> bool:
        """True on every rank when it is True on some rank (one all-reduce): decisions such as
        stopping on a time budget must be the same everywhere, or the others wait forever."""
        value = torch.tensor([1.0 if flag else 0.0])
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item() > 0)


def start_from_environment() -> Ranks | None:
    """Under torchrun (WORLD_SIZE > 1 in the environment) initialize the default process group once
    (gloo on CPU, nccl when CUDA is available) and return the ranks; else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return None
    if not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return Ranks.current()
