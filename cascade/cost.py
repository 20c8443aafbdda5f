"""Cost of a network: multiply-accumulates counted by ``torch.utils.flop_counter``.

The AppealNet paper's "FLOPs" are multiply-accumulates (MACs); ``FlopCounterMode``
counts a multiply-add as 2 FLOPs, so every figure here is its count divided by 2 and is
reported as "MFLOPs (MACs)". Only the operations the counter knows (matmul, convolution,
attention...) are counted; elementwise ops (activations, softmax) are not, as in the
paper's tables.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class NetworkCost:
    """Per-input cost: ``mflops`` in millions of multiply-accumulates, ``params`` count."""

    mflops: float
    params: int

    def as_dict(self) -> dict[str, float]:
        return {"mflops": self.mflops, "params": self.params}


def count_params(module: nn.Module) -> int:
    """Number of parameters (trainable or not)."""
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def measure_cost(module: nn.Module, input_shape: tuple[int, ...]) -> NetworkCost:
    """MACs of one forward pass on a single input of ``input_shape`` (no batch dim)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = module.training
    module.eval()
    device = next(module.parameters()).device
    x = torch.zeros(1, *input_shape, device=device)
    with FlopCounterMode(display=False) as counter:
        module(x)
    module.train(was_training)
    return NetworkCost(mflops=counter.get_total_flops() / 2 / 1e6, params=count_params(module))
