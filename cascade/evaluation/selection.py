"""The selection rules: which variant's threshold meets a cost budget, an appeal budget or
an accuracy target.

Each rule looks at every point of one sweep per variant (all on the same split) and picks
one; :func:`cascade.evaluation.guarantee.select_guaranteed` is the third rule, certified.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cascade.evaluation.sweep import TOL, CascadeSweep


@dataclass(frozen=True)
class Pick:
    """Which variant's threshold a selection rule picked.

    Attributes:
        variant: index into the list of sweeps (e.g. the policy trained with each alpha).
        threshold: the threshold.
        feasible: False when no point met the constraint (the closest one is returned).
    """

    variant: int
    threshold: float
    feasible: bool


def _candidates(sweeps: Sequence[CascadeSweep]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    variant = np.concatenate([np.full(len(s.threshold), i) for i, s in enumerate(sweeps)])
    threshold = np.concatenate([s.threshold for s in sweeps])
    acc = np.concatenate([s.system_accuracy for s in sweeps])
    cost = np.concatenate([s.cost_mflops for s in sweeps])
    return variant, threshold, acc, cost


def select_by_cost(sweeps: Sequence[CascadeSweep], budget_mflops: float) -> Pick:
    """The most accurate point with mean cost ``<= budget_mflops`` (ties: the cheaper).

    Args:
        sweeps: one sweep per variant, all on the same split.
        budget_mflops: the mean cost allowed per input.

    Returns:
        The selection; when nothing fits the budget, the cheapest point, ``feasible=False``.
    """
    variant, threshold, acc, cost = _candidates(sweeps)
    ok = cost <= budget_mflops + TOL
    if not ok.any():
        i = int(np.argmin(cost))
        return Pick(int(variant[i]), float(threshold[i]), False)
    idx = np.flatnonzero(ok)
    i = idx[np.lexsort((cost[idx], -acc[idx]))[0]]  # max accuracy, then min cost
    return Pick(int(variant[i]), float(threshold[i]), True)


def select_by_accuracy(sweeps: Sequence[CascadeSweep], min_correct: float) -> Pick:
    """The cheapest point with at least ``min_correct`` correct answers (ties: the more accurate).

    Used for a target accuracy degradation: ``min_correct = n * (acc_ref - target_ad)``.

    Returns:
        The selection; when no point is accurate enough, the most accurate, ``feasible=False``.
    """
    variant, threshold, acc, cost = _candidates(sweeps)
    n = sweeps[0].n
    ok = acc * n >= min_correct - TOL
    if not ok.any():
        i = int(np.lexsort((cost, -acc))[0])
        return Pick(int(variant[i]), float(threshold[i]), False)
    idx = np.flatnonzero(ok)
    i = idx[np.lexsort((-acc[idx], cost[idx]))[0]]  # min cost, then max accuracy
    return Pick(int(variant[i]), float(threshold[i]), True)


def select_by_appeal_rate(sweeps: Sequence[CascadeSweep], budget: float) -> Pick:
    """The most accurate point whose appeal rate is at most ``budget`` (ties: fewer appeals,
    then the cheaper).

    The appeal rate is the fraction of inputs that reach the last stage (the big network or
    the oracle), the ``appeal_rate`` of every operating point; with two stages it is the
    fraction sent past stage 0. With more stages the intermediate ones are not bounded:
    their cost is what ``select_by_cost`` bounds.

    Args:
        sweeps: one sweep per variant, all on the same split.
        budget: the fraction of inputs allowed to reach the last stage, in (0, 1].

    Returns:
        The selection. The point that stops every input at stage 0 appeals none, so a
        budget >= 0 is always met; below 0, the point with fewest appeals, ``feasible=False``.
    """
    variant, threshold, acc, cost = _candidates(sweeps)
    appeals = np.concatenate([s.exit_counts[:, -1] for s in sweeps])
    ok = appeals <= budget * sweeps[0].n + TOL
    if not ok.any():
        i = int(np.lexsort((cost, -acc, appeals))[0])
        return Pick(int(variant[i]), float(threshold[i]), False)
    idx = np.flatnonzero(ok)
    i = idx[np.lexsort((cost[idx], appeals[idx], -acc[idx]))[0]]  # max accuracy, then fewest appeals, cheapest
    return Pick(int(variant[i]), float(threshold[i]), True)
