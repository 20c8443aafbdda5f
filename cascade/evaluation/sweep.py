"""The sweep: every operating point of a cascade's shared threshold, sorted once, cumulative sums.

The per-sample table (``samples.csv``) is the single source of truth: every operating
point is computed from it alone, so anyone can recompute them. A two-stage system
(AppealNet's case) is the cascade with K = 2.

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

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: slack on "cost <= budget" (MFLOPs) and on "AD <= target" (in inputs), for float rounding
TOL = 1e-9


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
    stop = scores >= threshold  # [N, K-1]
    return np.where(stop.any(axis=1), stop.argmax(axis=1), scores.shape[1])


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


def sorted_events(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The exit moves of every input as the threshold falls, highest value first.

    Returns:
        ``(rows, to, frm, value)``, each ``[M]``: input ``rows[e]``'s exit moves from stage
        ``frm[e]`` to the earlier ``to[e]`` once the threshold reaches ``value[e]``.
    """
    n, d = scores.shape
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
    return rows[order], to[order], frm[order], value[order]


def sweep_grid(value: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The operating points of a sorted event list: ``keep [G]`` indices into the
    ``M + 1`` running totals (0: before any event) and their thresholds ``[G]``
    (descending). A threshold between two distinct event values is a point; equal values
    move together."""
    m = len(value)
    boundary = np.concatenate([[True], value[:-1] > value[1:], [True]]) if m else np.array([True])
    if m:
        boundary[-1] = True
    keep = np.flatnonzero(boundary)
    above_all = np.nextafter(value[0], np.inf) if m else np.inf
    threshold = np.where(keep == 0, above_all, value[np.maximum(keep - 1, 0)] if m else above_all)
    return keep, np.asarray(threshold, dtype=np.float64)


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
    rows, to, frm, value = sorted_events(scores)
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
    keep, threshold = sweep_grid(value)
    return CascadeSweep(
        threshold=threshold,
        system_correct=correct_all[keep],
        total_mflops=cost_all[keep],
        exit_counts=counts_all[keep],
        n=n,
    )
