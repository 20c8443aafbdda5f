"""Concrete networks, registered by name for the ``little:`` / ``big:`` config keys.

Every builder takes ``input_shape`` and ``num_outputs`` first and returns a
:class:`cascade.FeatureNet` (shared features + approximator head).
"""

from __future__ import annotations

import math
from typing import Sequence

from pydantic import PositiveInt
from torch import nn

from cascade import NETWORKS, FeatureNet, mlp


@NETWORKS.register("mlp")
def build_mlp(
    input_shape: tuple[int, ...], num_outputs: int, hidden: Sequence[PositiveInt] = (32,), dropout: float = 0.0
) -> FeatureNet:
    """Flatten, then fully-connected layers ``hidden`` with ReLU; a linear head."""
    if not hidden:
        raise ValueError("mlp needs at least one hidden layer (its last one is the shared features)")
    in_dim = math.prod(input_shape)
    features = nn.Sequential(nn.Flatten(), mlp([in_dim, *hidden]), nn.ReLU())
    if dropout > 0:
        features.append(nn.Dropout(dropout))
    return FeatureNet(features, nn.Linear(hidden[-1], num_outputs), hidden[-1])


@NETWORKS.register("cnn")
def build_cnn(
    input_shape: tuple[int, ...],
    num_outputs: int,
    channels: Sequence[PositiveInt] = (32, 64),
    hidden: PositiveInt = 128,
    pool: bool = True,
    dropout: float = 0.0,
) -> FeatureNet:
    """3x3 convolutions (``channels``, each followed by ReLU and a 2x2 max-pool when
    ``pool``), then one hidden fully-connected layer as the shared features."""
    c, h, w = input_shape
    layers: list[nn.Module] = []
    for out_c in channels:
        layers += [nn.Conv2d(c, out_c, 3, padding=1), nn.ReLU()]
        if pool:
            layers.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
        c = out_c
    layers += [nn.Flatten(), nn.Linear(c * h * w, hidden), nn.ReLU()]
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    return FeatureNet(nn.Sequential(*layers), nn.Linear(hidden, num_outputs), hidden)
