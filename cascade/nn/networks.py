"""Network wrappers: a plain approximator, and the predictor head that reads a stage.

Every network registered in the ``networks`` registry is a :class:`FeatureNet`: a
``features`` module (input -> ``[B, F]``) and an approximator ``head`` (``[B, F]`` ->
task output). :class:`PredictorHead` is shared by AppealNet (whose
:class:`~cascade.methods.appealnet.head.TwoHeadNetwork` adds one to any of them) and the
REINFORCE stopping policy.
"""

from __future__ import annotations

from typing import Literal, Sequence, get_args

import torch
from torch import Tensor, nn

from cascade.nn.confidence import confidence_stats, logit_stats
from cascade.contracts.stages import Approximator, StageOutput

#: what a predictor head (or a stopping policy) may read; see :func:`head_input`
HeadInput = Literal["features", "sorted_probs", "sorted_log_probs", "confidence", "logit_stats", "output"]
HEAD_INPUTS = get_args(HeadInput)
#: the inputs that need label probabilities (a classification approximator)
CLASSIFICATION_INPUTS = frozenset({"sorted_probs", "sorted_log_probs", "confidence", "logit_stats"})

#: sorted log-probabilities are clipped here so a saturated softmax stays a finite input
_LOG_PROB_FLOOR = -20.0


def head_input_width(name: str, feature_dim: int, num_outputs: int) -> int:
    """Width of one named head input."""
    return {"features": feature_dim, "confidence": 3, "logit_stats": 2}.get(name, num_outputs)


def head_input(inputs: Sequence[str], features: Tensor | None, output: Tensor) -> Tensor:
    """The concatenated head inputs ``[B, S]`` read from a stage's features and output.

    Args:
        inputs: names from :data:`HEAD_INPUTS`: ``features`` (the shared features),
            ``sorted_probs`` (the softmax sorted descending), ``sorted_log_probs`` (the same
            in log space, floored at -20: it separates 0.99 from 0.999), ``confidence``
            (MSP, top-2 gap, normalized negative entropy), ``logit_stats`` (top-2 logit
            margin and MSP log-odds, which do not saturate in float32; unbounded), ``output``
            (the raw output, e.g. regression coordinates).
        features: ``[B, F]`` (needed only for ``features``).
        output: logits ``[B, K]`` or coordinates ``[B, D]``.
    """
    parts = []
    probs = output.softmax(dim=-1) if {"sorted_probs", "confidence"} & set(inputs) else None
    for name in inputs:
        if name == "features":
            if features is None:
                raise ValueError("the head reads features, but the stage does not expose them")
            parts.append(features)
        elif name == "sorted_probs":
            parts.append(probs.sort(dim=-1, descending=True).values)
        elif name == "sorted_log_probs":
            logp = output.log_softmax(dim=-1).clamp_min(_LOG_PROB_FLOOR)
            parts.append(logp.sort(dim=-1, descending=True).values)
        elif name == "confidence":
            parts.append(confidence_stats(probs))
        elif name == "logit_stats":
            parts.append(logit_stats(output))
        else:
            parts.append(output)
    return torch.cat(parts, dim=-1)


def mlp(sizes: Sequence[int], activation: type[nn.Module] = nn.ReLU, dropout: float = 0.0) -> nn.Sequential:
    """Fully-connected layers ``sizes[0] -> ... -> sizes[-1]`` with activations between."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(activation())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class FeatureNet(Approximator):
    """An approximator split into shared features and a task head.

    Args:
        features: input -> ``[B, F]``.
        head: ``[B, F]`` -> ``[B, K]`` logits or ``[B, D]`` coordinates.
        feature_dim: ``F``.
    """

    def __init__(self, features: nn.Module, head: nn.Module, feature_dim: int):
        super().__init__()
        self.features = features
        self.head = head
        self.feature_dim = feature_dim

    def forward(self, x: Tensor) -> StageOutput:
        h = self.features(x)  # [B, F]
        return StageOutput(output=self.head(h), features=h)


class PredictorHead(nn.Module):
    """AppealNet's predictor: reads the stage's features and/or outputs, ends in a sigmoid.

    Args:
        feature_dim: ``F`` of the shared features.
        num_outputs: ``K`` (classes) or ``D`` (coordinates) of the approximator.
        inputs: names from :data:`HEAD_INPUTS` (see :func:`head_input`); ``features``
            alone is the paper's choice.
        hidden: hidden layer widths; ``[]`` is the paper's single fully-connected layer.
        detach: stop the predictor's gradient at its inputs, so that ``-log q`` does not
            reshape the shared features or the approximator's output.
        classification: whether the approximator's outputs are logits.
        normalize: standardize the head's inputs (batch norm), which matters when it
            reads unbounded features next to probabilities.
    """

    def __init__(
        self,
        feature_dim: int,
        num_outputs: int,
        inputs: Sequence[str] = ("features",),
        hidden: Sequence[int] = (),
        detach: bool = False,
        classification: bool = True,
        normalize: bool = False,
    ):
        super().__init__()
        unknown = [i for i in inputs if i not in HEAD_INPUTS]
        if unknown or not inputs:
            raise ValueError(f"predictor inputs must be a non-empty subset of {HEAD_INPUTS}, got {list(inputs)}")
        if not classification and CLASSIFICATION_INPUTS & set(inputs):
            raise ValueError(f"{sorted(CLASSIFICATION_INPUTS)} need a classification approximator")
        self.inputs = tuple(inputs)
        self.detach = detach
        in_dim = sum(head_input_width(i, feature_dim, num_outputs) for i in self.inputs)
        self.norm = nn.BatchNorm1d(in_dim) if normalize else nn.Identity()
        self.net = mlp([in_dim, *hidden, 1])

    def forward(self, features: Tensor | None, output: Tensor) -> Tensor:
        if self.detach:
            features = features.detach() if features is not None else None
            output = output.detach()
        return torch.sigmoid(self.net(self.norm(head_input(self.inputs, features, output)))).squeeze(-1)  # [B]
