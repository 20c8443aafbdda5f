"""Routing methods: how a cascade decides, after each stage, whether to answer or go on.

A method is one module (in ``cascade/``, ``baselines/`` or a user's own package, named
by dotted path) that registers one class in :data:`~cascade.core.registry.METHODS`:

- **post-hoc** (:class:`~cascade.contracts.roles.Predictor`): scores a trained stage (MSP, Gap,
  MC dropout...). The pipeline gives it the *plain* stages, fine-tuned as long as any
  trained method, one instance per stage.
- **trained** (:class:`TrainedMethod`): trains networks of its own from the pre-trained
  stages (AppealNet's predictor heads, a REINFORCE stopping policy) and returns one or
  more :class:`RoutedSystem`.

Each declares ``Options`` (a pydantic model: the keys beside ``name`` in ``methods:``) and
the task kinds it suits. The pipeline, the evaluator and the reports only see these
interfaces: none of them names a particular method.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, ClassVar, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from cascade.config import MethodSpec, OptimConfig
from cascade.core.errors import CascadeError
from cascade.core.registry import METHODS
from cascade.contracts.roles import Approximator, MethodOptions, Mode, Oracle, Predictor, Task, TaskKind


class MethodKind(str, Enum):
    """Whether a method scores trained stages as they are, or trains networks of its own."""

    POST_HOC = "post_hoc"
    TRAINED = "trained"


@dataclass
class RoutedSystem:
    """What a trained method routes with: its stage networks, cheapest first.

    Every stage's ``forward(x)`` returns a :class:`StageOutput` whose ``q`` is the score
    (in [0, 1], higher = answer here); the last stage of the cascade (the big network or
    the oracle) is not among them: it is the same for every method.

    Attributes:
        stages: one module per routed stage.
        variant: names the system when a method trains several (``"a0.01"``), else ``""``.
        fixed_threshold: the threshold the method is meant to be used at (REINFORCE's
            greedy 0.5), reported as its own operating point; None if it has none.
        info: plain data about the system worth keeping in ``metrics.json`` (e.g. ``alpha``).
    """

    stages: list[nn.Module]
    variant: str = ""
    fixed_threshold: float | None = None
    info: dict[str, Any] = field(default_factory=dict)
    #: the module trained as one when the stages share parameters (a cascade and its policy)
    model: nn.Module | None = None

    def module(self) -> nn.Module:
        """What the system's weights are saved from and loaded into."""
        return self.model if self.model is not None else nn.ModuleList(self.stages)


@dataclass
class CascadeContext:
    """What a trained method may use to build and train its systems.

    Attributes:
        task: the task (its ``criterion``, shapes, kind).
        mode: the cascade's last stage: the big network (white-box) or an oracle.
        pretrained: the routed stages after pre-training (copy them; do not train them).
        plain: the routed stages fine-tuned alone (frozen; e.g. as the next stage's answers).
        oracle: the last stage, as a frozen :class:`~cascade.contracts.roles.Oracle`.
        stage_mflops: the cost of each plain stage, the last (big or oracle) included.
        data: the fine-tuning data.
        finetune: the fine-tuning phase's settings (every method trains as long).
        device: where the networks live.
        fit: ``fit(model, objective, data, desc, param_groups=None, hooks=())`` runs the
            shared trainer for one phase (checkpointed, resumable, logged); ``param_groups``
            are the optimizer's (default: every trainable parameter at ``finetune.lr``).
        with_oracle_outputs: ``with_oracle_outputs(data, oracle)`` is ``data`` with the frozen
            white-box oracle's outputs as a third tensor, computed once.
    """

    task: Task
    mode: Mode
    pretrained: list[Approximator]
    plain: list[Approximator]
    oracle: Oracle
    stage_mflops: list[float]
    data: Dataset
    finetune: OptimConfig
    device: torch.device
    fit: Callable[..., None]
    with_oracle_outputs: Callable[[Dataset, Oracle], Dataset]

    @property
    def kind(self) -> TaskKind:
        return self.task.criterion.kind


