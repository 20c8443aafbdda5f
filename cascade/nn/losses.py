"""Task losses: cross-entropy for classification, masked squared L2 for regression."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from cascade.contracts.task import TaskLoss
from cascade.core.enums import TaskKind


class CrossEntropyTaskLoss(TaskLoss):
    """Cross-entropy on logits ``[B, K]`` with integer labels ``[B]``; correct = argmax hits."""

    kind = TaskKind.CLASSIFICATION

    def per_sample(self, output: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(output, target, reduction="none")

    def correct(self, output: Tensor, target: Tensor) -> Tensor:
        return output.argmax(dim=-1) == target

    def prediction(self, output: Tensor) -> Tensor:
        return output.argmax(dim=-1)


class MaskedL2TaskLoss(TaskLoss):
    """Squared L2 over the observed coordinates; missing targets are NaN and masked out.

    Per sample, with ``m`` the observed coordinates: ``loss = mean_m (out - y)^2`` and
    ``rmse = sqrt(loss)``; correct means ``rmse < threshold``. A sample with no
    observed coordinate has loss 0 and counts as correct (it carries no evidence).

    Args:
        threshold: RMSE (in the targets' units, pixels for keypoints) below which an
            output counts as correct. AppealNet App. D uses 4 pixels.
        scale: multiply the squared error by ``scale**2`` (when targets are normalized,
            ``scale`` maps them back to pixels for ``rmse`` and ``correct``).
    """

    kind = TaskKind.REGRESSION

    def __init__(self, threshold: float = 4.0, scale: float = 1.0):
        self.threshold = threshold
        self.scale = scale

    def _mse(self, output: Tensor, target: Tensor) -> Tensor:
        mask = ~torch.isnan(target)  # [B, D]
        diff = torch.where(mask, output - torch.nan_to_num(target), torch.zeros_like(output))
        n = mask.sum(dim=-1).clamp_min(1)
        return (diff**2).sum(dim=-1) / n  # [B]

    def per_sample(self, output: Tensor, target: Tensor) -> Tensor:
        return self._mse(output, target)

    def rmse(self, output: Tensor, target: Tensor) -> Tensor:
        return self._mse(output, target).sqrt() * self.scale

    def correct(self, output: Tensor, target: Tensor) -> Tensor:
        return self.rmse(output, target) < self.threshold

    def errors(self, output: Tensor, target: Tensor) -> dict[str, Tensor]:
        return {"rmse": self.rmse(output, target)}
