"""Data for training and evaluation: loaders, in-memory tensors, hold-out splits and a
white-box oracle's outputs computed once."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    RandomSampler,
    SequentialSampler,
    Subset,
    TensorDataset,
)

from cascade.contracts.stages import Oracle
from cascade.core.errors import CascadeError
from cascade.training.distributed import ShardedBatchSampler


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int,
                shard: tuple[int, int] | None = None, pin_memory: bool = False) -> DataLoader:
    """Batches of ``(x, y)``; in-memory tensor data is indexed a batch at a time.

    Training loaders (``shuffle``) drop a ragged last batch (a batch of 1 breaks batch
    norm); evaluation loaders keep it.

    Args:
        dataset: the data.
        batch_size: inputs per batch (with ``shard``, of all ranks together).
        shuffle: a new random order every epoch, drawn from a generator seeded with ``seed``.
        seed: see ``shuffle``.
        shard: ``(rank, world size)``: every rank draws the same batches and takes its
            share of each (:class:`cascade.training.distributed.ShardedBatchSampler`).
        pin_memory: page-locked batches, for asynchronous copies to a GPU.
    """
    generator = torch.Generator().manual_seed(seed)
    drop_last = shuffle and len(dataset) > batch_size
    in_memory = tensors_of(dataset) is not None
    if shard is None and not in_memory:
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, drop_last=drop_last,
                          pin_memory=pin_memory)
    base = RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
    batches: Any = BatchSampler(base, batch_size, drop_last=drop_last)
    if shard is not None:
        batches = ShardedBatchSampler(batches, *shard)
    if in_memory:
        return DataLoader(dataset, sampler=batches, batch_size=None, pin_memory=pin_memory)
    # the loader draws its workers' base seed from ``generator`` too, before the sampler: as without shard
    return DataLoader(dataset, batch_sampler=batches, generator=generator, pin_memory=pin_memory)



def holdout_split(dataset: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """``(rest, held out)``: a random ``fraction`` of ``dataset`` held out, fixed by ``seed``.

    Raises:
        CascadeError: the fraction leaves no data on one side.
    """
    n = len(dataset)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_hold = max(1, int(round(fraction * n)))
    if n_hold >= n:
        raise CascadeError(f"holdout_fraction {fraction:g} leaves no training data ({n} inputs)")
    return Subset(dataset, sorted(perm[n_hold:])), Subset(dataset, sorted(perm[:n_hold]))


def tensors_of(dataset: Dataset) -> tuple[torch.Tensor, ...] | None:
    """The tensors of an in-memory dataset (a TensorDataset or a Subset of one), else None."""
    if isinstance(dataset, TensorDataset):
        return dataset.tensors
    if isinstance(dataset, Subset) and isinstance(dataset.dataset, TensorDataset):
        idx = torch.as_tensor(dataset.indices)
        return tuple(t[idx] for t in dataset.dataset.tensors)
    return None


@torch.no_grad()
def with_oracle_outputs(dataset: Dataset, oracle: Oracle, batch_size: int, device: torch.device,
                        augments: bool = False) -> Dataset:
    """``(x, y, oracle output)``: a frozen white-box oracle's outputs, computed once.

    ``dataset`` itself for a black-box oracle (no outputs), for data not held in memory,
    or when the task ``augments`` its training batches (the oracle must see the augmented
    batch): the objective then asks the oracle at every step.
    """
    tensors = tensors_of(dataset)
    if tensors is None or augments or not hasattr(oracle, "output"):
        return dataset
    loader = make_loader(TensorDataset(*tensors[:2]), batch_size, False, 0)
    outs = [oracle.output(x.to(device)).cpu() for x, _ in loader]
    return TensorDataset(tensors[0], tensors[1], torch.cat(outs))

