"""Training objectives: each turns a batch into a dict of losses with a ``loss`` key.

The trainer backpropagates ``loss`` and logs every other entry (as floats).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Literal

import torch
from torch import Tensor, nn

from cascade.roles import Oracle, StageOutput, TaskLoss

Batch = tuple[Tensor, ...]  # (x, y) or (x, y, extra)


class Objective(ABC):
    """Turns a batch into losses. Subclasses implement :meth:`__call__`."""

    @abstractmethod
    def __call__(self, model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        """Losses for ``batch``; ``out["loss"]`` is what gets backpropagated."""


class SupervisedObjective(Objective):
    """Pre-training: the task loss alone, averaged over the batch."""

    def __init__(self, criterion: TaskLoss):
        self.criterion = criterion

    def __call__(self, model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        x, y = batch[0], batch[1]
        return {"loss": self.criterion.per_sample(model(x).output, y).mean()}


class AppealNetObjective(Objective):
    """AppealNet joint training, METHOD.md Eq. 11 (white-box) and Eq. 12 (black-box).

    Per batch: ``L_A = mean(q * L(f0, y) + (1 - q) * L(f1, y))``, ``L_P = mean(-log q)``,
    ``loss = L_A + lambda * L_P``. With a black-box oracle ``L(f1, y) = 0``.

    Args:
        criterion: the task loss ``L``.
        oracle: the big side; its loss is computed without gradient.
        lam: the Lagrange multiplier (updated by :class:`LambdaControllerHook`).
        approximator_loss: ``"weighted"`` is the literal objective, where the
            approximator only learns from ``q * L``. ``"full"`` trains the approximator
            on the plain mean loss instead and the predictor on the literal objective with
            ``L`` detached, so inputs the predictor gives up on still teach the
            approximator.
        predictor_target: ``"loss"`` (the literal objective) or ``"error"``: the
            predictor's term uses the 0-1 error of each side instead of its loss, i.e.
            the quantity the operating points are judged on.
    """

    def __init__(
        self,
        criterion: TaskLoss,
        oracle: Oracle,
        lam: float = 0.1,
        approximator_loss: Literal["weighted", "full"] = "weighted",
        predictor_target: Literal["loss", "error"] = "loss",
        eps: float = 1e-6,
    ):
        self.criterion = criterion
        self.oracle = oracle
        self.lam = lam
        self.approximator_loss = approximator_loss
        self.predictor_target = predictor_target
        self.eps = eps

    def __call__(self, model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        # a third element, when present, is the white-box oracle's output for the batch,
        # computed once before training instead of at every step
        x, y = batch[0], batch[1]
        oracle_out = batch[2] if len(batch) > 2 else None
        out: StageOutput = model(x)
        q = out.q.clamp(self.eps, 1 - self.eps)  # [B]
        loss0 = self.criterion.per_sample(out.output, y)  # [B]
        if self.predictor_target == "error":
            l0 = (~self.criterion.correct(out.output, y)).float()
            c1 = self.criterion.correct(oracle_out, y) if oracle_out is not None else self.oracle.correct(x, y, self.criterion)
            l1 = (~c1).float()
        else:
            l0 = loss0
            l1 = (self.criterion.per_sample(oracle_out, y) if oracle_out is not None
                  else self.oracle.per_sample_loss(x, y, self.criterion)).detach()
        if self.approximator_loss == "full" or self.predictor_target == "error":
            l0 = l0.detach()
        system_risk = (q * l0 + (1 - q) * l1).mean()
        loss_p = -q.log().mean()
        loss = system_risk + self.lam * loss_p
        if self.approximator_loss == "full" or self.predictor_target == "error":
            loss = loss + loss0.mean()
        return {
            "loss": loss,
            "L_A": system_risk.detach(),
            "L_P": loss_p.detach(),
            "lambda": torch.tensor(self.lam),
            "q_mean": q.mean().detach(),
        }
