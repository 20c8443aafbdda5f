"""One training phase set up as the experiment runs every phase, and freezing a trained stage."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from cascade.config.schema import OptimConfig
from cascade.contracts.task import Task
from cascade.training import distributed
from cascade.training.data import make_loader
from cascade.training.optim import build_optimizer
from cascade.training.trainer import Trainer


def build_trainer(model: nn.Module, objective: Any, data: Dataset, oc: OptimConfig, seed: int, name: str, *,
                  task: Task, device: torch.device, hooks: Sequence[Any] = (), params: Any = None,
                  amp_dtype: torch.dtype | None = None, channels_last: bool = False,
                  pin_memory: bool = False) -> Trainer:
    """The shared trainer of one training phase, set up as the pipeline runs every phase.

    ``oc``'s optimizer and schedule, stepped after every optimizer step; ``data``
    shuffled by ``seed`` and, under torchrun, sharded over the processes; the task's
    augmentation of its inputs (only when ``data`` holds the task's inputs: a head
    trained on features is not augmented); autocast and channels-last as given.

    Args:
        model: the network (on ``device``).
        objective: batch -> dict of losses.
        data: the training data.
        oc: the phase's settings.
        seed: the data order's seed (:func:`phase_seed`).
        name: the phase's name.
        task: whose ``augment`` applies.
        device: where batches go.
        hooks: the trainer's hooks.
        params: what to optimize (param groups allowed); default the model's parameters.
        amp_dtype, channels_last: see :class:`~cascade.training.trainer.Trainer`.
        pin_memory: page-locked batches (host data copied to a GPU).

    Returns:
        A :class:`~cascade.training.trainer.Trainer`, not yet run.
    """
    augments = task.augments and len(data) > 0 and tuple(data[0][0].shape) == tuple(task.input_shape)
    loader = make_loader(data, oc.batch_size, shuffle=True, seed=seed, shard=distributed.shard(),
                         pin_memory=pin_memory)
    opt, sched = build_optimizer(model.parameters() if params is None else params, oc, steps_per_epoch=len(loader))
    return Trainer(model, objective, opt, loader, oc.epochs, hooks, sched, device, name=name,
                   scheduler_interval="step", augment=task.augment if augments else None, amp_dtype=amp_dtype,
                   channels_last=channels_last)



def freeze(network: nn.Module) -> nn.Module:
    """``network`` in eval mode with no gradients (a stage others are measured against)."""
    return network.eval().requires_grad_(False)