class TrainedMethod(ABC):
    """A routing method that trains networks of its own. Subclass it and register it.

    Attributes:
        Options: the method's config options.
        task_kinds: the task kinds it suits.
        default_for: the task kinds it runs for when a config lists no ``methods:``.
        options: the validated options.
    """

    Options: ClassVar[type[MethodOptions]] = MethodOptions
    task_kinds: ClassVar[frozenset[TaskKind]] = frozenset(TaskKind)
    default_for: ClassVar[frozenset[TaskKind]] = frozenset()
    kind: ClassVar[MethodKind] = MethodKind.TRAINED

    def __init__(self, options: MethodOptions | None = None):
        self.options = options if options is not None else self.Options()

    def problems(self, task: Task) -> list[str]:
        """Why the options do not suit ``task`` (``"<option>: <message and fix>"``); default none."""
        return []

    @abstractmethod
    def build(self, context: CascadeContext) -> list[RoutedSystem]:
        """The untrained systems (fresh heads on copies of ``context.pretrained``); the
        router builds them to load a run's checkpoints into."""

    @abstractmethod
    def train(self, systems: list[RoutedSystem], context: CascadeContext) -> None:
        """Train what :meth:`build` returned, with ``context.fit``."""


Method = Predictor | TrainedMethod


def method_kind(cls: type) -> MethodKind:
    """Post-hoc or trained."""
    return MethodKind.TRAINED if issubclass(cls, TrainedMethod) else MethodKind.POST_HOC


def method_class(name: str) -> type:
    """The method class registered as ``name`` (or at dotted path ``name``).

    Raises:
        CascadeError: unknown name, or something that is not a routing method.
    """
    cls = METHODS.get(name)
    if not (isinstance(cls, type) and issubclass(cls, (Predictor, TrainedMethod))):
        raise CascadeError(f"{name!r} is not a routing method (subclass cascade.Predictor for a post-hoc score, "
                           "cascade.TrainedMethod for a trained one)")
    return cls


@dataclass
class MethodEntry:
    """One method of a run: the name results use, its class and validated options."""

    label: str
    cls: type
    options: MethodOptions

    @property
    def kind(self) -> MethodKind:
        return method_kind(self.cls)

    def instance(self) -> Method:
        return self.cls(self.options)


def default_label(name: str) -> str:
    """What results call a method listed without ``label``: its registry key, or the last
    part of its dotted path (``my_methods.DeferralHead`` -> ``DeferralHead``)."""
    return name.rpartition(".")[2]


def build_methods(specs: Sequence[MethodSpec] | None, kind: TaskKind) -> list[MethodEntry]:
    """The run's methods: ``specs`` in order, or every registered default that suits ``kind``
    (trained ones first)."""
    if specs is None:
        names = [n for n in METHODS.names() if kind in getattr(METHODS.get(n), "default_for", ())]
        names.sort(key=lambda n: (method_kind(METHODS.get(n)) != MethodKind.TRAINED, n))
        specs = [MethodSpec(name=n) for n in names]
    entries = []
    for spec in specs:
        cls = method_class(spec.name)
        options = cls.Options.model_validate(spec.options())
        entries.append(MethodEntry(options.label or default_label(spec.name), cls, options))
    return entries


def scorer_key(entry: MethodEntry, mode: Mode | None) -> str:
    """What names a post-hoc method's scores in ``samples.csv`` (``stage0_score_<key>``): its
    label, with the mode for a ``mode_dependent`` method (one scorer per mode; any other
    method's key ignores ``mode``)."""
    return f"{entry.label}_{mode.value}" if getattr(entry.cls, "mode_dependent", False) else entry.label


def method_problems(entries: Sequence[MethodEntry], task: Task) -> list[str]:
    """Why the methods do not suit ``task``: those of the wrong task kind, all in one line
    with the fix, then each trained method's own problems (``"methods.<i>.<option>: ..."``)."""
    kind = TaskKind(task.criterion.kind)
    unsuited = [(i, e.label) for i, e in enumerate(entries) if kind not in e.cls.task_kinds]
    if unsuited:
        suits = [n for n in METHODS.names() if kind in getattr(METHODS.get(n), "task_kinds", ())]
        defaults = [e.label for e in build_methods(None, kind)]
        keys = ", ".join(f"methods.{i}" for i, _ in unsuited)
        labels = ", ".join(repr(label) for _, label in unsuited)
        one = len(unsuited) == 1
        return [f"{keys}: {labels} {'does' if one else 'do'} not suit a {kind.value} task (methods for "
                f"{kind.value}: {', '.join(suits)}); remove {'it' if one else 'them'}, or leave methods: out for "
                f"the {kind.value} defaults ({', '.join(defaults)})"]
    return [f"methods.{i}.{p}" for i, e in enumerate(entries) if issubclass(e.cls, TrainedMethod)
            for p in e.instance().problems(task)]
