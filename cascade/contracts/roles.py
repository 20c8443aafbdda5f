"""The roles every cascade is made of: Approximator, Predictor, Oracle, TaskLoss and Task.

An :class:`Approximator` is a network whose forward gives a :class:`StageOutput`: the
task output for a batch (logits ``[B, K]`` or coordinates ``[B, D]``), its shared
features and, when it carries a predictor head, the head's score.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn
from torch.utils.data import Dataset

if TYPE_CHECKING:
    import numpy as np


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


class Approximator(nn.Module):
    """A stage network: ``forward(x)`` returns a :class:`StageOutput` and ``feature_dim``
    says how wide its ``features`` are. Every network the pipeline builds must be one
    (:class:`cascade.FeatureNet` wraps a feature extractor and a head into one)."""

    feature_dim: int

    def forward(self, x: Tensor) -> StageOutput:  # pragma: no cover - abstract
        raise NotImplementedError


class TaskKind(str, Enum):
    """What a task's outputs are; methods and head inputs declare which kinds they suit."""

    CLASSIFICATION = "classification"
    REGRESSION = "regression"


class Mode(str, Enum):
    """What the last stage is: a network whose outputs are visible, or only answers."""

    WHITE_BOX = "white_box"
    BLACK_BOX = "black_box"


class TaskLoss(ABC):
    """Per-sample loss and correctness of an approximator's output.

    Attributes:
        kind: :class:`TaskKind` (a ``str``: ``"classification"`` or ``"regression"``).
    """

    kind: ClassVar[TaskKind]

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


class MethodOptions(BaseModel):
    """Base of every routing method's options (the keys beside ``name`` in ``methods:``).

    ``label`` names the method in the results when one method is listed twice with
    different options (default: its registry name).
    """

    model_config = ConfigDict(extra="forbid")
    label: str | None = None


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

    def prepare(self, network: nn.Module, context: "MethodContext") -> None:
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


class Oracle(ABC):
    """The last stage. White-box: a network with visible outputs. Black-box: only answers.

    Attributes:
        cost_mflops: cost of one call in MFLOPs (multiply-accumulates), None if unknown.
    """

    cost_mflops: float | None = None
    mode: ClassVar[Mode]

    @abstractmethod
    def per_sample_loss(self, x: Tensor, y: Tensor, criterion: TaskLoss) -> Tensor:
        """The oracle's loss on each sample, ``[B]`` (the ``L(f1(x), y)`` of Eq. 11)."""

    @abstractmethod
    def correct(self, x: Tensor, y: Tensor, criterion: TaskLoss) -> Tensor:
        """Bool ``[B]``: whether the oracle's answer is correct."""


class WhiteBoxOracle(Oracle):
    """A pre-trained, frozen network whose outputs are visible during training."""

    mode = Mode.WHITE_BOX

    def __init__(self, network: nn.Module, cost_mflops: float | None = None):
        self.network = network.eval().requires_grad_(False)
        self.cost_mflops = cost_mflops

    @torch.no_grad()
    def output(self, x: Tensor) -> Tensor:
        return self.network(x).output

    def per_sample_loss(self, x: Tensor, y: Tensor, criterion: TaskLoss) -> Tensor:
        return criterion.per_sample(self.output(x), y)

    def correct(self, x: Tensor, y: Tensor, criterion: TaskLoss) -> Tensor:
        return criterion.correct(self.output(x), y)


class BlackBoxOracle(Oracle):
    """Only answers are known; in experiments it answers the ground truth (Sec. 3.2)."""

    mode = Mode.BLACK_BOX

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

    task: "Task"
    train: Dataset
    seed: int
    device: torch.device
    fit: Callable[..., None]
    cal: Dataset | None = None
    mode: "Mode | None" = None
    next_stage: nn.Module | None = None


@dataclass
class Splits:
    """Train, calibration and test datasets of ``(x, y)`` pairs."""

    train: Dataset
    cal: Dataset
    test: Dataset


