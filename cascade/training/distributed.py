"""Several processes training one run: ``torchrun --nproc_per_node N -m cascade run CONFIG``.

Each process (rank) runs the whole pipeline with the same seeds; every training phase
wraps its network in :class:`~torch.nn.parallel.DistributedDataParallel`, and each rank
takes an equal, disjoint share of every batch (:class:`ShardedBatchSampler`), so one
optimizer step sees the same ``batch_size`` inputs as a single process would and the
gradients are their mean. Only rank 0 evaluates and writes files (the run folder, its
checkpoints, the network cache). Without torchrun's environment (``WORLD_SIZE`` unset or
1) nothing here does anything: a single process runs exactly as before.

What stays rank-local: batch-norm statistics (each rank normalizes its share of the
batch; DDP copies rank 0's running statistics to the others at every forward) and random
augmentation (every rank draws the same random numbers, for different inputs).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

#: how long a rank waits for the others at a collective call: rank 0 evaluates each seed
#: while the others wait for it at the next training phase
TIMEOUT = datetime.timedelta(hours=1)


def env_world_size() -> int:
    """The number of processes torchrun started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_distributed() -> bool:
    """Whether this process is one of several in an initialized process group."""
    return torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without torchrun)."""
    if is_distributed():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """The number of processes training together (1 without torchrun)."""
    return torch.distributed.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Whether this process writes files and evaluates (rank 0, or the only process)."""
    return rank() == 0


def local_device(device: torch.device) -> torch.device:
    """``device``; under torchrun on CUDA, this rank's GPU ``cuda:LOCAL_RANK``, made the
    current one (before anything touches CUDA, so that no rank puts a context on GPU 0)."""
    if device.type != "cuda" or env_world_size() <= 1:
        return device
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
    return device


@contextlib.contextmanager
def session(device: torch.device) -> Iterator[torch.device]:
    """Join torchrun's process group for the block, when torchrun started this process.

    The backend is ``nccl`` on CUDA (each rank on GPU ``LOCAL_RANK``), ``gloo`` on the CPU.
    Yields the device this rank trains on (``device`` itself without torchrun). A group
    that is already initialized (by the caller) is used as it is and left open.
    """
    if env_world_size() <= 1 or torch.distributed.is_initialized():
        yield device
        return
    device = local_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    try:
        yield device
    finally:
        torch.distributed.destroy_process_group()


def barrier() -> None:
    """Wait until every rank gets here (no-op in a single process)."""
    if is_distributed():
        torch.distributed.barrier()


def broadcast(value: Any) -> Any:
    """Rank 0's ``value`` (picklable), on every rank; ``value`` itself in a single process."""
    if not is_distributed():
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """The mean over ranks of ``values`` (a float tensor on this rank's device)."""
    if not is_distributed():
        return values
    values = values.clone()
    torch.distributed.all_reduce(values)
    return values / world_size()


def shard() -> tuple[int, int] | None:
    """``(rank, world size)`` when several processes train together, else None."""
    return (rank(), world_size()) if is_distributed() else None


class ShardedBatchSampler:
    """Rank ``rank``'s share of every batch of ``batches``, a sampler of index lists.

    Every rank draws the same batches (same sampler, same seed) and keeps a contiguous
    slice of each: the slices of one batch are disjoint and together are the batch, so a
    step of ``world`` ranks trains on exactly the batch a single process would. The
    wrapped sampler is ``sampler`` (where :func:`cascade.training.rng.loader_generators` finds
    its shuffling generator).
    """

    def __init__(self, batches: Any, rank: int, world: int):
        self.sampler = batches
        self.rank, self.world = rank, world

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.sampler:
            n = len(batch)
            yield batch[self.rank * n // self.world:(self.rank + 1) * n // self.world]

    def __len__(self) -> int:
        return len(self.sampler)


class _DistributedModel(nn.parallel.DistributedDataParallel):
    """DDP that also answers the wrapped network's own attributes (an objective may read
    ``model.oracle`` or ``model.stages``), so objectives need not know they are wrapped."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


def wrap(model: nn.Module, device: torch.device, find_unused_parameters: bool) -> nn.Module:
    """``model`` in DistributedDataParallel when several processes train together and it
    has trainable parameters; else ``model`` itself."""
    if not is_distributed() or not any(p.requires_grad for p in model.parameters()):
        return model
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return _DistributedModel(model, device_ids=ids, find_unused_parameters=find_unused_parameters)
