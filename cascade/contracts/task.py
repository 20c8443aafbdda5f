"""What a task is: its data splits, its loss and its options.

A :class:`Task` builds train / calibration / test :class:`Splits`, names its networks
and its :class:`TaskLoss` (per-sample loss and correctness); :class:`Preprocessing`
turns a raw input into the networks' input.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn
from torch.utils.data import Dataset

from cascade.core.enums import TaskKind

if TYPE_CHECKING:
    import numpy as np


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

    def write_routing_figure(self, path: Path, network: nn.Module, dataset: Dataset, kept: np.ndarray,
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
