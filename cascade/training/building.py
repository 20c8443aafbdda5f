"""Building blocks shared by the pipeline, the router and the checks: tasks, networks,
loaders, optimizers, devices and per-phase seeds. No recipe lives here."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    RandomSampler,
    SequentialSampler,
    Subset,
    TensorDataset,
)

from cascade.core.files import load_checkpoint
from cascade.config import ExperimentConfig, NetworkSpec, OptimConfig
from cascade.core.errors import CascadeError, CheckpointError
from cascade.core.registry import NETWORKS, TASKS
from cascade.contracts.roles import Approximator, Oracle, Task

if TYPE_CHECKING:
    from cascade.training.trainer import Trainer

#: checkpoint and column name of the white-box last stage
BIG = "big"


def stage_name(k: int) -> str:
    """Checkpoint, column and ``networks`` name of plain routed stage ``k``."""
    return f"stage{k}"


def system_name(method: str, mode: str, variant: str) -> str:
    """Checkpoint name and column prefix of a trained method's system in one mode."""
    return "_".join(p for p in (method, variant, mode) if p)


#: where each training phase's random numbers start, per seed (see :func:`phase_seed`)
_PHASE_OFFSETS = {"big": 1, "pretrain": 2, "plain": 3, "big_init": 4, "pretrain_init": 5, "trained": 10,
                  "post_hoc": 50}


def phase_seed(seed: int, phase: str, index: int = 0, stage: int = 0) -> int:
    """The seed of one training phase's data order: distinct per phase, stage and index.

    Args:
        seed: the run's seed.
        phase: ``big``, ``pretrain``, ``plain``, ``trained`` (index: the method's position
            among the trained jobs) or ``post_hoc``; ``big_init`` and ``pretrain_init``:
            torch's global generator while the big network or a routed stage is built and
            trained (see :func:`seeded_rng`).
        index: which one of several phases of that kind.
        stage: the routed stage it trains.
    """
    return seed * 100 + _PHASE_OFFSETS[phase] + index + 1000 * stage


@contextlib.contextmanager
def seeded_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Run the block on torch's global generator (and ``device``'s, on CUDA) seeded with
    ``seed``, then put them back as they were.

    The big network and the pre-trained stages are built and trained in such a block, so
    that they depend on their own settings and seed alone (a network loaded from the
    cache is the one training would give) and what follows draws the same random numbers
    whether they were trained or loaded.
    """
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        torch.manual_seed(seed)
        yield


def build_task(cfg: ExperimentConfig) -> Task:
    task_cls = TASKS.get(cfg.task.name)
    return task_cls(task_cls.Options.model_validate(cfg.task.model_extra or {}))


def build_network(spec: NetworkSpec | dict[str, Any], task: Task, role: str = "network") -> Approximator:
    """The network ``spec`` names, for ``task``; with ``checkpoint:``, its weights loaded.

    Args:
        spec: the network's spec.
        task: gives ``input_shape`` and ``num_outputs``.
        role: names the config key in messages (``little``, ``stages.1``, ``big``).

    Raises:
        CascadeError: the builder fails, or returns something that is not an
            :class:`~cascade.contracts.roles.Approximator`; a checkpoint that does not fit.
    """
    spec = spec if isinstance(spec, NetworkSpec) else NetworkSpec.model_validate(spec)
    builder = NETWORKS.get(spec.name)
    try:
        net = builder(task.input_shape, task.num_outputs, **spec.kwargs())
    except CascadeError:
        raise
    except Exception as exc:  # a user's builder: say which and why, in one line
        raise CascadeError(f"{role}: network {spec.name!r} could not be built for input_shape "
                           f"{tuple(task.input_shape)} and num_outputs {task.num_outputs}: "
                           f"{type(exc).__name__}: {exc}") from None
    if not isinstance(net, Approximator):
        raise CascadeError(f"{role}: network {spec.name!r} returned a {type(net).__name__}, not a "
                           "cascade.Approximator; wrap it as cascade.FeatureNet(features, head, feature_dim) so that "
                           "it returns a StageOutput with its features")
    if not isinstance(getattr(net, "feature_dim", None), int):
        raise CascadeError(f"{role}: network {spec.name!r} does not declare feature_dim (an int)")
    if spec.checkpoint is not None:
        path = Path(spec.checkpoint).expanduser()
        state = load_checkpoint(path)
        try:
            net.load_state_dict(state)
        except (RuntimeError, TypeError, AttributeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"{path}: does not fit {role} ({spec.name}): {first}") from None
    return net


def resolve_specs(cfg: ExperimentConfig, task: Task) -> tuple[list[NetworkSpec], NetworkSpec | None]:
    """``(routed stage specs, big spec or None)`` of a config, the task's defaults filled in."""
    stages = [s.resolved(task.default_little) for s in cfg.stage_specs(task.default_little)]
    big = cfg.big or (NetworkSpec.model_validate(task.default_big) if task.default_big else None)
    return stages, (big.resolved(task.default_big) if big is not None else None)


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
        from cascade.training.distributed import ShardedBatchSampler

        batches = ShardedBatchSampler(batches, *shard)
    if in_memory:
        return DataLoader(dataset, sampler=batches, batch_size=None, pin_memory=pin_memory)
    # the loader draws its workers' base seed from ``generator`` too, before the sampler: as without shard
    return DataLoader(dataset, batch_sampler=batches, generator=generator, pin_memory=pin_memory)


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
    from cascade.training import distributed
    from cascade.training.trainer import Trainer

    augments = task.augments and len(data) > 0 and tuple(data[0][0].shape) == tuple(task.input_shape)
    loader = make_loader(data, oc.batch_size, shuffle=True, seed=seed, shard=distributed.shard(),
                         pin_memory=pin_memory)
    opt, sched = build_optimizer(model.parameters() if params is None else params, oc, steps_per_epoch=len(loader))
    return Trainer(model, objective, opt, loader, oc.epochs, hooks, sched, device, name=name,
                   scheduler_interval="step", augment=task.augment if augments else None, amp_dtype=amp_dtype,
                   channels_last=channels_last)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CascadeError("device: cuda requested but no CUDA device is available")
    return torch.device(name)


