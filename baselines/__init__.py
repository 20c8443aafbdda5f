"""Routing methods that are not AppealNet; importing this package registers them."""

from baselines.confidence import (
    DoctorScore,
    EnergyScore,
    EntropyScore,
    GapScore,
    MaxSoftmaxScore,
    TemperatureScaledScore,
)
from baselines.deferral import DeferralHeadScore
from baselines.gain import GainHeadScore
from baselines.regression import ErrorHeadScore, McDropoutScore

__all__ = ["DeferralHeadScore", "DoctorScore", "EnergyScore", "EntropyScore", "ErrorHeadScore", "GainHeadScore",
           "GapScore", "MaxSoftmaxScore", "McDropoutScore", "TemperatureScaledScore"]
