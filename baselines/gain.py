"""A post-hoc rule that predicts what appealing gains: ``gain_head``, after Jitkrittum et
al. (NeurIPS 2023) on post-hoc deferral in cascades.

Confidence scores (MSP and its kin) rank inputs by how likely the little network is wrong;
they cannot see whether the stage an appealed input goes to would be right. Where the big
network is better on some inputs only (a specialist), that is what pays. ``gain_head``
estimates, for each input,

    gain(x) = P(next stage right | x) - P(little right | x)

by least squares: a small MLP regressor (scikit-learn's ``MLPRegressor``, one ReLU hidden
layer) is fitted to the per-input target ``next_right - little_right`` (in {-1, 0, 1}),
whose conditional mean is exactly the gain. It reads the little network's whole softmax
vector (not sorted, so it sees the predicted class: "the big network is good at sevens"),
optionally with its shared features, sorted log-probabilities or logit statistics
(``inputs``). One regression of the difference was chosen over two classifiers (big right,
little right) or a 4-outcome multinomial: it fits one model, needs no class present in
every fold, and its squared loss is bounded for a {-1, 0, 1} target.

The keep-score is ``(1 - gain) / 2`` clipped to [0, 1]: higher = keep, as every score;
appeal first where the big network gains most.

- White-box: ``next_right`` is the big network's (or the next routed stage's) correctness
  on the calibration split (``MethodContext.next_stage``).
- Black-box: the oracle is always right, so the target is ``1 - little_right`` and the
  rule reduces to a learned estimate of the little network's error.

The calibration split also picks the thresholds, so the rule is cross-fitted: the split is
cut into ``folds`` folds, one regressor is fitted on the others per fold, and each
calibration input is scored by the regressor that did not see it. New inputs get the mean
of the folds' predictions; the regressors' weights are kept as tensors, so the score is a
few matrix products and exports with the stage (``cascade export``).
"""

from __future__ import annotations

import logging
import warnings
from typing import Annotated, Literal

import numpy as np
import torch
from pydantic import Field, field_validator
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

GainInput = Literal["probs", "features", "sorted_log_probs", "logit_stats"]


class GainHeadOptions(MethodOptions):
    """``{name: gain_head, inputs: [probs], folds: 5, hidden: 32, alpha: 0.001, max_iter: 300}``:
    what the regressor reads (``probs``: the softmax vector; ``features``: the stage's shared
    features; ``sorted_log_probs``, ``logit_stats`` as AppealNet's head), the cross-fitting
    folds, its hidden width, L2 strength and most epochs (scikit-learn's ``MLPRegressor``)."""

    inputs: list[GainInput] = Field(default_factory=lambda: ["probs"], min_length=1)
    folds: Annotated[int, Field(ge=2)] = 5
    hidden: Annotated[int, Field(ge=1)] = 32
    alpha: Annotated[float, Field(ge=0)] = 1e-3
    max_iter: Annotated[int, Field(ge=1)] = 300

    @field_validator("inputs")
    @classmethod
    def _distinct(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"lists an input twice: {v}")
        return v


def gain_inputs(inputs: list[str], out: StageOutput) -> Tensor:
    """``[B, S]`` float64: the named inputs of one stage's output, concatenated."""
    logits = out.output.double()
    parts = []
    for name in inputs:
        if name == "probs":
            parts.append(logits.softmax(dim=-1))
        else:
            features = None if out.features is None else out.features.double()
            parts.append(head_input([name], features, logits).double())
    return torch.cat(parts, dim=1)


