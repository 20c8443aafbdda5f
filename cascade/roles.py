"""The roles every cascade is made of: Predictor, Oracle, TaskLoss and Task.

An *approximator* is any ``nn.Module`` whose forward gives the task output for a batch
(logits ``[B, K]`` or coordinates ``[B, D]``); the networks in ``cascade.networks``
expose it together with their features and, when they carry one, the predictor head's
score, as a :class:`StageOutput`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn
from torch.utils.data import Dataset


@dataclass
class StageOutput:
    """What one stage produces for a batch.

    Attributes:
        output: the approximator's output, logits ``[B, K]`` or coordinates ``[B, D]``.
        features: the shared features the heads read, ``[B, F]`` (None if not exposed).
        q: the predictor head's score in (0, 1), ``[B]`` (None for a plain network).
    """

    output: Tensor
    features: Tensor | None = None
    q: Tensor | None = None


class TaskLoss(ABC):
    """Per-sample loss and correctness of an approximator's output.

    Attributes:
        kind: ``"classification"`` or ``"regression"``.
    """

    kind: ClassVar[str]

    @abstractmethod
    def per_sample(self, output: Tensor, target: Tensor) -> Tensor:
        """Loss of each sample, ``[B]``; missing targets are masked out."""

    @abstractmethod
    def correct(self, output: Tensor, target: Tensor) -> Tensor:
        """Whether each output counts as correct, bool ``[B]``."""

    def errors(self, output: Tensor, target: Tensor) -> dict[str, Tensor]:
        """Extra per-sample error measures worth keeping in ``samples.csv`` (e.g. ``rmse``)."""
        return {}

    def prediction(self, output: Tensor) -> Tensor:
        """What the stage answers: the argmax class, or the coordinates."""
        return output


class Predictor(ABC):
    """Scores each input in [0, 1]; **higher means keep this stage's answer**.

    The AppealNet head, a baseline's confidence score and a stopping policy are all
    Predictors. Subclasses implement :meth:`score`; :meth:`route` is built on it.
    """

    #: registry key, identical to the ``method`` value in metrics.json
    name: ClassVar[str] = ""

    @abstractmethod
    def score(self, stage: StageOutput) -> Tensor:
        """Score of each input, ``[B]`` in [0, 1]."""

    def prepare(self, network: nn.Module, context: "MethodContext") -> None:
        """Fit whatever the method needs once the plain little network is trained.

        The default does nothing; e.g. a post-hoc error predictor trains itself here.
        """

    def score_batch(self, network: nn.Module, x: Tensor) -> Tensor:
        """Score ``[B]`` of a batch of inputs; the default runs ``network`` once in eval mode.

        Methods that need more than one pass (MC dropout) override this.
        """
        out = network(x)
        return self.score(out if isinstance(out, StageOutput) else StageOutput(output=out))

    def route(self, stage: StageOutput, threshold: float) -> Tensor:
        """Bool ``[B]``: True where the input stays on this stage (``score >= threshold``)."""
        return self.score(stage) >= threshold


class Oracle(ABC):
    """The last stage. White-box: a network with visible outputs. Black-box: only answers.

    Attributes:
        cost_mflops: cost of one call in MFLOPs (multiply-accumulates), None if unknown.
    """

    cost_mflops: float | None = None
    mode: ClassVar[str]

    @abstractmethod
    def per_sample_loss(self, x: Tensor, y: Tensor, criterion: TaskLoss) -> Tensor:
        """The oracle's loss on each sample, ``[B]`` (the ``L(f1(x), y)`` of Eq. 11)."""

    @abstractmethod
    def correct(self, x: Tensor, y: Tensor, criterion: TaskLoss) -> Tensor:
        """Bool ``[B]``: whether the oracle's answer is correct."""


class WhiteBoxOracle(Oracle):
    """A pre-trained, frozen network whose outputs are visible during training."""

    mode = "white_box"

    def __init__(self, network: nn.Module, cost_mflops: float | None = None):
        self.network = network.eval().requires_grad_(False)
        self.cost_mflops = cost_mflops

    @torch.no_grad()
    def output(self, x: Tensor) -> Tensor:
        out = self.network(x)
        return out.output if isinstance(out, StageOutput) else out

    def per_sample_loss(self, x: Tensor, y: Tensor, criterion: TaskLoss) -> Tensor:
        return criterion.per_sample(self.output(x), y)

    def correct(self, x: Tensor, y: Tensor, criterion: TaskLoss) -> Tensor:
        return criterion.correct(self.output(x), y)


class BlackBoxOracle(Oracle):
    """Only answers are known; in experiments it answers the ground truth (Sec. 3.2)."""

    mode = "black_box"

    def __init__(self, cost_mflops: float | None = None):
        self.cost_mflops = cost_mflops

    def per_sample_loss(self, x: Tensor, y: Tensor, criterion: TaskLoss) -> Tensor:
        return torch.zeros(len(y), device=y.device)

    def correct(self, x: Tensor, y: Tensor, criterion: TaskLoss) -> Tensor:
        return torch.ones(len(y), dtype=torch.bool, device=y.device)


@dataclass
class MethodContext:
    """What :meth:`Predictor.prepare` may use.

    Attributes:
        task: the task (its ``criterion``, shapes).
        train: the training split the little network was trained on.
        seed: the current seed.
        device: where the networks live.
        fit: ``fit(model, objective, dataset, optim_config, desc)`` runs the shared
            trainer with the experiment's progress and logging hooks.
    """

    task: "Task"
    train: Dataset
    seed: int
    device: torch.device
    fit: Callable[..., None]


@dataclass
class Splits:
    """Train, calibration and test datasets of ``(x, y)`` pairs."""

    train: Dataset
    cal: Dataset
    test: Dataset


class TaskOptions(BaseModel):
    """Base of every task's config options; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class Task(ABC):
    """A routing problem: its data splits, its networks and its loss. Subclass it.

    Subclasses set ``Options`` (a :class:`TaskOptions` pydantic model: the keys allowed
    under ``task:`` in a config), ``input_shape``, ``num_outputs``, ``criterion`` and the
    default network specs, and implement :meth:`build_splits`. Register with
    ``@TASKS.register("name")`` or name the class by dotted path in the config.

    Args:
        options: validated ``Options``.
    """

    Options: ClassVar[type[TaskOptions]] = TaskOptions
    #: default network specs ``{"name": <network registry key>, **kwargs}``
    default_little: ClassVar[dict[str, Any]]
    default_big: ClassVar[dict[str, Any] | None] = None
    #: the big side's cost in MFLOPs when it is a black box with no network (None: unknown)
    oracle_mflops: ClassVar[float | None] = None

    input_shape: tuple[int, ...]
    num_outputs: int
    criterion: TaskLoss

    def __init__(self, options: TaskOptions | None = None):
        self.options = options if options is not None else self.Options()

    @abstractmethod
    def build_splits(self, seed: int) -> Splits:
        """Train / calibration / test splits, fixed by ``seed``.

        Raises:
            CascadeError: missing or malformed data, or too few samples for the splits.
        """
