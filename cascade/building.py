"""Building blocks shared by the pipeline, the router and the checks: tasks, networks,
loaders, optimizers, devices and per-phase seeds. No recipe lives here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler, Subset, TensorDataset

from cascade.checkpoint import load_checkpoint
from cascade.config import ExperimentConfig, NetworkSpec, OptimConfig
from cascade.errors import CascadeError, CheckpointError
from cascade.registry import NETWORKS, TASKS
from cascade.roles import Approximator, Oracle, Task

#: checkpoint and column name of the white-box last stage
BIG = "big"


def stage_name(k: int) -> str:
    """Checkpoint, column and ``networks`` name of plain routed stage ``k``."""
    return f"stage{k}"


def system_name(method: str, mode: str, variant: str) -> str:
    """Checkpoint name and column prefix of a trained method's system in one mode."""
    return "_".join(p for p in (method, variant, mode) if p)


#: where each training phase's random numbers start, per seed (see :func:`phase_seed`)
_PHASE_OFFSETS = {"big": 1, "pretrain": 2, "plain": 3, "trained": 10, "post_hoc": 50}


def phase_seed(seed: int, phase: str, index: int = 0, stage: int = 0) -> int:
    """The seed of one training phase's data order: distinct per phase, stage and index.

    Args:
        seed: the run's seed.
        phase: ``big``, ``pretrain``, ``plain``, ``trained`` (index: the method's position
            among the trained jobs) or ``post_hoc``.
        index: which one of several phases of that kind.
        stage: the routed stage it trains.
    """
    return seed * 100 + _PHASE_OFFSETS[phase] + index + 1000 * stage


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
            :class:`~cascade.roles.Approximator`; a checkpoint that does not fit.
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


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    """Batches of ``(x, y)``; in-memory tensor data is indexed a batch at a time.

    Training loaders (``shuffle``) drop a ragged last batch (a batch of 1 breaks batch
    norm); evaluation loaders keep it.
    """
    generator = torch.Generator().manual_seed(seed)
    drop_last = shuffle and len(dataset) > batch_size
    if tensors_of(dataset) is not None:
        base = RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
        return DataLoader(dataset, sampler=BatchSampler(base, batch_size, drop_last=drop_last), batch_size=None)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, drop_last=drop_last)


def build_optimizer(params, oc: OptimConfig) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """SGD or Adam over ``params`` (tensors, or param-group dicts that may set their own lr)."""
    params = list(params)
    if params and not isinstance(params[0], dict):
        params = [p for p in params if p.requires_grad]
    if oc.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=oc.lr, momentum=oc.momentum, weight_decay=oc.weight_decay)
    else:
        opt = torch.optim.Adam(params, lr=oc.lr, weight_decay=oc.weight_decay)
    return opt, torch.optim.lr_scheduler.MultiStepLR(opt, milestones=oc.milestones, gamma=oc.gamma)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CascadeError("device: cuda requested but no CUDA device is available")
    return torch.device(name)


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
def with_oracle_outputs(dataset: Dataset, oracle: Oracle, batch_size: int, device: torch.device) -> Dataset:
    """``(x, y, oracle output)``: a frozen white-box oracle's outputs, computed once.

    ``dataset`` itself for a black-box oracle (no outputs), or for data not held in
    memory (the objective then asks the oracle at every step).
    """
    tensors = tensors_of(dataset)
    if tensors is None or not hasattr(oracle, "output"):
        return dataset
    loader = make_loader(TensorDataset(*tensors[:2]), batch_size, False, 0)
    outs = [oracle.output(x.to(device)).cpu() for x, _ in loader]
    return TensorDataset(tensors[0], tensors[1], torch.cat(outs))


def freeze(network: nn.Module) -> nn.Module:
    """``network`` in eval mode with no gradients (a stage others are measured against)."""
    return network.eval().requires_grad_(False)
