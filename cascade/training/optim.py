"""The optimizer and learning-rate schedule of a training phase's settings."""

from __future__ import annotations

import torch

from cascade.config.schema import OptimConfig


def build_optimizer(params, oc: OptimConfig, steps_per_epoch: int = 1) -> tuple[
        torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """SGD or Adam over ``params`` (tensors, or param-group dicts that may set their own
    lr), and the learning-rate schedule of ``oc`` (see :class:`~cascade.config.OptimConfig`).

    The scheduler counts in steps of ``1 / steps_per_epoch`` epochs: give the loader's
    length and step it after every optimizer step (``Trainer(scheduler_interval="step")``),
    or leave the default 1 and step it once per epoch. Every learning rate of a schedule
    is a multiple of the group's own ``lr`` (``one_cycle``: its ``max_lr``).
    """
    params = list(params)
    if params and not isinstance(params[0], dict):
        params = [p for p in params if p.requires_grad]
    if oc.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=oc.lr, momentum=oc.momentum, weight_decay=oc.weight_decay,
                              nesterov=oc.nesterov)
    else:
        opt = torch.optim.Adam(params, lr=oc.lr, weight_decay=oc.weight_decay)
    sched = torch.optim.lr_scheduler
    total = max(1, oc.epochs * steps_per_epoch)
    warmup = min(round(oc.warmup_epochs * steps_per_epoch), total - 1)
    if oc.schedule == "one_cycle":
        # momentum stays as configured (OneCycleLR would cycle it between 0.85 and 0.95)
        return opt, sched.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=total,
                                     pct_start=warmup / total if warmup else 0.3, cycle_momentum=False)
    if oc.schedule == "cosine":
        main = sched.CosineAnnealingLR(opt, T_max=total)
    else:
        main = sched.MultiStepLR(opt, milestones=[m * steps_per_epoch for m in oc.milestones], gamma=oc.gamma)
    if warmup <= 0:
        return opt, main
    # both factors multiply the lr, so the milestones and the cosine still count from the phase's start
    ramp = sched.LinearLR(opt, start_factor=1 / warmup, total_iters=warmup)
    return opt, sched.ChainedScheduler([ramp, main], optimizer=opt)

