"""Training objectives: each turns a batch into a dict of losses with a ``loss`` key.

The trainer backpropagates ``loss`` and logs every other entry (as floats).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Literal

import torch
from torch import Tensor, nn

from cascade.contracts.roles import Oracle, StageOutput, TaskKind, TaskLoss

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


#: predictor targets learned directly, without the Lagrangian (and without its lambda controller)
DIRECT_TARGETS = ("safe", "loss_gap")


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
        predictor_target: what the predictor learns.

            - ``"loss"``: the literal objective.
            - ``"error"``: the literal objective with each side's 0-1 error in place of
              its loss, the quantity the operating points are judged on.
            - ``"safe"``: no Lagrangian: ``q`` is a classifier of "keeping is safe" (this
              stage right, or the oracle wrong too: appealing cannot help), trained by
              binary cross-entropy, a proper scoring rule, so ``q`` estimates
              ``P(safe | x)``; in white-box mode that is exactly what the cost pays for.
            - ``"loss_gap"``: no Lagrangian: the head's logit regresses ``L(f1) - L(f0)``
              (positive where keeping is better) by squared error.

            With ``safe`` and ``loss_gap`` the approximator trains on its plain loss
            (``approximator_loss`` is ignored), and ``lam`` only scales the logged ``L_P``.
    """

    def __init__(
        self,
        criterion: TaskLoss,
        oracle: Oracle,
        lam: float = 0.1,
        approximator_loss: Literal["weighted", "full"] = "weighted",
        predictor_target: Literal["loss", "error", "safe", "loss_gap"] = "loss",
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
        if self.predictor_target in DIRECT_TARGETS:
            return self._direct(out, q, loss0, x, y, oracle_out)
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

    def _direct(self, out: StageOutput, q: Tensor, loss0: Tensor, x: Tensor, y: Tensor,
                oracle_out: Tensor | None) -> dict[str, Tensor]:
        """The ``safe`` and ``loss_gap`` targets: the predictor learns a label, not a Lagrangian."""
        if self.predictor_target == "safe":
            right0 = self.criterion.correct(out.output.detach(), y)
            right1 = (self.criterion.correct(oracle_out, y) if oracle_out is not None
                      else self.oracle.correct(x, y, self.criterion))
            safe = (right0 | ~right1).float()  # [B]
            loss_p = nn.functional.binary_cross_entropy(q, safe)
        else:
            loss1 = (self.criterion.per_sample(oracle_out, y) if oracle_out is not None
                     else self.oracle.per_sample_loss(x, y, self.criterion)).detach()
            logit = torch.log(q) - torch.log1p(-q)
            loss_p = ((logit - (loss1 - loss0.detach())) ** 2).mean()
        loss_a = loss0.mean()
        return {"loss": loss_a + loss_p, "L_A": loss_a.detach(), "L_P": loss_p.detach(),
                "lambda": torch.tensor(self.lam), "q_mean": q.mean().detach()}
