"""AppealNet's training objective: METHOD.md Eq. 11 (white-box) and Eq. 12 (black-box)."""

from __future__ import annotations

from enum import StrEnum

import torch
from torch import Tensor, nn

from cascade.contracts.stages import Oracle, StageOutput
from cascade.contracts.task import TaskLoss
from cascade.nn.objectives import Batch, Objective


class PredictorTarget(StrEnum):
    """What the predictor head learns (see :class:`AppealNetObjective`)."""

    LOSS = "loss"
    ERROR = "error"
    SAFE = "safe"
    LOSS_GAP = "loss_gap"


class ApproximatorLoss(StrEnum):
    """What the approximator learns from (see :class:`AppealNetObjective`)."""

    WEIGHTED = "weighted"
    FULL = "full"


#: predictor targets learned directly, without the Lagrangian (and without its lambda controller)
DIRECT_TARGETS = (PredictorTarget.SAFE, PredictorTarget.LOSS_GAP)


class AppealNetObjective(Objective):
    """AppealNet joint training, METHOD.md Eq. 11 (white-box) and Eq. 12 (black-box).

    Per batch: ``L_A = mean(q * L(f0, y) + (1 - q) * L(f1, y))``, ``L_P = mean(-log q)``,
    ``loss = L_A + lambda * L_P``. With a black-box oracle ``L(f1, y) = 0``.

    Args:
        criterion: the task loss ``L``.
        oracle: the big side; its loss is computed without gradient.
        lam: the Lagrange multiplier (updated by :class:`~cascade.methods.appealnet.controller.LambdaControllerHook`).
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
        approximator_loss: ApproximatorLoss = ApproximatorLoss.WEIGHTED,
        predictor_target: PredictorTarget = PredictorTarget.LOSS,
        eps: float = 1e-6,
    ):
        self.criterion = criterion
        self.oracle = oracle
        self.lam = lam
        self.approximator_loss = ApproximatorLoss(approximator_loss)
        self.predictor_target = PredictorTarget(predictor_target)
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
        if self.predictor_target == PredictorTarget.ERROR:
            l0 = (~self.criterion.correct(out.output, y)).float()
            c1 = self.criterion.correct(oracle_out, y) if oracle_out is not None else self.oracle.correct(x, y, self.criterion)
            l1 = (~c1).float()
        else:
            l0 = loss0
            l1 = (self.criterion.per_sample(oracle_out, y) if oracle_out is not None
                  else self.oracle.per_sample_loss(x, y, self.criterion)).detach()
        if self.approximator_loss == ApproximatorLoss.FULL or self.predictor_target == PredictorTarget.ERROR:
            l0 = l0.detach()
        system_risk = (q * l0 + (1 - q) * l1).mean()
        loss_p = -q.log().mean()
        loss = system_risk + self.lam * loss_p
        if self.approximator_loss == ApproximatorLoss.FULL or self.predictor_target == PredictorTarget.ERROR:
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
        if self.predictor_target == PredictorTarget.SAFE:
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
