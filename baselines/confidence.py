"""Confidence baselines (AppealNet Sec. 5.1): scores from the plain little network's softmax."""

from __future__ import annotations

from torch import Tensor

from cascade import METHODS, Predictor, StageOutput
from cascade.confidence import max_softmax, normalized_neg_entropy, top2_gap


@METHODS.register("msp")
class MaxSoftmaxScore(Predictor):
    """Maximum softmax probability ``max_k p_k``."""

    name = "msp"

    def score(self, stage: StageOutput) -> Tensor:
        return max_softmax(stage.output.softmax(dim=-1))


@METHODS.register("gap")
class GapScore(Predictor):
    """Top-2 margin ``p_(1) - p_(2)``."""

    name = "gap"

    def score(self, stage: StageOutput) -> Tensor:
        return top2_gap(stage.output.softmax(dim=-1))


@METHODS.register("entropy")
class EntropyScore(Predictor):
    """Negative entropy, rescaled to [0, 1] as ``1 - H(p) / log K`` (same ranking)."""

    name = "entropy"

    def score(self, stage: StageOutput) -> Tensor:
        return normalized_neg_entropy(stage.output.softmax(dim=-1))