@METHODS.register("gain_head")
class GainHeadScore(Predictor):
    """``(1 - estimated gain of appealing) / 2``, from MLP regressors cross-fitted on the calibration split.

    Attributes:
        mean, std: ``[S]`` the standardization of the inputs (calibration split).
        w1: ``[F, S, H]``, b1: ``[F, H]``, w2: ``[F, H]``, b2: ``[F]``: each fold's regressor.
        cal_scores: the calibration split's out-of-fold scores, in its order.
        cal_gain: the calibration split's targets ``next_right - little_right``.
    """

    Options = GainHeadOptions
    task_kinds = frozenset({TaskKind.CLASSIFICATION})
    mode_dependent = True

    def __init__(self, options: GainHeadOptions | None = None) -> None:
        super().__init__(options)
        self.mean: Tensor | None = None
        self.std: Tensor | None = None
        self.w1: Tensor | None = None
        self.b1: Tensor | None = None
        self.w2: Tensor | None = None
        self.b2: Tensor | None = None
        self.cal_scores: Tensor | None = None
        self.cal_gain: np.ndarray | None = None

    @torch.no_grad()
    def _inputs_and_targets(self, network: nn.Module, context: MethodContext) -> tuple[np.ndarray, np.ndarray]:
        crit = context.task.criterion
        network.eval()
        zs, gain = [], []
        for x, y in make_loader(context.cal, 1024, False, 0):
            x, y = x.to(context.device), y.to(context.device)
            out = network(x)
            if "features" in self.options.inputs and out.features is None:
                raise CascadeError("gain_head: inputs lists 'features', but the stage exposes none; leave it out")
            zs.append(gain_inputs(self.options.inputs, out).cpu())
            right = crit.correct(out.output, y)
            nxt = context.next_stage  # None: the black-box oracle, always right
            nxt_right = crit.correct(nxt(x).output, y) if nxt is not None else torch.ones_like(right)
            gain.append((nxt_right.double() - right.double()).cpu())
        return torch.cat(zs).numpy(), torch.cat(gain).numpy()

    def prepare(self, network: nn.Module, context: MethodContext) -> None:
        """Cross-fit the regressors on ``context.cal``.

        With fewer inputs than ``folds`` it uses as many folds as there are; where the
        target is the same for every input (nothing to learn) every input gets that score
        (and a warning).

        Raises:
            CascadeError: no calibration split; ``features`` asked of a stage without them.
        """
        # scikit-learn: heavy, and needed only to fit
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.model_selection import KFold
        from sklearn.neural_network import MLPRegressor

        if context.cal is None:
            raise CascadeError("gain_head: needs the calibration split (MethodContext.cal)")
        z, gain = self._inputs_and_targets(network, context)
        self.cal_gain = gain
        mean, std = z.mean(axis=0), z.std(axis=0) + 1e-6
        self.mean, self.std = torch.from_numpy(mean), torch.from_numpy(std)
        folds = min(self.options.folds, len(z))
        if folds < 2 or np.ptp(gain) == 0:  # nothing to learn: that one gain for every input, said once
            log.warning("gain_head: appealing gains %s on every one of the %d calibration inputs; nothing to learn "
                        "from, so it scores every input alike", gain[0] if len(gain) else "nothing", len(gain))
            self._constant(z.shape[1], float(gain[0]) if len(gain) else 0.0, len(z))
            return
        zs = (z - mean) / std
        oof = np.zeros(len(z))
        regs = []
        for fit_rows, held in KFold(folds, shuffle=True, random_state=context.seed).split(zs):
            reg = MLPRegressor(hidden_layer_sizes=(self.options.hidden,), alpha=self.options.alpha,
                               max_iter=self.options.max_iter, random_state=context.seed)
            with warnings.catch_warnings():  # max_iter is the user's bound: reaching it is no news
                warnings.simplefilter("ignore", ConvergenceWarning)
                reg.fit(zs[fit_rows], gain[fit_rows])
            oof[held] = reg.predict(zs[held])
            regs.append(reg)
        self.w1 = torch.from_numpy(np.stack([r.coefs_[0] for r in regs]))
        self.b1 = torch.from_numpy(np.stack([r.intercepts_[0] for r in regs]))
        self.w2 = torch.from_numpy(np.stack([r.coefs_[1][:, 0] for r in regs]))
        self.b2 = torch.from_numpy(np.stack([r.intercepts_[1][0] for r in regs]))
        self.cal_scores = keep_score(torch.from_numpy(oof))

    def _constant(self, width: int, gain: float, n: int) -> None:
        """One zero-weight 'regressor' predicting ``gain``."""
        self.w1 = torch.zeros(1, width, 1, dtype=torch.float64)
        self.b1 = torch.zeros(1, 1, dtype=torch.float64)
        self.w2 = torch.zeros(1, 1, dtype=torch.float64)
        self.b2 = torch.tensor([gain], dtype=torch.float64)
        self.cal_scores = keep_score(torch.full((n,), gain, dtype=torch.float64))

    def gain(self, stage: StageOutput) -> Tensor:
        """``[B]`` the estimated gain of appealing: the mean of the folds' regressors."""
        if self.w1 is None:
            raise RuntimeError("gain_head is not fitted: call prepare() first")
        dev = stage.output.device
        z = (gain_inputs(self.options.inputs, stage) - self.mean.to(dev)) / self.std.to(dev)  # [B, S]
        hidden = torch.relu(torch.einsum("bs,fsh->fbh", z, self.w1.to(dev)) + self.b1.to(dev)[:, None, :])
        per_fold = torch.einsum("fbh,fh->fb", hidden, self.w2.to(dev)) + self.b2.to(dev)[:, None]  # [F, B]
        return per_fold.mean(dim=0)

    def score(self, stage: StageOutput) -> Tensor:
        return keep_score(self.gain(stage))


def keep_score(gain: Tensor) -> Tensor:
    """``(1 - gain) / 2`` clipped to [0, 1]: higher = keep (a gain of -1 keeps, +1 appeals)."""
    return ((1.0 - gain) / 2.0).clamp(0.0, 1.0)
