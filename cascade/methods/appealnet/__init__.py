"""AppealNet (Li et al.) as a trained routing method: a predictor head on each routed stage.

METHOD.md section 1. Each routed stage ``k`` becomes a two-head network (the pre-trained
stage plus a :class:`~cascade.nn.networks.PredictorHead`) fine-tuned jointly with
:class:`~cascade.methods.appealnet.objective.AppealNetObjective` against the stage an appealed input
actually goes to: the next plain stage (white-box), or the cascade's last stage (the big
network in white-box mode, Eq. 11; the black-box oracle, Eq. 12). With one routed stage
this is the paper's two-stage system. The head's ``q(x)`` is the score (higher = keep).

The package: :mod:`~cascade.methods.appealnet.method` (the registered method and its
options), :mod:`~cascade.methods.appealnet.objective` (the loss),
:mod:`~cascade.methods.appealnet.head` (the two-head network) and
:mod:`~cascade.methods.appealnet.controller` (the lambda controller hook).
"""

from cascade.methods.appealnet.controller import LambdaControllerHook
from cascade.methods.appealnet.head import TwoHeadNetwork
from cascade.methods.appealnet.method import AppealNet, AppealNetOptions, LambdaOptions, PredictorOptions
from cascade.methods.appealnet.objective import DIRECT_TARGETS, AppealNetObjective, ApproximatorLoss, PredictorTarget

__all__ = [
    "DIRECT_TARGETS",
    "AppealNet",
    "AppealNetObjective",
    "AppealNetOptions",
    "ApproximatorLoss",
    "LambdaControllerHook",
    "LambdaOptions",
    "PredictorOptions",
    "PredictorTarget",
    "TwoHeadNetwork",
]
