"""The method catalogue: the routing methods a run lists, built from the config.

:func:`build_methods` turns ``methods:`` (or, when it is left out, the registered
defaults for the task kind) into :class:`MethodEntry` objects; :func:`method_problems`
says why they do not suit a task; :func:`scorer_key` names a post-hoc method's scores.
The interfaces the methods implement are in :mod:`cascade.contracts.methods`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cascade.config.schema import MethodSpec
from cascade.contracts.methods import (
    Method,
    MethodKind,
    MethodOptions,
    TrainedMethod,
    method_class,
    method_kind,
)
from cascade.contracts.task import Task
from cascade.core.enums import Mode, TaskKind
from cascade.core.registry import METHODS


@dataclass
class MethodEntry:
    """One method of a run: the name results use, its class and validated options."""

    label: str
    cls: type
    options: MethodOptions

    @property
    def kind(self) -> MethodKind:
        return method_kind(self.cls)

    @property
    def confidence_score(self) -> bool:
        """Whether the method is a confidence score (``Predictor.confidence_score``; trained methods are not)."""
        return bool(getattr(self.cls, "confidence_score", False))

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
