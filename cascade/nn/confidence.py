"""Confidence statistics of a classifier's softmax, shared by the baselines and the
predictor head's inputs. All are "higher = more confident"."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def max_softmax(probs: Tensor) -> Tensor:
    """MSP: ``max_k p_k``. probs ``[B, K]`` -> ``[B]``."""
    return probs.max(dim=-1).values


def top2_gap(probs: Tensor) -> Tensor:
    """Margin between the two largest probabilities ``p_(1) - p_(2)``. ``[B, K]`` -> ``[B]``."""
    top2 = probs.topk(2, dim=-1).values  # [B, 2]
    return top2[:, 0] - top2[:, 1]


def normalized_neg_entropy(probs: Tensor) -> Tensor:
    """``1 - H(p) / log K``, in [0, 1].

    A positive affine map of the paper's score ``sum_k p_k log p_k``, so it ranks inputs
    identically (same operating points) while staying in [0, 1] like every Predictor.
    ``0 log 0`` is taken as 0.
    """
    k = probs.shape[-1]
    plogp = torch.where(probs > 0, probs * probs.clamp_min(1e-30).log(), torch.zeros_like(probs))
    return 1.0 + plogp.sum(dim=-1) / math.log(k)


def confidence_stats(probs: Tensor) -> Tensor:
    """``[B, K]`` -> ``[B, 3]``: MSP, top-2 gap and normalized negative entropy."""
    return torch.stack([max_softmax(probs), top2_gap(probs), normalized_neg_entropy(probs)], dim=-1)


def logit_stats(logits: Tensor) -> Tensor:
    """``[B, K]`` logits -> ``[B, 2]``: the top-2 logit margin and the log-odds of the MSP.

    Unlike probabilities these do not saturate: a float32 softmax rounds every confident
    input's MSP to 1.0, while ``log(p1 / (1 - p1)) = -logsumexp_{k != 1}(z_k - z_1)`` keeps
    ranking them.
    """
    top = logits.sort(dim=-1, descending=True).values  # [B, K]
    margin = top[:, 0] - top[:, 1]
    log_odds = -torch.logsumexp(top[:, 1:] - top[:, :1], dim=-1)
    return torch.stack([margin, log_odds], dim=-1)
