"""AppealNet's dynamic Lagrange multiplier, a training hook (App. B.2)."""

from __future__ import annotations

from typing import Any

from cascade.methods.appealnet.objective import AppealNetObjective
from cascade.training.hooks import HookBase
from cascade.training.trainer import Trainer


class LambdaControllerHook(HookBase):
    """Dynamic Lagrange multiplier (AppealNet App. B.2, after DeVries & Taylor 2018).

    After each step: if ``L_P > budget`` raise lambda (``lambda /= up``), else lower it
    (``lambda /= down``). This holds ``E[-log q]`` near the budget and keeps the predictor
    from collapsing to ``q = 1``.

    Args:
        objective: the AppealNet objective whose ``lam`` is adjusted.
        budget: the target for ``L_P`` (the paper's beta, 0.5).
        up: divisor applied when ``L_P`` is over budget (< 1 raises lambda).
        down: divisor applied otherwise (> 1 lowers lambda).
    """

    def __init__(self, objective: AppealNetObjective, budget: float = 0.5, up: float = 0.99, down: float = 1.01):
        self.objective = objective
        self.budget, self.up, self.down = budget, up, down

    def after_step(self, trainer: Trainer, losses: dict[str, float]) -> None:
        self.objective.lam /= self.up if losses["L_P"] > self.budget else self.down

    def state_dict(self) -> dict[str, Any]:
        return {"lam": self.objective.lam}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.objective.lam = state["lam"]
