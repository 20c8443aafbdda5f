"""Checks of a task, its data and its networks before any training.

``cascade validate`` and the start of ``cascade run`` build the task's splits and every
network, run one batch of each split through them and check what training would
otherwise trip over after minutes (or, worse, get silently wrong): the class attributes,
the type and shape of inputs and targets, the label type and range, the networks'
contract and output shapes, and whether the methods suit the task kind. Each problem
is one :class:`~cascade.core.errors.CascadeError` line naming the class, key or split.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from cascade.contracts.stages import StageOutput
from cascade.contracts.task import Splits, Task
from cascade.core.enums import TaskKind
from cascade.core.errors import CascadeError, DataError
from cascade.engine.plan import Plan
from cascade.engine.tasks import build_network, task_attribute_problems
from cascade.methods.catalogue import method_problems
from cascade.runs.layout import BIG
from cascade.training.data import make_loader, tensors_of

__all__ = ["check_splits", "check_task", "task_attribute_problems"]

log = logging.getLogger(__name__)

#: inputs per split run through the networks
_PROBE = 8


def check_task(plan: Plan, seed: int, networks: bool = True) -> Splits:
    """Check ``plan``'s task, data, networks and methods on one batch per split
    (the networks only with ``networks``: they are the same for every seed).

    Returns:
        The seed's splits (built once, used by the run).

    Raises:
        CascadeError: the first problem found, in one line.
    """
    task = plan.task
    problems = task_attribute_problems(task)
    if problems:
        raise CascadeError(problems[0])
    problems = method_problems(list(plan.methods), task)
    if problems:
        raise CascadeError(f"{plan.where}: {problems[0]}")
    splits = _build_splits(task, seed)
    batches = {split: _probe_batch(task, getattr(splits, split), split) for split in ("train", "cal", "test")}
    check_splits(task, splits, f"task {type(task).__name__}, seed {seed}")
    _check_class_coverage(task, splits)
    if networks:
        _check_networks(plan, batches)
    return splits


def _build_splits(task: Task, seed: int) -> Splits:
    name = type(task).__name__
    try:
        splits = task.build_splits(seed)
    except CascadeError:
        raise
    except Exception as exc:
        raise CascadeError(f"task {name}: build_splits({seed}) failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(splits, Splits):
        raise CascadeError(f"task {name}: build_splits must return cascade.Splits(train, cal, test), "
                           f"got {type(splits).__name__}")
    return splits


def _check_networks(plan: Plan, batches: dict[str, tuple[Tensor, Tensor]]) -> None:
    """Every network of ``plan`` on each split's probe batch; the post-hoc methods on each routed stage."""
    task, device = plan.task, plan.device
    specs = [(plan.stage_key(k), spec) for k, spec in enumerate(plan.stage_specs)]
    if plan.runs_big:
        specs.append((BIG, plan.big_spec))
    for role, spec in specs:
        net = build_network(spec, task, role).to(device).eval()
        for split, (x, y) in batches.items():
            _check_network(task, net, role, spec.name, split, x.to(device), y.to(device))
        if role != BIG:  # the post-hoc methods score the routed stages
            for entry in plan.post_hoc_methods:
                problems = entry.instance().network_problems(net)
                if problems:
                    raise CascadeError(f"{plan.where}: {problems[0]} ({role})")


def _probe_batch(task: Task, dataset: Any, split: str) -> tuple[Tensor, Tensor]:
    """The first few ``(x, y)`` of a split, checked for type, dtype and shape."""
    name = type(task).__name__
    where = f"task {name}: {split} split"
    if not isinstance(dataset, Dataset):
        raise CascadeError(f"{where} is a {type(dataset).__name__}, not a torch Dataset; build it as "
                           "TensorDataset(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y))")
    if len(dataset) == 0:
        raise DataError(f"{where} is empty; the data set is too small for the requested splits")
    try:
        batch = next(iter(make_loader(dataset, _PROBE, False, 0)))
    except Exception as exc:
        raise CascadeError(f"{where}: reading its first items failed: {type(exc).__name__}: {exc}") from None
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise CascadeError(f"{where}: items must be (input, target) pairs, got {type(batch).__name__} of "
                           f"{len(batch) if isinstance(batch, (tuple, list)) else 1}")
    x, y = batch
    for what, t in (("inputs", x), ("targets", y)):
        if not isinstance(t, Tensor):
            raise CascadeError(f"{where}: {what} are {type(t).__name__}, not tensors; convert with torch.as_tensor")
    if not x.is_floating_point():
        raise CascadeError(f"{where}: inputs are {x.dtype}; the networks need float inputs (x.float())")
    if x.dtype == torch.float64:
        raise CascadeError(f"{where}: inputs are float64, the networks float32; convert with x.float() "
                           "(numpy arrays are float64 by default)")
    if tuple(x.shape[1:]) != tuple(task.input_shape):
        raise CascadeError(f"{where}: one input is shaped {list(x.shape[1:])}, but {name}.input_shape is "
                           f"{tuple(task.input_shape)}; set input_shape = {tuple(x.shape[1:])} (one input, no batch)")
    kind = task.criterion.kind
    if kind == TaskKind.CLASSIFICATION:
        if y.is_floating_point() or y.dtype == torch.bool:
            raise CascadeError(f"{where}: labels are {y.dtype}; a classification task needs integer class indices "
                               "(torch.long: y.long()), or use a regression criterion")
        if y.dim() != 1:
            raise CascadeError(f"{where}: labels are shaped {list(y.shape)}; classification needs one class index "
                               "per input, shaped [N]")
        if y.dtype != torch.long:
            raise CascadeError(f"{where}: labels are {y.dtype}; class indices must be torch.long (y.long(); numpy "
                               "int32 arrays give torch.int32)")
    else:
        if not y.is_floating_point():
            raise CascadeError(f"{where}: regression targets are {y.dtype}; they must be float (y.float())")
        if tuple(y.shape[1:]) != (task.num_outputs,):
            fix = " (y.unsqueeze(1))" if y.dim() == 1 and task.num_outputs == 1 else ""
            raise CascadeError(f"{where}: regression targets are shaped [N{''.join(f', {d}' for d in y.shape[1:])}], "
                               f"but the networks output [N, {task.num_outputs}] (num_outputs); return targets "
                               f"shaped [N, {task.num_outputs}]{fix}")
    return x, y


