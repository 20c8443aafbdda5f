"""Building the config's task and networks from the registries, with one-line errors
naming the class or key when a user's constructor or builder fails."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cascade.config.schema import ExperimentConfig, NetworkSpec
from cascade.contracts.stages import Approximator
from cascade.contracts.task import Preprocessing, Task, TaskLoss
from cascade.core.enums import TaskKind
from cascade.core.errors import CascadeError, CheckpointError
from cascade.core.files import load_checkpoint
from cascade.core.registry import NETWORKS, TASKS


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
            :class:`~cascade.contracts.stages.Approximator`; a checkpoint that does not fit.
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


def construct_task(cfg: ExperimentConfig) -> Task:
    """The config's task, or a one-line error naming the class when its constructor fails
    or the instance lacks a required attribute (checked before anything reads them)."""
    try:
        task = build_task(cfg)
    except CascadeError:
        raise
    except Exception as exc:
        raise CascadeError(f"task {cfg.task.name}: the constructor failed: {type(exc).__name__}: {exc}") from None
    problems = task_attribute_problems(task)
    if problems:
        raise CascadeError(problems[0])
    return task


def task_attribute_problems(task: Task) -> list[str]:
    """The required attributes a task instance lacks or has wrong, with the fix."""
    name = type(task).__name__
    out = []
    shape = getattr(task, "input_shape", None)
    if shape is None:
        out.append(f"task {name}: input_shape is not set; set it on the class, e.g. input_shape = (1, 28, 28)")
    elif not (isinstance(shape, (tuple, list)) and shape and all(isinstance(d, int) and d > 0 for d in shape)):
        out.append(f"task {name}: input_shape must be a tuple of positive ints (one input, no batch), got {shape!r}")
    n = getattr(task, "num_outputs", None)
    if not (isinstance(n, int) and n > 0):
        out.append(f"task {name}: num_outputs must be a positive int (classes, or regression outputs), got {n!r}")
    crit = getattr(task, "criterion", None)
    if not isinstance(crit, TaskLoss):
        got = "not set" if crit is None else f"a {type(crit).__name__}"
        out.append(f"task {name}: criterion is {got}; set self.criterion = cascade.CrossEntropyTaskLoss() "
                   "(classification) or cascade.MaskedL2TaskLoss() (regression) in __init__")
    elif crit.kind == TaskKind.CLASSIFICATION and isinstance(n, int) and n < 2:
        out.append(f"task {name}: num_outputs is {n}, but a classification task needs at least 2 classes "
                   "(for a single real-valued output use cascade.MaskedL2TaskLoss, a regression criterion)")
    names = getattr(task, "output_names", None)
    if names is not None and isinstance(n, int) and (isinstance(names, str) or len(names) != n):
        out.append(f"task {name}: output_names must name each of the {n} outputs (a tuple of {n} strings), "
                   f"got {names!r}"[:300])
    pre = getattr(task, "preprocessing", None)
    if pre is not None:
        channels = shape[0] if isinstance(shape, (tuple, list)) and shape else None
        if not isinstance(pre, Preprocessing):
            out.append(f"task {name}: preprocessing must be a cascade.Preprocessing(raw_max=..., mean=..., std=...), "
                       f"got a {type(pre).__name__}")
        elif pre.raw_max <= 0 or any(s <= 0 for s in pre.std):
            out.append(f"task {name}: preprocessing needs raw_max > 0 and std > 0, got {pre}")
        elif any(len(v) not in (1, channels) for v in (pre.mean, pre.std)):
            out.append(f"task {name}: preprocessing mean and std need 1 value or one per channel ({channels}), "
                       f"got {pre}")
    return out
