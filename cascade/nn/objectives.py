"""Training objectives: each turns a batch into a dict of losses with a ``loss`` key.

The trainer backpropagates ``loss`` and logs every other entry (as floats). The routing
methods' own objectives live in their packages (``cascade.methods.appealnet.objective``,
``cascade.methods.reinforce.objective``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn

from cascade.contracts.task import TaskLoss
from cascade.core.enums import TaskKind

Batch = tuple[Tensor, ...]  # (x, y) or (x, y, extra)


class Objective(ABC):
    """Turns a batch into losses. Subclasses implement :meth:`__call__`."""

    @abstractmethod
    def __call__(self, model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        """Losses for ``batch``; ``out["loss"]`` is what gets backpropagated."""


class SupervisedObjective(Objective):
    """Pre-training: the task loss alone, averaged over the batch.

    With ``label_smoothing`` ``e`` (classification), each sample's loss is
    ``(1 - e) * L(logits, y) + e * mean_k(-log softmax(logits)_k)``: for cross-entropy,
    the cross-entropy against targets with ``e / K`` of every class mixed in (PyTorch's
    ``label_smoothing``). See :class:`~cascade.config.OptimConfig` for why it is off by
    default.

    Raises:
        ValueError: ``label_smoothing`` outside ``[0, 1)``, or above 0 for a regression loss.
    """

    def __init__(self, criterion: TaskLoss, label_smoothing: float = 0.0):
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing}")
        if label_smoothing and criterion.kind != TaskKind.CLASSIFICATION:
            raise ValueError(f"label_smoothing needs a classification loss; {type(criterion).__name__} is "
                             f"{TaskKind(criterion.kind).value}")
        self.criterion = criterion
        self.label_smoothing = label_smoothing

    def __call__(self, model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        x, y = batch[0], batch[1]
        output = model(x).output
        loss = self.criterion.per_sample(output, y)  # [B]
        if self.label_smoothing:
            uniform = -torch.log_softmax(output.float(), dim=-1).mean(dim=-1)  # [B]: CE against uniform targets
            loss = (1 - self.label_smoothing) * loss + self.label_smoothing * uniform
        return {"loss": loss.mean()}