def resolve_amp(setting: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of the config's ``amp`` on ``device``, or None (full precision).

    Raises:
        CascadeError: ``bf16`` on a GPU without bfloat16.
    """
    if setting == "off":
        return None
    bf16_gpu = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if setting == "auto":
        return torch.bfloat16 if bf16_gpu else None
    if device.type == "cuda" and not bf16_gpu:
        raise CascadeError("amp: bf16: this GPU has no bfloat16 support; set amp: off")
    return torch.bfloat16


def resolve_channels_last(setting: str | bool, device: torch.device, input_shape: tuple[int, ...]) -> bool:
    """Whether the config's ``channels_last`` is on for ``device`` and inputs of ``input_shape``.

    Raises:
        CascadeError: ``true`` for inputs that are not images ``[C, H, W]``.
    """
    if setting == "auto":
        return device.type == "cuda" and len(input_shape) == 3
    if setting and len(input_shape) != 3:
        raise CascadeError(f"channels_last: true needs image inputs [C, H, W]; the task's are {list(input_shape)}")
    return bool(setting)


#: ``data_on_device: auto`` moves training data to the GPU when it takes at most this
#: fraction of the free GPU memory
DEVICE_DATA_FRACTION = 0.25


def data_on_device(dataset: Dataset, device: torch.device, setting: str | bool) -> Dataset:
    """``dataset`` with its tensors on ``device`` (a GPU), so that batches are indexed there
    with no host copy; ``dataset`` itself on the CPU, for data not held in memory, when
    ``setting`` is false, or (``auto``) when it would take more than
    :data:`DEVICE_DATA_FRACTION` of the free GPU memory."""
    if device.type != "cuda" or setting is False:
        return dataset
    tensors = tensors_of(dataset)
    if tensors is None:
        return dataset
    if setting == "auto":
        free, _ = torch.cuda.mem_get_info(device)
        if sum(t.numel() * t.element_size() for t in tensors) > DEVICE_DATA_FRACTION * free:
            return dataset
    return TensorDataset(*(t.to(device) for t in tensors))


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


def freeze(network: nn.Module) -> nn.Module:
    """``network`` in eval mode with no gradients (a stage others are measured against)."""
    return network.eval().requires_grad_(False)
