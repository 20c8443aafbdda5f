"""Confidence baselines (AppealNet Sec. 5.1): scores from the plain little network's softmax."""

from __future__ import annotations

from torch import Tensor

from cascade import METHODS, Predictor, StageOutput, TaskKind
from cascade.confidence import max_softmax, normalized_neg_entropy, top2_gap


def _probs(stage: StageOutput) -> Tensor:
    # float64: an overconfident network's float32 softmax saturates at 1.0 and ties
    # inputs that its logits still tell apart, which would handicap the baselines
    return stage.output.double().softmax(dim=-1)


@METHODS.register("msp")
class MaxSoftmaxScore(Predictor):
    """Maximum softmax probability ``max_k p_k``."""

    task_kinds = frozenset({TaskKind.CLASSIFICATION})
    default_for = frozenset({TaskKind.CLASSIFICATION})

    def score(self, stage: StageOutput) -> Tensor:
        return max_softmax(_probs(stage))


@METHODS.register("gap")
class GapScore(Predictor):
    """Top-2 margin ``p_(1) - p_(2)``."""

    task_kinds = frozenset({TaskKind.CLASSIFICATION})
    default_for = frozenset({TaskKind.CLASSIFICATION})

    def score(self, stage: StageOutput) -> Tensor:
        return top2_gap(_probs(stage))


@METHODS.register("entropy")
class EntropyScore(Predictor):
    """Negative entropy, rescaled to [0, 1] as ``1 - H(p) / log K`` (same ranking)."""

    task_kinds = frozenset({TaskKind.CLASSIFICATION})
    default_for = frozenset({TaskKind.CLASSIFICATION})

    def score(self, stage: StageOutput) -> Tensor:
        return normalized_neg_entropy(_probs(stage))
