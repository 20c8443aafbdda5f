"""A post-hoc deferral head: the strongest learned baseline a user would fit before
training anything jointly.

After the plain little network is trained and frozen, a logistic regression on what
AppealNet's head reads (the shared features, the sorted log-probabilities and the logit
statistics) learns, on the calibration split, whether keeping an input on this stage is
safe: the stage is right, or the stage an appealed input goes to is wrong too (so
appealing cannot help). In black-box mode the oracle is always right, so the target is
the stage's own correctness; in white-box mode it is what the cost actually pays for
(Jitkrittum et al., NeurIPS 2023, on post-hoc deferral in cascades).

The calibration split also picks the thresholds, so the head is cross-fitted: the split
is cut into ``folds`` stratified folds, one regression is fitted per fold on the others,
and each calibration input is scored by the regression that did not see it. New inputs
get the mean of the folds' logits, which is one linear model (the mean of their weights).
"""

from __future__ import annotations

import logging
from typing import Annotated

import numpy as np
import torch
from pydantic import Field
from torch import Tensor, nn

from cascade import (
    METHODS,
    CascadeError,
    MethodContext,
    MethodOptions,
    Predictor,
    StageOutput,
    TaskKind,
)
from cascade.nn.networks import head_input
from cascade.training.data import make_loader

log = logging.getLogger("cascade")

#: what the regression reads (see cascade.nn.networks.head_input)
INPUTS = ("features", "sorted_log_probs", "logit_stats")


class DeferralHeadOptions(MethodOptions):
    """``{name: deferral_head, folds: 5, C: 1.0}``: cross-fitting folds and the inverse
    L2 strength of the logistic regression (scikit-learn's ``C``)."""

    folds: Annotated[int, Field(ge=2)] = 5
    C: Annotated[float, Field(gt=0)] = 1.0


@METHODS.register("deferral_head")
class DeferralHeadScore(Predictor):
    """``P(keeping is safe | x)`` from a cross-fitted logistic regression on the calibration split.

    Attributes:
        weight: ``[S]`` the mean of the folds' coefficients over the standardized inputs.
        bias: the mean of their intercepts.
        cal_scores: the calibration split's out-of-fold scores, in its order.
    """

    Options = DeferralHeadOptions
    task_kinds = frozenset({TaskKind.CLASSIFICATION})
    default_for = frozenset({TaskKind.CLASSIFICATION})
    mode_dependent = True

    def __init__(self, options: DeferralHeadOptions | None = None) -> None:
        super().__init__(options)
        self.mean: Tensor | None = None
        self.std: Tensor | None = None
        self.weight: Tensor | None = None
        self.bias: Tensor | None = None
        self.cal_scores: Tensor | None = None

    @torch.no_grad()
    def _inputs_and_targets(self, network: nn.Module, context: MethodContext) -> tuple[np.ndarray, np.ndarray]:
        crit = context.task.criterion
        network.eval()
        zs, safe = [], []
        for x, y in make_loader(context.cal, 1024, False, 0):
            x, y = x.to(context.device), y.to(context.device)
            out = network(x)
            zs.append(self._raw(out).cpu())
            right = crit.correct(out.output, y)
            nxt = context.next_stage
            nxt_right = crit.correct(nxt(x).output, y) if nxt is not None else torch.ones_like(right)
            safe.append((right | ~nxt_right).cpu())
        return torch.cat(zs).numpy(), torch.cat(safe).numpy().astype(int)

    @staticmethod
    def _raw(out: StageOutput) -> Tensor:
        return head_input(INPUTS, out.features, out.output.double()).double()

    def prepare(self, network: nn.Module, context: MethodContext) -> None:
        """Cross-fit the regression on ``context.cal``.

        With fewer than ``folds`` inputs of one kind (safe or not) it uses as many folds
        as there are; with fewer than 2, every input gets the same score (and a warning).

        Raises:
            CascadeError: no calibration split.
        """
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import StratifiedKFold

        if context.cal is None:
            raise CascadeError("deferral_head: needs the calibration split (MethodContext.cal)")
        z, safe = self._inputs_and_targets(network, context)
        counts = np.bincount(safe, minlength=2)
        folds = min(self.options.folds, int(counts.min()))
        mean, std = z.mean(axis=0), z.std(axis=0) + 1e-6
        self.mean, self.std = torch.from_numpy(mean), torch.from_numpy(std)
        if folds < 2:  # nothing to learn: the same score for every input, said once
            log.warning("deferral_head: the calibration split has %d unsafe and %d safe inputs; too few to learn "
                        "from, so it scores every input alike (a larger cal_size helps)", counts[0], counts[1])
            self.weight = torch.zeros(z.shape[1], dtype=torch.float64)
            self.bias = torch.tensor(0.0, dtype=torch.float64)
            self.cal_scores = torch.full((len(z),), 0.5, dtype=torch.float64)
            return
        zs = (z - mean) / std
        oof = np.zeros(len(z))
        coefs, intercepts = [], []
        for fit_rows, held in StratifiedKFold(folds, shuffle=True, random_state=context.seed).split(zs, safe):
            reg = LogisticRegression(C=self.options.C, max_iter=2000).fit(zs[fit_rows], safe[fit_rows])
            oof[held] = reg.decision_function(zs[held])
            coefs.append(reg.coef_[0])
            intercepts.append(reg.intercept_[0])
        self.weight = torch.from_numpy(np.mean(coefs, axis=0))
        self.bias = torch.tensor(float(np.mean(intercepts)), dtype=torch.float64)
        self.cal_scores = torch.sigmoid(torch.from_numpy(oof))

    def score(self, stage: StageOutput) -> Tensor:
        if self.weight is None:
            raise RuntimeError("deferral_head is not fitted: call prepare() first")
        z = (self._raw(stage) - self.mean.to(stage.output.device)) / self.std.to(stage.output.device)
        return torch.sigmoid(z @ self.weight.to(z.device) + self.bias.to(z.device))