def _check_network(task: Task, net: Any, role: str, spec_name: str | None, split: str, x: Tensor, y: Tensor) -> None:
    name = f"{role} ({spec_name})"
    try:
        with torch.no_grad():
            out = net(x)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CascadeError(f"network {name} failed on a {split} batch shaped {list(x.shape)}: "
                           f"{type(exc).__name__}: {first}; is {type(task).__name__}.input_shape "
                           f"{tuple(task.input_shape)} what the network expects?") from None
    if not isinstance(out, StageOutput):
        raise CascadeError(f"network {name} returned a {type(out).__name__}, not a cascade.StageOutput; wrap it as "
                           "cascade.FeatureNet(features, head, feature_dim)")
    b = len(x)
    if tuple(out.output.shape) != (b, task.num_outputs):
        raise CascadeError(f"network {name} outputs [B, {', '.join(map(str, out.output.shape[1:]))}] but "
                           f"{type(task).__name__}.num_outputs is {task.num_outputs}: build it with num_outputs "
                           f"outputs (the builder's second argument)")
    if out.features is None or tuple(out.features.shape) != (b, net.feature_dim):
        got = None if out.features is None else list(out.features.shape)
        raise CascadeError(f"network {name}: its features are {got}, but it declares feature_dim {net.feature_dim}")
    crit = type(task.criterion).__name__
    try:
        loss = task.criterion.per_sample(out.output.float(), y)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CascadeError(f"task {type(task).__name__}: criterion {crit}.per_sample failed on network {name}'s "
                           f"outputs {list(out.output.shape)} and a {split} batch's targets {list(y.shape)} "
                           f"({y.dtype}): {type(exc).__name__}: {first}") from None
    if tuple(loss.shape) != (b,):
        raise CascadeError(f"task {type(task).__name__}: criterion {type(task.criterion).__name__}.per_sample gave "
                           f"{list(loss.shape)} for a batch of {b}; it must give one loss per input, [B]")


def _check_class_coverage(task: Task, splits: Splits) -> None:
    """Warn when ``num_outputs`` is larger than the classes present in the training split."""
    if task.criterion.kind != TaskKind.CLASSIFICATION:
        return
    tensors = tensors_of(splits.train)
    if tensors is None:
        return
    present = torch.unique(tensors[1])
    if len(present) < task.num_outputs:
        log.warning("task %s: num_outputs is %d but the train split holds %d classes (%s); the missing classes are "
                    "never predicted", type(task).__name__, task.num_outputs, len(present),
                    ", ".join(str(int(c)) for c in present[:12]))


def check_splits(task: Task, splits: Splits, what: str) -> None:
    """Refuse data that training would choke on, before any training.

    Inputs must be finite; classification labels integers in ``[0, num_outputs)``;
    regression targets may be NaN (a missing target, masked out of the loss) but not
    infinite. Only in-memory splits (tensors) are checked whole: others meet the
    trainer's non-finite-loss check, which says when a batch's inputs hold NaN/inf.

    Args:
        task: the task (its ``criterion.kind`` and ``num_outputs``).
        splits: what ``task.build_splits`` returned.
        what: names the data in messages (e.g. ``"task digits, seed 0"``).

    Raises:
        DataError: the first bad sample of each kind, by split and index, with how many.
    """
    for split in ("train", "cal", "test"):
        tensors = tensors_of(getattr(splits, split))
        if tensors is None:
            continue
        x, y = tensors[0], tensors[1]
        n = len(x)
        if n == 0:
            raise DataError(f"{what}: the {split} split is empty; the data set is too small for the requested splits")
        problems: list[tuple[Tensor, str]] = []
        if x.is_floating_point():
            problems.append((~torch.isfinite(x.reshape(n, -1)).all(dim=1), "input holds NaN or infinite values"))
        if task.criterion.kind == TaskKind.CLASSIFICATION:
            integral = torch.ones_like(y, dtype=torch.bool)
            if y.is_floating_point():  # float labels must still be whole class numbers
                integral = torch.isfinite(y) & (y == y.round())
            in_range = integral & (y >= 0) & (y < task.num_outputs)
            problems.append((~in_range.reshape(n, -1).all(dim=1),
                             f"label outside the classes 0..{task.num_outputs - 1}"))
        elif y.is_floating_point():
            problems.append((torch.isinf(y.reshape(n, -1)).any(dim=1), "target is infinite (NaN marks a missing one)"))
        for bad, why in problems:
            if bool(bad.any()):
                i = int(bad.nonzero()[0])
                value = f" ({y[i].tolist()})" if "label" in why and y[i].numel() == 1 else ""
                raise DataError(f"{what}: {split} split, sample {i}: {why}{value}; {int(bad.sum())} of {n} samples")
