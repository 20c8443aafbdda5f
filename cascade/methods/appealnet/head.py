"""AppealNet's two-head network: a pre-trained stage plus a predictor head (Fig. 3)."""

from __future__ import annotations

from torch import Tensor

from cascade.contracts.stages import Approximator, StageOutput
from cascade.nn.networks import FeatureNet, PredictorHead


class TwoHeadNetwork(Approximator):
    """Shared features, the approximator head and a predictor head (AppealNet, Fig. 3).

    Args:
        base: the (usually pre-trained) approximator.
        predictor: its predictor head.
    """

    def __init__(self, base: FeatureNet, predictor: PredictorHead):
        super().__init__()
        self.base = base
        self.predictor = predictor
        self.feature_dim = base.feature_dim

    def train(self, mode: bool = True) -> "TwoHeadNetwork":
        """As ``nn.Module.train``, but a frozen base (no trainable parameter) stays in eval
        mode: training the head alone must not move its batch-norm statistics or dropout."""
        super().train(mode)
        if mode and not any(p.requires_grad for p in self.base.parameters()):
            self.base.eval()
        return self

    def forward(self, x: Tensor) -> StageOutput:
        out = self.base(x)
        return StageOutput(output=out.output, features=out.features, q=self.predictor(out.features, out.output))
