"""Routing methods that are not AppealNet; importing this package registers them."""

from baselines.confidence import EntropyScore, GapScore, MaxSoftmaxScore

__all__ = ["EntropyScore", "GapScore", "MaxSoftmaxScore"]
