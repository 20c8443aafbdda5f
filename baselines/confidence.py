"""Confidence baselines: scores from the plain little network's logits.

MSP, Gap and Entropy are AppealNet's (Sec. 5.1). The rest are what a user would try
first today, all on the same plain network:

- ``msp_ts``: MSP after temperature scaling (Guo et al. 2017), the temperature fitted
  by NLL on the calibration split;
- ``doctor``: DOCTOR's Gini score ``sum_k p_k^2`` (Granese et al. 2021; its detector
  flags ``1 - sum_k p_k^2``);
- ``energy``: the negative free energy ``logsumexp_k z_k`` (Liu et al. 2020), squashed
  into [0, 1] by a strictly increasing map (same ranking).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from cascade import METHODS, MethodContext, Predictor, StageOutput, TaskKind
from cascade.nn.confidence import max_softmax, normalized_neg_entropy, top2_gap
from cascade.training.data import make_loader


def _probs(stage: StageOutput) -> Tensor:
    # float64: an overconfident network's float32 softmax saturates at 1.0 and ties
    # inputs that its logits still tell apart, which would handicap the baselines
    return stage.output.double().softmax(dim=-1)


@METHODS.register("msp")
class MaxSoftmaxScore(Predictor):
    """Maximum softmax probability ``max_k p_k``."""

    task_kinds = frozenset({TaskKind.CLASSIFICATION})
    default_for = frozenset({TaskKind.CLASSIFICATION})
    confidence_score = True

    def score(self, stage: StageOutput) -> Tensor:
        return max_softmax(_probs(stage))


@METHODS.register("gap")
class GapScore(Predictor):
    """Top-2 margin ``p_(1) - p_(2)``."""

    task_kinds = frozenset({TaskKind.CLASSIFICATION})
    default_for = frozenset({TaskKind.CLASSIFICATION})
    confidence_score = True

    def score(self, stage: StageOutput) -> Tensor:
        return top2_gap(_probs(stage))


@METHODS.register("entropy")
class EntropyScore(Predictor):
    """Negative entropy, rescaled to [0, 1] as ``1 - H(p) / log K`` (same ranking)."""

    task_kinds = frozenset({TaskKind.CLASSIFICATION})
    default_for = frozenset({TaskKind.CLASSIFICATION})
    confidence_score = True

    def score(self, stage: StageOutput) -> Tensor:
        return normalized_neg_entropy(_probs(stage))


@METHODS.register("doctor")
class DoctorScore(Predictor):
    """DOCTOR's Gini confidence ``sum_k p_k^2`` (in [1/K, 1]; 1 - DOCTOR's uncertainty)."""

    task_kinds = frozenset({TaskKind.CLASSIFICATION})
    default_for = frozenset({TaskKind.CLASSIFICATION})
    confidence_score = True

    def score(self, stage: StageOutput) -> Tensor:
        return _probs(stage).pow(2).sum(dim=-1)


def squash(x: Tensor) -> Tensor:
    """A strictly increasing map of the reals onto (0, 1), ``(1 + x / (1 + |x|)) / 2``.

    Unlike a sigmoid it does not round to 1.0 in float64 until ``|x|`` nears 1e16, so
    unbounded scores keep their ranking.
    """
    return 0.5 * (1.0 + x / (1.0 + x.abs()))


@METHODS.register("energy")
class EnergyScore(Predictor):
    """The negative free energy ``logsumexp_k z_k`` of the logits, squashed into (0, 1)."""

    task_kinds = frozenset({TaskKind.CLASSIFICATION})
    default_for = frozenset({TaskKind.CLASSIFICATION})
    confidence_score = True

    def score(self, stage: StageOutput) -> Tensor:
        return squash(torch.logsumexp(stage.output.double(), dim=-1))


@METHODS.register("msp_ts")
class TemperatureScaledScore(Predictor):
    """MSP of ``softmax(z / T)``, with ``T`` minimizing the NLL on the calibration split.

    Temperature scaling changes more than calibration: ``max_k softmax(z / T)`` ranks
    inputs by the logit margin as ``T -> 0`` and by ``z_max - mean(z)`` as ``T`` grows, so
    the fitted ``T`` can reorder inputs. One scalar fitted on the split the thresholds
    are chosen on overfits it negligibly.

    Attributes:
        temperature: the fitted ``T`` (1 until :meth:`prepare`).
    """

    task_kinds = frozenset({TaskKind.CLASSIFICATION})
    default_for = frozenset({TaskKind.CLASSIFICATION})
    confidence_score = True

    def __init__(self, options=None) -> None:
        super().__init__(options)
        self.temperature = 1.0

    @torch.no_grad()
    def prepare(self, network: nn.Module, context: MethodContext) -> None:
        """Fit ``T`` by NLL on ``context.cal`` (bounded search over ``log T`` in [-3, 3])."""
        from scipy.optimize import minimize_scalar

        if context.cal is None:
            return
        network.eval()
        logits, labels = [], []
        for x, y in make_loader(context.cal, 1024, False, 0):
            logits.append(network(x.to(context.device)).output.double().cpu())
            labels.append(y)
        z, y = torch.cat(logits), torch.cat(labels)

        def nll(log_t: float) -> float:
            return float(nn.functional.cross_entropy(z / math.exp(log_t), y))

        self.temperature = math.exp(minimize_scalar(nll, bounds=(-3.0, 3.0), method="bounded").x)

    def score(self, stage: StageOutput) -> Tensor:
        return max_softmax((stage.output.double() / self.temperature).softmax(dim=-1))
