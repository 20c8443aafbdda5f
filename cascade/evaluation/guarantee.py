"""Guaranteed thresholds: Learn then Test.

Angelopoulos, Bates, Candès, Jordan & Lei 2021, arXiv:2110.01052, with fixed-sequence
testing and a binomial-tail p-value; the design is in :func:`select_guaranteed`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

from cascade.evaluation.selection import Pick
from cascade.evaluation.sweep import CascadeSweep


def degradation_scores(scores: np.ndarray, correct: np.ndarray) -> np.ndarray:
    """``[N]`` per input, the highest threshold at which it counts as a degradation.

    The loss controlled by :func:`select_guaranteed`: ``L_i(t) = 1`` when some routed stage
    ``k < K-1`` at or after input ``i``'s exit stage (at threshold ``t``) is wrong while the
    last stage is right. ``L_i(t) = 1`` exactly when ``t <= s_i``, where ``s_i`` is the
    running maximum of ``scores[i]`` at the last such "bad" stage (the input exits at or
    before it from that threshold down), ``-inf`` when there is none.

    Args:
        scores: ``[N, K-1]`` stop scores.
        correct: ``[N, K]`` bool, each stage's correctness.

    Returns:
        ``s [N]``: the loss count at threshold ``t`` is ``(s >= t).sum()``.
    """
    scores = np.asarray(scores, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    bad = ~correct[:, :-1] & correct[:, -1:]  # [N, K-1]: this stage wrong, the last one right
    last_bad = bad.shape[1] - 1 - np.argmax(bad[:, ::-1], axis=1)
    reach = np.maximum.accumulate(scores, axis=1)[np.arange(len(scores)), last_bad]
    return np.where(bad.any(axis=1), reach, -np.inf)


def binomial_p_value(losses: np.ndarray | int, n: int, target: float) -> np.ndarray:
    """The p-value of "risk > ``target``" given ``losses`` out of ``n``: ``P(Binom(n, target) <= losses)``.

    Valid (super-uniform) under that null: a larger risk makes small counts only rarer.
    At ``target = 0`` it is 1: no count certifies a zero risk.
    """
    # scipy.stats takes ~0.6 s to import and only these p-values need it: imported on first use
    from scipy.stats import binom

    return binom.cdf(losses, n, target)


@functools.lru_cache(maxsize=256)
def _certified_losses(n: int, target: float, level: float) -> int:
    """The largest loss count out of ``n`` whose p-value is ``<= level`` (-1: none)."""
    p = binomial_p_value(np.arange(n + 1), n, target)  # non-decreasing in the count
    return int(np.searchsorted(p, level, side="right")) - 1


def select_guaranteed(sweeps: Sequence[CascadeSweep], degradations: Sequence[np.ndarray], target: float,
                      delta: float) -> Pick:
    """The cheapest threshold certified to keep AD at most ``target`` on new data, with
    probability at least ``1 - delta`` over the calibration draw.

    Learn then Test (Angelopoulos, Bates, Candès, Jordan & Lei 2021, "Learn then Test:
    Calibrating Predictive Algorithms to Achieve Risk Control", arXiv:2110.01052), with
    fixed-sequence testing and an exact binomial-tail p-value:

    - *The loss.* ``AD = acc(last stage alone) - acc(system)`` = degradations (the system
      wrong, the last stage right) - rescues (the reverse), so the rate of degradations
      bounds AD from above. We control ``L_i(t)`` of :func:`degradation_scores`: some
      routed stage at or after input ``i``'s exit stage is wrong while the last one is
      right. It is at least the degradation indicator (the exit stage is one of those
      stages). For K = 2 it *is* that indicator (exits at the little network, which is
      wrong, while the big one is right); for K > 2 it is a conservative bound chosen
      because it is monotone per input: as ``t`` falls exits only move earlier, so the
      set of stages at or after the exit only grows. (The plain degradation indicator is
      not monotone for K > 2: an input may move from a wrong stage 1 to a right stage 0.)
      A black-box oracle is always right, so there ``L_i`` is "exits at a wrong stage".
    - *The tests.* For each threshold ``t`` of the calibration sweep, the null ``H_t``:
      ``risk(t) = E[L(t)] > target``, p-value ``P(Binom(n, target) <= k(t))`` with ``k(t)``
      the loss count (:func:`binomial_p_value`). Thresholds are tested from the highest
      (everything to the last stage) downward; testing stops at the first ``p > delta``
      and the lowest threshold certified is chosen (the cheapest: cost only falls with
      ``t``).
    - *Why it holds although the grid comes from the data* (the RCPS argument, Bates et
      al. 2021, "Distribution-free, risk-controlling prediction sets"): ``risk(t)`` and
      every ``k(t)`` are non-increasing in ``t``. Let ``t*`` be the highest threshold with
      ``risk(t*) > target`` (the set of such ``t`` is closed above, since ``risk(t) =
      P(s >= t)`` is left-continuous). Choosing any ``t`` with ``risk(t) > target`` needs a
      certified ``t <= t*``, hence ``k(t*) <= k(t)`` small enough for ``p <= delta``: an
      event of probability at most ``delta`` for the fixed ``t*``.
    - *Several variants* (a REINFORCE policy per alpha): Bonferroni, each variant tested
      at ``delta / V``; the cheapest certified point on the calibration split is chosen
      (ties: the more accurate, then the first variant). The union bound covers the choice.
    - *Nothing certified* (always at ``target = 0``: no count proves a zero risk): the
      threshold ``inf``, every input to the last stage, AD = 0 exactly; ``feasible`` stays
      True since that point meets any target.

    Args:
        sweeps: one calibration sweep per variant.
        degradations: each variant's :func:`degradation_scores` on the same split.
        target: the AD to stay under, a fraction.
        delta: the allowed probability of exceeding it, in (0, 1).

    Returns:
        The selection (``feasible`` always True).

    Raises:
        ValueError: ``delta`` outside (0, 1), or sweeps and degradations that do not match.
    """
    if not 0 < delta < 1:
        raise ValueError(f"delta must lie in (0, 1), got {delta}")
    if len(sweeps) != len(degradations) or not sweeps:
        raise ValueError(f"{len(sweeps)} sweeps for {len(degradations)} degradation arrays")
    level = delta / len(sweeps)
    best: tuple[float, float, int, float] | None = None  # (cost, -correct, variant, threshold)
    for i, (sw, s) in enumerate(zip(sweeps, degradations)):
        if len(s) != sw.n:
            raise ValueError(f"variant {i}: {len(s)} degradation scores for a sweep of {sw.n} inputs")
        losses = sw.n - np.searchsorted(np.sort(s), sw.threshold, side="left")  # [M] (s >= t).sum()
        failed = binomial_p_value(losses, sw.n, target) > level
        certified = int(np.argmax(failed)) if failed.any() else len(failed)  # fixed sequence: stop at the first
        if certified:
            j = certified - 1
            candidate = (sw.total_mflops[j], -sw.system_correct[j], i, float(sw.threshold[j]))
        else:
            candidate = (sw.total_mflops[0], -sw.system_correct[0], i, np.inf)
        if best is None or candidate[:3] < best[:3]:
            best = candidate
    return Pick(best[2], best[3], True)
