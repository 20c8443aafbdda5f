"""Operating points of a K-stage cascade from per-sample arrays: sort once, cumulative sums.

A cascade routes with one score per decision point, ``scores [N, K-1]`` (higher = stop
here), and a threshold ``t`` shared by every stage: input ``i`` exits at the first stage
``k < K-1`` with ``scores[i, k] >= t``, else at the last stage. Exiting at ``tau`` costs
the cumulative ``c_0 + ... + c_tau``. (A single shared threshold is our choice for the
baseline cascades; the scores are of one kind at every stage, and one number keeps the
curve a curve. The REINFORCE policy's greedy rule is the same with ``t = 0.5``.)

As ``t`` falls, each input's exit stage only moves earlier, and it moves exactly when
``t`` passes a *record* of its score sequence (a score above every earlier one): at most
``K - 1`` events per input. :func:`cascade_sweep` sorts the ``N (K - 1)`` events once and
accumulates correct answers, cost and exit counts, so every threshold's operating point
comes out in ``O(N K log(N K))`` with no Python loop over thresholds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd

#: slack on "cost <= budget" (MFLOPs) and on "AD <= target" (in inputs), for float rounding
_TOL = 1e-9


def cumulative_costs(stage_mflops: Sequence[float]) -> np.ndarray:
    """``[K]``: what exiting at each stage costs, ``c_0 + ... + c_k`` (every stage run is paid)."""
    return np.cumsum(np.asarray(stage_mflops, dtype=np.float64))


def exit_stages(scores: np.ndarray, threshold: float) -> np.ndarray:
    """``[N]`` exit stage of each input: the first ``k`` with ``scores[:, k] >= threshold``, else ``K-1``.

    Args:
        scores: ``[N, K-1]`` stop scores.
        threshold: the shared threshold.
    """
    scores = np.asarray(scores, dtype=np.float64)
    n, d = scores.shape
    stop = scores >= threshold  # [N, K-1]
    return np.where(stop.any(axis=1), stop.argmax(axis=1), d)


@dataclass(frozen=True)
class CascadePoint:
    """One threshold applied to one split.

    Attributes:
        threshold: the shared threshold.
        system_accuracy: fraction of inputs whose exit stage answered correctly.
        cost_mflops: mean cumulative cost per input.
        exit_fractions: ``[K]`` fraction of inputs exiting at each stage (sums to 1).
    """

    threshold: float
    system_accuracy: float
    cost_mflops: float
    exit_fractions: list[float]


def cascade_point(
    threshold: float, scores: np.ndarray, correct: np.ndarray, stage_mflops: Sequence[float]
) -> CascadePoint:
    """Route with ``threshold`` and measure accuracy, mean cost and exit fractions.

    Args:
        threshold: stop at the first stage whose score is ``>= threshold``.
        scores: ``[N, K-1]`` stop scores.
        correct: ``[N, K]`` bool, whether each stage's answer is right.
        stage_mflops: ``[K]`` per-stage costs (not cumulative).
    """
    correct = np.asarray(correct, dtype=bool)
    n, k = correct.shape
    tau = exit_stages(scores, threshold)
    cum = cumulative_costs(stage_mflops)
    counts = np.bincount(tau, minlength=k)
    return CascadePoint(
        threshold=float(threshold),
        system_accuracy=float(correct[np.arange(n), tau].mean()),
        cost_mflops=float(cum[tau].mean()),
        exit_fractions=(counts / n).tolist(),
    )


@dataclass(frozen=True)
class CascadeSweep:
    """Every operating point of one cascade's scores on one split, most expensive first.

    Point 0 (threshold above every score) sends every input to the last stage; the last
    point (threshold at the lowest score) stops every input at stage 0.

    Attributes:
        threshold: ``[M]`` the threshold of each point (descending).
        system_correct: ``[M]`` correct answers.
        total_mflops: ``[M]`` cost summed over the inputs (non-increasing).
        exit_counts: ``[M, K]`` inputs exiting at each stage.
        n: N.
    """

    threshold: np.ndarray
    system_correct: np.ndarray
    total_mflops: np.ndarray
    exit_counts: np.ndarray
    n: int

    @property
    def system_accuracy(self) -> np.ndarray:
        return self.system_correct / self.n

    @property
    def cost_mflops(self) -> np.ndarray:
        return self.total_mflops / self.n


def cascade_sweep(scores: np.ndarray, correct: np.ndarray, stage_mflops: Sequence[float]) -> CascadeSweep:
    """All operating points of a shared threshold over ``scores``; ties never split.

    Args:
        scores: ``[N, K-1]`` stop scores (higher = stop).
        correct: ``[N, K]`` bool, each stage's correctness.
        stage_mflops: ``[K]`` per-stage costs.

    Raises:
        ValueError: empty split or mismatched shapes.
    """
    scores = np.asarray(scores, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    n, k = correct.shape
    if n == 0:
        raise ValueError("cannot sweep an empty split")
    if scores.shape != (n, k - 1):
        raise ValueError(f"scores must be [N, K-1] = [{n}, {k - 1}], got {list(scores.shape)}")
    cum = cumulative_costs(stage_mflops)
    if len(cum) != k:
        raise ValueError(f"{len(cum)} stage costs for {k} stages")
    d = k - 1
    # the highest score before each decision; a decision is a record when it beats it
    before = np.concatenate([np.full((n, 1), -np.inf), np.maximum.accumulate(scores, axis=1)[:, :-1]], axis=1)
    record = scores > before  # [N, K-1]
    # exit stage just above each record's value: the next record, or the last stage
    leaving = np.empty((n, d), dtype=np.int64)
    nxt = np.full(n, d)
    for j in reversed(range(d)):  # K is small; the loop is over stages, not thresholds
        leaving[:, j] = nxt
        nxt = np.where(record[:, j], j, nxt)
    rows, to = np.nonzero(record)  # one event per record: the exit moves from leaving to `to`
    frm = leaving[rows, to]
    value = scores[rows, to]
    order = np.argsort(-value, kind="stable")
    rows, to, frm, value = rows[order], to[order], frm[order], value[order]
    d_correct = correct[rows, to].astype(np.int64) - correct[rows, frm].astype(np.int64)
    d_cost = cum[to] - cum[frm]
    d_counts = np.zeros((len(rows), k), dtype=np.int64)
    np.add.at(d_counts, (np.arange(len(rows)), to), 1)
    np.add.at(d_counts, (np.arange(len(rows)), frm), -1)
    start_counts = np.zeros(k, dtype=np.int64)
    start_counts[-1] = n
    correct_all = np.concatenate([[correct[:, -1].sum()], correct[:, -1].sum() + np.cumsum(d_correct)])
    cost_all = np.concatenate([[n * cum[-1]], n * cum[-1] + np.cumsum(d_cost)])
    counts_all = np.vstack([start_counts, start_counts + np.cumsum(d_counts, axis=0)])
    # a threshold between two distinct event values is a point; equal values move together
    m = len(value)
    boundary = np.concatenate([[True], value[:-1] > value[1:], [True]]) if m else np.array([True])
    if m:
        boundary[-1] = True
    keep = np.flatnonzero(boundary)  # indices into the (m + 1) running totals
    above_all = np.nextafter(value[0], np.inf) if m else np.inf
    threshold = np.where(keep == 0, above_all, value[np.maximum(keep - 1, 0)] if m else above_all)
    return CascadeSweep(
        threshold=np.asarray(threshold, dtype=np.float64),
        system_correct=correct_all[keep],
        total_mflops=cost_all[keep],
        exit_counts=counts_all[keep],
        n=n,
    )


@dataclass(frozen=True)
class Selection:
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


def select_by_cost(sweeps: Sequence[CascadeSweep], budget_mflops: float) -> Selection:
    """The most accurate point with mean cost ``<= budget_mflops`` (ties: the cheaper).

    Args:
        sweeps: one sweep per variant, all on the same split.
        budget_mflops: the mean cost allowed per input.

    Returns:
        The selection; when nothing fits the budget, the cheapest point, ``feasible=False``.
    """
    variant, threshold, acc, cost = _candidates(sweeps)
    ok = cost <= budget_mflops + _TOL
    if not ok.any():
        i = int(np.argmin(cost))
        return Selection(int(variant[i]), float(threshold[i]), False)
    idx = np.flatnonzero(ok)
    i = idx[np.lexsort((cost[idx], -acc[idx]))[0]]  # max accuracy, then min cost
    return Selection(int(variant[i]), float(threshold[i]), True)


def select_by_accuracy(sweeps: Sequence[CascadeSweep], min_correct: float) -> Selection:
    """The cheapest point with at least ``min_correct`` correct answers (ties: the more accurate).

    Used for a target accuracy degradation: ``min_correct = n * (acc_ref - target_ad)``.

    Returns:
        The selection; when no point is accurate enough, the most accurate, ``feasible=False``.
    """
    variant, threshold, acc, cost = _candidates(sweeps)
    n = sweeps[0].n
    ok = acc * n >= min_correct - _TOL
    if not ok.any():
        i = int(np.lexsort((cost, -acc))[0])
        return Selection(int(variant[i]), float(threshold[i]), False)
    idx = np.flatnonzero(ok)
    i = idx[np.lexsort((-acc[idx], cost[idx]))[0]]  # min cost, then max accuracy
    return Selection(int(variant[i]), float(threshold[i]), True)


@dataclass(frozen=True)
class Variant:
    """One trained cascade a method routes with: the ``samples.csv`` columns it reads.

    Attributes:
        system: column prefix of its stages (``plain``, ``appealnet``, ``reinforce_a0.1``).
        score: name of its stop score (``msp``, ``appealnet``, ``reinforce``...).
        stage_mflops: the cost of each of its K stages (with heads), first to last.
        alpha: the REINFORCE cost weight it was trained with (None for the others).
    """

    system: str
    score: str
    stage_mflops: tuple[float, ...]
    alpha: float | None = None


def variant_arrays(frame: pd.DataFrame, v: Variant, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``scores [N, K-1]`` and ``correct [N, K]`` of one variant from the per-sample table.

    Columns: ``<system>_s<k>_score_<score>`` for ``k < K-1`` and ``<system>_s<k>_correct``.
    """
    scores = np.stack([frame[f"{v.system}_s{j}_score_{v.score}"].to_numpy(np.float64) for j in range(k - 1)], axis=1)
    correct = np.stack([frame[f"{v.system}_s{j}_correct"].to_numpy(bool) for j in range(k)], axis=1)
    return scores, correct