@dataclass(frozen=True)
class Preprocessing:
    """Raw input to network input: ``x = (raw / raw_max - mean[c]) / std[c]``.

    ``raw`` is in the task's own units, ``[0, raw_max]`` (grey levels 0-16 for digits,
    pixel values 0-255 for MNIST); ``mean`` and ``std`` hold one value, or one per channel
    (the first axis of ``input_shape``). An image file's pixels (0-255) are first scaled
    to ``[0, raw_max]``. Plain data, so a bundle's manifest carries it (``dataclasses.asdict``).
    """

    raw_max: float = 1.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)


class TaskOptions(BaseModel):
    """Base of every task's config options; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class Task(ABC):
    """A routing problem: its data splits, its networks and its loss. Subclass it.

    Subclasses set ``input_shape``, ``num_outputs`` and ``criterion`` (a
    :class:`TaskLoss`; usually in ``__init__``), may set ``Options`` (a
    :class:`TaskOptions` pydantic model: the keys allowed under ``task:`` in a config) and
    the default network specs, and implement :meth:`build_splits`. Register with
    ``@TASKS.register("name")`` or name the class by dotted path in the config.
    :func:`cascade.engine.checks.check_task` checks all of it on one batch of each split before
    any training.

    Args:
        options: validated ``Options``.
    """

    Options: ClassVar[type[TaskOptions]] = TaskOptions
    #: default network specs ``{"name": <network registry key>, **kwargs}`` (None: the
    #: config must name the network)
    default_little: ClassVar[dict[str, Any] | None] = None
    default_big: ClassVar[dict[str, Any] | None] = None
    #: the big side's cost in MFLOPs when it is a black box with no network (None: unknown)
    oracle_mflops: ClassVar[float | None] = None

    #: how a raw input (what a user has: grey levels, pixel values, feature rows) becomes
    #: the networks' input; an exported bundle carries it. None: inputs are used as given.
    preprocessing: ClassVar[Preprocessing | None] = None
    #: class names (classification) or output names (regression); None: "0", "1", ...
    output_names: ClassVar[tuple[str, ...] | None] = None

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

    # -- optional hooks -----------------------------------------------------------------

    def augment(self, x: Tensor) -> Tensor:
        """Random augmentation of one training batch (e.g. :func:`cascade.training.augment.random_crop_flip`);
        the default returns ``x`` unchanged.

        The trainer calls it on every training batch of every phase, after moving the
        batch to the device; evaluation never augments. Draw random numbers from torch's
        global CPU generator (make small tensors on the CPU, then move them to
        ``x.device``): a resumed run then replays them exactly.

        Args:
            x: a preprocessed float batch ``[B, *input_shape]`` on the training device.

        Returns:
            A batch of the same shape, dtype and device.
        """
        return x

    @property
    def augments(self) -> bool:
        """Whether :meth:`augment` changes inputs: True when a subclass overrides it (a
        subclass whose override can be the identity refines this). With augmentation the
        big network's outputs on the training set cannot be computed once up front."""
        return type(self).augment is not Task.augment

    @classmethod
    def data_problems(cls, options: TaskOptions, configured_only: bool) -> list[str]:
        """Problems with the data files ``options`` point to, found without reading them,
        each ``"<option>: <message>"`` (``cascade validate`` reports them). Default: none.

        Args:
            options: validated options.
            configured_only: check only paths the config sets, not ones from the
                environment or the default data root.
        """
        return []

    def write_routing_figure(self, path: Path, network: nn.Module, dataset: Dataset, kept: "np.ndarray",
                             caption: str) -> bool:
        """Draw routed test inputs (e.g. faces with their keypoints) into ``path``.

        Args:
            path: the PNG to write.
            network: the first routed stage of the first trained method.
            dataset: the test split.
            kept: bool ``[N]``, the inputs that stage keeps.
            caption: what the figure shows.

        Returns:
            Whether a figure was written; the default draws nothing.
        """
        return False
