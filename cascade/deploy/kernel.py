"""The routing rule, once: stop at the first stage whose score reaches its threshold.

:class:`~cascade.deploy.router.Router` (a run's networks) and
:class:`~cascade.deploy.bundle.Bundle` (exported programs) both route with
:func:`route_rows`; the evaluation's numpy sweep (:func:`cascade.evaluation.exit_stages`)
is held to it by a property test (``tests/test_routing_kernel.py``). Only torch here: a
bundle routes with no training code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

#: a routed stage: a batch ``[m, ...]`` -> ``(output [m, ...], score [m])``, higher = answer here
StageFn = Callable[[Tensor], tuple[Tensor, Tensor]]


@dataclass
class StageVisit:
    """What one routed stage did with the rows that reached it (each field has length ``m``).

    Attributes:
        stage: the stage's index ``k``.
        rows: ``[m]`` the batch rows it ran on.
        output: ``[m, ...]`` its answers for them.
        score: ``[m]`` float64, its scores.
        stop: ``[m]`` bool, the rows it answered (``score >= thresholds[k]``).
    """

    stage: int
    rows: Tensor
    output: Tensor
    score: Tensor
    stop: Tensor


@dataclass
class Routing:
    """A batch routed down the cascade.

    Attributes:
        exit_stage: ``[B]`` the stage that answered each row; ``len(stages)`` (the last
            side: the big network or an oracle) for the rows no routed stage kept.
        visits: one :class:`StageVisit` per routed stage that ran, in order.
        remaining: ``[r]`` the rows no routed stage kept, for the last side.
    """

    exit_stage: Tensor
    visits: list[StageVisit]
    remaining: Tensor


def route_rows(x: Tensor, stages: Sequence[StageFn], thresholds: Sequence[float]) -> Routing:
    """Route ``x`` ``[B, ...]``: stage ``k`` runs only on the rows no earlier stage kept, and
    keeps those whose score is at least ``thresholds[k]``.

    Scores are compared in float64, the precision the run stored its scores in and chose
    the thresholds on. No stage runs on an empty batch. One host sync per stage that ran
    (counting the rows that go on, the next stage's batch size).
    """
    n, last = len(x), len(stages)
    exit_stage = torch.full((n,), last, dtype=torch.long, device=x.device)
    active = torch.arange(n, device=x.device)  # rows still travelling down the cascade
    visits = []
    for k, (stage, threshold) in enumerate(zip(stages, thresholds, strict=True)):
        if len(active) == 0:
            break
        output, q = stage(x if k == 0 else x[active])
        q = q.double()
        stop = q >= threshold  # [m]
        exit_stage[active] = torch.where(stop, k, last)
        visits.append(StageVisit(stage=k, rows=active, output=output, score=q, stop=stop))
        active = active[~stop]
    return Routing(exit_stage=exit_stage, visits=visits, remaining=active)
