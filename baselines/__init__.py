"""Routing methods that are not AppealNet; importing this package registers them."""

from baselines.confidence import EntropyScore, GapScore, MaxSoftmaxScore
from baselines.regression import ErrorHeadScore, McDropoutScore

__all__ = ["EntropyScore", "ErrorHeadScore", "GapScore", "MaxSoftmaxScore", "McDropoutScore"]
