"""The interfaces of a routing method: how a cascade decides, after each stage, whether
to answer or go on.

A method is one class registered in :data:`~cascade.core.registry.METHODS` (or named by
dotted path), of one of two kinds:

- **post-hoc** (:class:`Predictor`): scores a trained stage (MSP, Gap, MC dropout...),
  prepared with a :class:`MethodContext`;
- **trained** (:class:`TrainedMethod`): trains networks of its own from the pre-trained
  stages, given a :class:`CascadeContext`, and returns one or more :class:`RoutedSystem`.

Each declares ``Options`` (a :class:`MethodOptions` pydantic model: the keys beside
``name`` in ``methods:``) and the task kinds it suits.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn
from torch.utils.data import Dataset

from cascade.contracts.stages import Approximator, Oracle, StageOutput
from cascade.contracts.task import Task
from cascade.core.enums import Mode, TaskKind
from cascade.core.errors import CascadeError
from cascade.core.registry import METHODS


class MethodKind(StrEnum):
    """Whether a method scores trained stages as they are, or trains networks of its own."""

    POST_HOC = "post_hoc"
    TRAINED = "trained"


class MethodOptions(BaseModel):
    """Base of every routing method's options (the keys beside ``name`` in ``methods:``).

    ``label`` names the method in the results when one method is listed twice with
    different options (default: its registry name).
    """

    model_config = ConfigDict(extra="forbid")
    label: str | None = None


@dataclass
class MethodContext:
    """What :meth:`Predictor.prepare` may use.

    Attributes:
        task: the task (its ``criterion``, shapes).
        train: the training split the stage network was trained on.
        seed: the current seed.
        device: where the networks live.
        fit: ``fit(model, objective, dataset, optim_config, desc)`` runs the shared
            trainer with the experiment's progress and logging hooks.
        cal: the calibration split, on which thresholds are chosen too: a method that
            fits on it (a temperature, a deferral head) must keep its calibration scores
            out-of-sample (see :class:`Predictor` ``fits_on_cal``); None outside a run.
        mode: the mode the scorer serves, for a ``mode_dependent`` method; else None.
        next_stage: for a ``mode_dependent`` method, the network an appealed input goes
            to (the next routed stage, or the big network in white-box mode); None when
            it is the black-box oracle (always right).
    """

    task: Task
    train: Dataset
    seed: int
    device: torch.device
    fit: Callable[..., None]
    cal: Dataset | None = None
    mode: Mode | None = None
    next_stage: nn.Module | None = None


class Predictor(ABC):
    """A post-hoc routing method: scores each input of a trained stage in [0, 1];
    **higher means keep this stage's answer**.

    Subclasses implement :meth:`score`; :meth:`route` is built on it. The pipeline
    scores every stage but the last of the plain cascade with one instance per stage.

    Attributes:
        Options: the method's config options (a :class:`MethodOptions` model).
        task_kinds: the task kinds the score makes sense for.
        default_for: the task kinds it runs for when a config lists no ``methods:``.
        options: the validated options.
    """

    Options: ClassVar[type[MethodOptions]] = MethodOptions
    task_kinds: ClassVar[frozenset[TaskKind]] = frozenset(TaskKind)
    default_for: ClassVar[frozenset[TaskKind]] = frozenset()
    #: False when scores draw random numbers (MC dropout): an exported bundle could not
    #: reproduce the run's decisions, so ``cascade export`` refuses the method
    deterministic: ClassVar[bool] = True
    #: True when the score depends on where an appealed input goes (a deferral head that
    #: learns when the next stage is right): one scorer per mode, given
    #: ``MethodContext.mode`` and ``next_stage``
    mode_dependent: ClassVar[bool] = False
    #: True for a confidence score (MSP and its kin): read off the stage's output, with
    #: nothing fitted to where the next stage is right; the appeal-budget tables compare
    #: the best learned method with the best of these
    confidence_score: ClassVar[bool] = False
    #: set by a :meth:`prepare` that fits on the calibration split, which also picks the
    #: thresholds: its out-of-sample (cross-fitted) scores of that split, ``[N_cal]`` in
    #: the split's order, which the pipeline records instead of :meth:`score_batch`'s
    cal_scores: Tensor | None = None

    def __init__(self, options: MethodOptions | None = None):
        self.options = options if options is not None else self.Options()

    @abstractmethod
    def score(self, stage: StageOutput) -> Tensor:
        """Score of each input, ``[B]`` in [0, 1]."""

    def network_problems(self, network: nn.Module) -> list[str]:
        """Why ``network`` (a routed stage, built but not trained) cannot be scored by this
        method, with the fix (``"<key>: <message>"``); checked before any training. Default: none."""
        return []

    def prepare(self, network: nn.Module, context: MethodContext) -> None:
        """Fit whatever the method needs once the plain stage network is trained.

        The default does nothing; e.g. a post-hoc error predictor trains itself here.
        """

    def score_batch(self, network: nn.Module, x: Tensor, out: StageOutput | None = None) -> Tensor:
        """Score ``[B]`` of a batch of inputs.

        Args:
            network: the stage network.
            x: the batch.
            out: ``network(x)`` when the caller already has it; the default scores it
                instead of running the network again.

        Methods that need passes of their own (MC dropout) override this.
        """
        return self.score(network(x) if out is None else out)

    def route(self, stage: StageOutput, threshold: float) -> Tensor:
        """Bool ``[B]``: True where the input stays on this stage (``score >= threshold``)."""
        return self.score(stage) >= threshold


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
class BuildContext:
    """What :meth:`TrainedMethod.build` may use: enough to build a method's systems, to
    train them (a :class:`CascadeContext`) or to load a finished run's weights into them
    (:func:`cascade.deploy.router.load_run_point`).

    Attributes:
        task: the task (its ``criterion``, shapes, kind).
        mode: the cascade's last stage: the big network (white-box) or an oracle.
        pretrained: the routed stages after pre-training (copy them; do not train them).
        oracle: the last stage, as a frozen :class:`~cascade.contracts.stages.Oracle`.
        device: where the networks live.
    """

    task: Task
    mode: Mode
    pretrained: list[Approximator]
    oracle: Oracle
    device: torch.device

    @property
    def kind(self) -> TaskKind:
        return self.task.criterion.kind


@dataclass
class CascadeContext(BuildContext):
    """What a trained method may use to build and train its systems: a
    :class:`BuildContext` and the training side.

    Attributes:
        plain: the routed stages fine-tuned alone (frozen; e.g. as the next stage's answers).
        stage_mflops: the cost of each plain stage, the last (big or oracle) included.
        data: the fine-tuning data.
        finetune: the fine-tuning phase's settings, a :class:`cascade.config.OptimConfig`
            (every method trains as long; typed ``Any`` here: config sits above contracts).
        fit: ``fit(model, objective, data, desc, param_groups=None, hooks=())`` runs the
            shared trainer for one phase (checkpointed, resumable, logged); ``param_groups``
            are the optimizer's (default: every trainable parameter at ``finetune.lr``).
        with_oracle_outputs: ``with_oracle_outputs(data, oracle)`` is ``data`` with the frozen
            white-box oracle's outputs as a third tensor, computed once.
    """

    plain: list[Approximator]
    stage_mflops: list[float]
    data: Dataset
    finetune: Any
    fit: Callable[..., None]
    with_oracle_outputs: Callable[[Dataset, Oracle], Dataset]


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
    def build(self, context: BuildContext) -> list[RoutedSystem]:
        """The untrained systems (fresh heads on copies of ``context.pretrained``); the
        router builds them to load a run's checkpoints into (a :class:`BuildContext`, no
        training side)."""

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
