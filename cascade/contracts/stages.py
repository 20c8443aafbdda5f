"""The stages a cascade is made of: Approximators, then an Oracle.

An :class:`Approximator` is a network whose forward gives a :class:`StageOutput`: the
task output for a batch (logits ``[B, K]`` or coordinates ``[B, D]``), its shared
features and, when it carries a predictor head, the head's score. The :class:`Oracle`
is the last stage: a white-box network or a black box that only answers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from cascade.contracts.task import TaskLoss
from cascade.core.enums import Mode


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
