"""Operating points of a cascade from per-sample arrays: sort once, cumulative sums.

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

import functools
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pandas as pd

#: slack on "cost <= budget" (MFLOPs) and on "AD <= target" (in inputs), for float rounding
_TOL = 1e-9

#: where a target-AD point's threshold comes from (``points.csv``'s ``threshold_source``),
#: the deployable ones first; budgets and matched costs use ``val`` and ``test`` too
THRESHOLD_SOURCES = {
    "val": "chosen on the calibration split",
    "guaranteed": "certified on the calibration split (Learn then Test): AD <= target with probability >= 1 - delta",
    "test": "read off the test split (as the paper; not deployable)",
}


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


def _sorted_events(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
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


def _grid(value: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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
    rows, to, frm, value = _sorted_events(scores)
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
    keep, threshold = _grid(value)
    return CascadeSweep(
        threshold=threshold,
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


# ---------------------------------------------------------------------------- guaranteed thresholds
#
# Learn then Test (Angelopoulos, Bates, Candès, Jordan & Lei 2021, arXiv:2110.01052) with
# fixed-sequence testing and a binomial-tail p-value; the design is in select_guaranteed.


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
    from scipy.stats import binom

    return binom.cdf(losses, n, target)


@functools.lru_cache(maxsize=256)
def _certified_losses(n: int, target: float, level: float) -> int:
    """The largest loss count out of ``n`` whose p-value is ``<= level`` (-1: none)."""
    p = binomial_p_value(np.arange(n + 1), n, target)  # non-decreasing in the count
    return int(np.searchsorted(p, level, side="right")) - 1


def select_guaranteed(sweeps: Sequence[CascadeSweep], degradations: Sequence[np.ndarray], target: float,
                      delta: float) -> Selection:
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
    return Selection(best[2], best[3], True)


@dataclass(frozen=True)
class Variant:
    """One routed system of one method in one mode: the ``samples.csv`` columns it reads.

    Attributes:
        method: the method's label (``msp``, ``appealnet``...).
        mode: ``white_box`` or ``black_box``.
        variant: names one of several systems a method trained (``a0.01``), else ``""``.
        score_columns: ``[K-1]`` the score column after each routed stage.
        correct_columns: ``[K]`` each stage's correctness column; None for a black-box
            oracle (always right).
        stage_mflops: ``[K]`` each stage's cost (routed ones with their heads).
        fixed_threshold: the method's own threshold (REINFORCE's greedy 0.5), else None.
    """

    method: str
    mode: str
    variant: str
    score_columns: tuple[str, ...]
    correct_columns: tuple[str | None, ...]
    stage_mflops: tuple[float, ...]
    fixed_threshold: float | None = None


def variant_arrays(frame: pd.DataFrame, v: Variant) -> tuple[np.ndarray, np.ndarray]:
    """``scores [N, K-1]`` and ``correct [N, K]`` of one variant from the per-sample table."""
    n = len(frame)
    scores = np.stack([frame[c].to_numpy(np.float64) for c in v.score_columns], axis=1)
    correct = np.stack([np.ones(n, bool) if c is None else frame[c].to_numpy(bool) for c in v.correct_columns], axis=1)
    return scores, correct


def sweep_costs(v: Variant) -> tuple[float, ...]:
    """The costs to sweep with: an unknown oracle cost (None, only ever the last stage) is
    taken as 1, which ranks a two-stage system's points exactly as any positive cost
    would; the points' costs are then reported as unknown."""
    return tuple(1.0 if c is None else c for c in v.stage_mflops)


_BASE = {"target_ad": None, "budget_fraction": None, "target_mflops": None, "anchor": None, "delta": None}

#: the method name of the oracle router's rows: the limit every router is measured against
ORACLE = "oracle"


def oracle_scores(correct: np.ndarray, seed: int) -> np.ndarray:
    """``[N, K-1]`` stop scores of the oracle router, which knows every stage's correctness.

    Stopping at stage ``k`` is *safe* when stage ``k`` is right or the last stage is wrong
    too (the AD, measured against the last stage, cannot grow). Safe stages score 1, so
    the oracle exits at the cheapest safe stage; unsafe ones score a random value in
    [0, 0.5), the same for all stages of an input, so that lower thresholds keep unsafe
    inputs one at a time, in random order: any order costs the same, each adds ``1/N`` to
    the AD. With two stages the sweep is then exactly the cheapest router at every AD.

    Args:
        correct: ``[N, K]`` each stage's correctness, the last stage's in the last column.
        seed: fixes the order of the unsafe inputs.
    """
    correct = np.asarray(correct, dtype=bool)
    safe = correct[:, :-1] | ~correct[:, -1:]  # [N, K-1]
    order = np.random.default_rng(seed).random(len(correct))[:, None] * 0.5  # [N, 1]
    return np.where(safe, 1.0, order)


def operating_points(samples: pd.DataFrame, variants: Sequence[Variant], targets: dict[str, list[float]],
                     budgets: Sequence[float] = (), delta: float = 0.1,
                     oracles: Sequence[Variant] = ()) -> list[dict]:
    """Every operating point of every variant, per seed, from the per-sample table.

    Selections (the ``selection`` field), each with thresholds read off the test split
    (``threshold_source = test``, as the papers) and chosen on the calibration split
    (``val``) then applied to test:

    - ``target_ad``: the cheapest point with accuracy degradation ``AD = acc(last stage
      alone) - acc(system)`` at or under each target of the mode (black-box: ``1 - acc``);
      also ``threshold_source = guaranteed``: the cheapest threshold certified on the
      calibration split to keep AD under the target with probability ``>= 1 - delta``
      (:func:`select_guaranteed`; the row's ``delta`` field, None on other rows);
    - ``budget``: the most accurate point whose mean cost is at most each fraction of
      the last stage's cost;
    - ``fixed``: a variant's own threshold (``threshold_source = fixed``); and
      ``matched_cost``: every other method at that point's mean cost (``anchor`` names it).

    A method with several variants is judged by the best of them at each selection.

    Args:
        samples: the per-sample table (``seed``, ``split`` cal|test and the variants' columns).
        variants: every routed system of every method and mode.
        targets: ``mode -> AD targets`` (fractions).
        budgets: mean-cost budgets, fractions of the last stage's cost.
        delta: the guaranteed points' allowed probability of missing their target.
        oracles: per mode, the plain stages' correctness and costs (``score_columns``
            unused): the oracle router (:func:`oracle_scores`), reported as method
            :data:`ORACLE` at each target AD with test thresholds, the limit.

    Returns:
        One dict per (seed, mode, method, selection, source, target / budget / anchor).
    """
    by_method: dict[tuple[str, str], list[Variant]] = {}
    for v in variants:
        by_method.setdefault((v.mode, v.method), []).append(v)
    rows: list[dict] = []
    for seed, frame in samples.groupby("seed", sort=True):
        split = {name: part for name, part in frame.groupby("split")}
        arrays = {s: {v: variant_arrays(split[s], v) for v in variants} for s in ("cal", "test")}
        sweeps = {s: {v: cascade_sweep(*arrays[s][v], sweep_costs(v)) for v in variants} for s in ("cal", "test")}
        for o in oracles:
            correct = np.stack([np.ones(len(split["test"]), bool) if c is None else split["test"][c].to_numpy(bool)
                                for c in o.correct_columns], axis=1)
            arrays["test"][o] = (oracle_scores(correct, int(seed)), correct)

        def point(vs: list[Variant], sel: Selection, **fields: Any) -> dict:
            v = vs[sel.variant]
            sc, co = arrays["test"][v]
            p = cascade_point(sel.threshold, sc, co, sweep_costs(v))
            ref = float(co[:, -1].mean())
            known = v.stage_mflops[-1] is not None
            return {
                "seed": int(seed), "mode": v.mode, "method": v.method, **(_BASE | fields), "variant": v.variant,
                "feasible": sel.feasible, "threshold": p.threshold, "system_accuracy": p.system_accuracy,
                "cost_mflops": p.cost_mflops if known else None,
                "relative_cost": p.cost_mflops / v.stage_mflops[-1] if known else None,
                "ad": ref - p.system_accuracy, "skipping_rate": 1.0 - p.exit_fractions[-1],
                "appeal_rate": p.exit_fractions[-1], "exit_fractions": p.exit_fractions,
            }

        for (mode, method), vs in by_method.items():
            for source in ("test", "val"):
                split_name = "cal" if source == "val" else "test"
                sw = [sweeps[split_name][v] for v in vs]
                for t in targets[mode]:
                    ref = float(arrays[split_name][vs[0]][1][:, -1].mean())
                    sel = select_by_accuracy(sw, sw[0].n * (ref - t))
                    rows.append(point(vs, sel, selection="target_ad", threshold_source=source, target_ad=t))
                for b in budgets if vs[0].stage_mflops[-1] is not None else ():  # no cost, no budget
                    sel = select_by_cost(sw, b * vs[0].stage_mflops[-1])
                    rows.append(point(vs, sel, selection="budget", threshold_source=source, budget_fraction=b,
                                      target_mflops=b * vs[0].stage_mflops[-1]))
            cal_sweeps = [sweeps["cal"][v] for v in vs]
            degradations = [degradation_scores(*arrays["cal"][v]) for v in vs]
            for t in targets[mode]:
                rows.append(point(vs, select_guaranteed(cal_sweeps, degradations, t, delta), selection="target_ad",
                                  threshold_source="guaranteed", target_ad=t, delta=delta))
        for o in oracles:
            sw = cascade_sweep(*arrays["test"][o], sweep_costs(o))
            ref = float(arrays["test"][o][1][:, -1].mean())
            for t in targets[o.mode]:
                rows.append(point([o], select_by_accuracy([sw], sw.n * (ref - t)), selection="target_ad",
                                  threshold_source="test", target_ad=t))
        for v in variants:
            if v.fixed_threshold is None:
                continue
            fixed = point([v], Selection(0, v.fixed_threshold, True), selection="fixed", threshold_source="fixed",
                          anchor=v.variant)
            rows.append(fixed)
            if fixed["cost_mflops"] is None:
                continue  # no cost to match
            cal_cost = cascade_point(v.fixed_threshold, *arrays["cal"][v], sweep_costs(v)).cost_mflops
            anchor = f"{v.method} {v.variant}".strip()
            for (mode, method), others in by_method.items():
                if mode != v.mode or method == v.method:
                    continue
                for source, budget in (("test", fixed["cost_mflops"]), ("val", cal_cost)):
                    sw = [sweeps["cal" if source == "val" else "test"][o] for o in others]
                    rows.append(point(others, select_by_cost(sw, budget), selection="matched_cost",
                                      threshold_source=source, anchor=anchor, target_mflops=budget))
    return rows


# ---------------------------------------------------------------------------- violation simulation


class _Pool:
    """One variant's calibration and test rows of one seed pooled, evaluated on many random
    cal/test splits at once: the events are sorted once, each split is a mask over them.

    Its grid (every distinct event value) holds every split's calibration sweep points,
    and more: between two calibration events a split's calibration totals stand still.
    """

    def __init__(self, scores: np.ndarray, correct: np.ndarray, stage_mflops: Sequence[float]):
        scores = np.asarray(scores, dtype=np.float64)
        correct = np.asarray(correct, dtype=bool)
        cum = cumulative_costs(stage_mflops)
        self.rows, to, frm, value = _sorted_events(scores)
        self.d_cost = cum[to] - cum[frm]
        self.keep, self.threshold = _grid(value)  # [G]
        d_correct = correct[self.rows, to].astype(np.int32) - correct[self.rows, frm].astype(np.int32)
        # most events leave correctness alone: the running correct counts only need the others
        self.changes = np.flatnonzero(d_correct)
        self.d_correct = d_correct[self.changes]
        self.keep_changes = np.searchsorted(self.changes, self.keep, side="left")  # [G] changes before each point
        self.reached_changes = np.unique(self.keep_changes)  # the change counts a grid point can have
        self.all_correct = _padded(np.cumsum(self.d_correct))[self.keep_changes]  # [G] both parts together
        self.last = correct[:, -1]
        self.full_cost = float(cum[-1])
        s = degradation_scores(scores, correct)
        bad = np.flatnonzero(s > -np.inf)
        first = np.searchsorted(-self.threshold, -s[bad], side="left")  # first grid point where the loss is 1
        order = np.argsort(first, kind="stable")
        self.bad_rows = bad[order]
        # [G] how many of the sorted bad rows are losses at each grid point
        self.loss_upto = np.searchsorted(first[order], np.arange(len(self.keep)), side="right")

    def split(self, cal: np.ndarray) -> _Split:
        """This pool cut by ``cal [N, R]`` (True: calibration), one split per column."""
        return _Split(self, cal)


class _Split:
    """One pool under ``R`` cal/test splits: the calibration part's totals at any grid
    point of each split, from running sums over its calibration events only.

    ``[C, R]`` running sums cover the few events that change correctness (and the bad
    rows); the rest goes through ``flat``: the calibration events' positions ``r M + e``
    (split ``r``, event ``e``), sorted, so that "calibration events of split ``r`` before
    event ``e``" is one ``searchsorted``.
    """

    def __init__(self, pool: _Pool, cal: np.ndarray):
        self.pool = pool
        n_events, r = len(pool.rows), cal.shape[1]
        self.n_cal = int(cal[:, 0].sum())
        events = cal[pool.rows]  # [M, R]
        self.flat = np.flatnonzero(events.T)
        self.base = np.arange(r) * n_events  # [R] where each split's positions start
        self.first = np.searchsorted(self.flat, self.base)  # [R] each split's first calibration event in flat
        self.empty = np.searchsorted(self.flat, self.base + n_events) == self.first
        self.changes = _padded(np.cumsum(events[pool.changes] * pool.d_correct[:, None], axis=0, dtype=np.int32))
        self.losses = _padded(np.cumsum(cal[pool.bad_rows], axis=0, dtype=np.int32))  # [B + 1, R]
        self.last_cal = cal[pool.last].sum(axis=0)  # [R]
        self.last_test = pool.last.sum() - self.last_cal
        self.cols = np.arange(r)
        self._costs: np.ndarray | None = None

    def cal_correct(self, g: np.ndarray) -> np.ndarray:
        """``[R]`` the calibration part's correct answers at grid point ``g [R]``."""
        return self.last_cal + self.changes[self.pool.keep_changes[g], self.cols]

    def test_correct(self, g: np.ndarray) -> np.ndarray:
        return self.last_test + self.pool.all_correct[g] - self.changes[self.pool.keep_changes[g], self.cols]

    def cal_cost(self, g: np.ndarray) -> np.ndarray:
        """``[R]`` the calibration part's total cost at grid point ``g [R]``."""
        if self._costs is None:
            events = self.flat - np.repeat(self.base, np.diff(np.append(self.first, len(self.flat))))
            self._costs = np.concatenate([[0.0], np.cumsum(self.pool.d_cost[events])])
        end = np.searchsorted(self.flat, self.base + self.pool.keep[g])
        return self.n_cal * self.pool.full_cost + self._costs[end] - self._costs[self.first]

    def sweep_point(self, j: np.ndarray) -> np.ndarray:
        """``[R]`` the grid point that routes as the calibration sweep's point holding grid
        point ``j [R]``: that sweep's threshold is the lowest calibration event value
        reached, the grid point of the last calibration event up to ``j``; or, before any,
        just above every calibration score, the grid point just before its first event
        (test scores above that threshold stop there too)."""
        keep = self.pool.keep
        last = np.searchsorted(self.flat, self.base + keep[j]) - 1  # the last calibration event before point j
        reached = last >= self.first
        event = self.flat[np.maximum(last, 0)] - self.base
        first_event = self.flat[np.minimum(self.first, len(self.flat) - 1)] - self.base
        before_any = np.where(self.empty, len(keep) - 1, np.searchsorted(keep, first_event + 1) - 1)
        return np.where(reached, np.searchsorted(keep, event + 1), before_any)

    def cheapest_within(self, target: float) -> np.ndarray:
        """``[R]`` what :func:`select_by_accuracy` picks on each calibration part for AD
        ``<= target``: the last grid point accurate enough (the cost falls at every
        calibration event), as the calibration sweep's point."""
        need = self.n_cal * (self.last_cal / self.n_cal - target) - _TOL
        reached = self.pool.reached_changes  # [U]
        ok = self.last_cal + self.changes[reached] >= need  # [U, R]; U[0] = 0: all to the last stage, ok
        best = reached[len(reached) - 1 - np.argmax(ok[::-1], axis=0)]
        return self.sweep_point(np.searchsorted(self.pool.keep_changes, best, side="right") - 1)

    def certified(self, most_losses: int) -> np.ndarray:
        """``[R]`` what :func:`select_guaranteed` picks for one variant when a point is
        certified with at most ``most_losses`` losses: the last such (losses only grow
        along the grid), as the calibration sweep's point; 0 (above every score) if none."""
        bad_ok = (self.losses <= most_losses).sum(axis=0)  # [R] bad-row prefixes within the count
        count = np.searchsorted(self.pool.loss_upto, bad_ok - 1, side="right")  # grid points certified
        return np.where(count > 0, self.sweep_point(np.maximum(count - 1, 0)), 0)


def _padded(running: np.ndarray) -> np.ndarray:
    """Running totals (along the first axis) with the total before any event, 0, in front."""
    return np.concatenate([np.zeros((1, *running.shape[1:]), dtype=running.dtype), running])


def _resplit_ads(pools: Sequence[_Pool], cal: np.ndarray, targets: Sequence[float],
                 delta: float) -> dict[tuple[str, float], tuple[np.ndarray, np.ndarray]]:
    """The AD reached by the ``val`` and ``guaranteed`` choices of one method (its
    variants' pools), one cal/test split per column of ``cal [N, R]``.

    Exactly what :func:`select_by_accuracy` and :func:`select_guaranteed` pick on each
    calibration part (when every stage costs more than nothing, so that the cost falls at
    every calibration event), applied to its test part and to the whole pool.

    Returns:
        ``(source, target) -> (AD on the test part [R], AD on the pool [R])``.
    """
    n_cal, n = int(cal[:, 0].sum()), cal.shape[0]
    splits = [p.split(cal) for p in pools]
    out = {}
    for t in targets:
        most = _certified_losses(n_cal, t, delta / len(pools))
        for source in ("val", "guaranteed"):
            best = None  # per split: (cost, -correct) on the calibration part, correct on the test part
            for s in splits:
                g = s.cheapest_within(t) if source == "val" else s.certified(most)
                mine = (s.cal_cost(g) if len(splits) > 1 else 0.0, -s.cal_correct(g), s.test_correct(g))
                if best is None:
                    best = mine
                    continue
                better = (mine[0] < best[0]) | ((mine[0] == best[0]) & (mine[1] < best[1]))  # ties: the first variant
                best = tuple(np.where(better, a, b) for a, b in zip(mine, best))
            degraded_test = splits[0].last_test - best[2]
            degraded_cal = splits[0].last_cal + best[1]
            out[(source, t)] = (degraded_test / (n - n_cal), (degraded_test + degraded_cal) / n)
    return out


def _resplit_masks(rng: np.random.Generator, n: int, n_cal: int, resplits: int) -> np.ndarray:
    """``[n, resplits]`` bool: each column marks ``n_cal`` random rows as calibration."""
    ranks = rng.permuted(np.broadcast_to(np.arange(n), (resplits, n)), axis=1)
    return np.ascontiguousarray((ranks < n_cal).T)


def threshold_violations(samples: pd.DataFrame, variants: Sequence[Variant], targets: dict[str, list[float]],
                         delta: float, resplits: int = 200, seed: int = 0) -> list[dict]:
    """How often ``val`` and ``guaranteed`` thresholds miss their AD target on new data.

    Per run seed, that seed's calibration and test rows are pooled and split again at
    random ``resplits`` times into a calibration and a test part of the original sizes
    (every method sees the same splits). On each, the thresholds are chosen on the
    calibration part (:func:`select_by_accuracy` for ``val``, :func:`select_guaranteed`
    for ``guaranteed``, the best of a method's variants as in :func:`operating_points`)
    and the AD they reach is measured on the test part and on the whole pool. A violation
    is an AD over the target (beyond float slack).

    Two rates, because the guarantee and a test set answer different questions:

    - ``violation_rate``, on the test part: what a user sees on one held-out set. It
      carries the test part's own sampling noise, and in this finite world the test part
      is the pool minus the calibration part, so a calibration part that looks good
      leaves a test part that looks correspondingly bad. A threshold whose risk sits
      just under the target misses here about half the time, so this rate may exceed
      ``delta`` for guaranteed thresholds too, though far less than for ``val``.
    - ``pool_violation_rate``, on the pool: the pool is this world's population (the
      calibration part is drawn from it), so its AD is the *risk* the guarantee is about,
      ``P(risk > target) <= delta`` (up to drawing without replacement, which
      concentrates the loss count: the binomial tail then errs on the safe side).

    Args:
        samples: the per-sample table.
        variants: every routed system (as for :func:`operating_points`).
        targets: ``mode -> AD targets``.
        delta: the guaranteed thresholds' allowed probability of missing.
        resplits: random splits per run seed.
        seed: seeds the splits (with each run seed).

    Returns:
        One dict per (mode, method, target, source ``val`` | ``guaranteed``):
        ``violation_rate`` and ``pool_violation_rate`` (means over run seeds of the
        fraction of splits over the target; ``violation_rate_std`` across run seeds when
        several), ``mean_ad`` (test-part AD averaged over splits and seeds), ``delta``,
        ``resplits``, ``seeds``.

    Raises:
        ValueError: ``resplits < 1``, or a seed without both splits.
    """
    if resplits < 1:
        raise ValueError(f"resplits must be at least 1, got {resplits}")
    by_method: dict[tuple[str, str], list[Variant]] = {}
    for v in variants:
        by_method.setdefault((v.mode, v.method), []).append(v)
    per_seed: dict[tuple[str, str, float, str], list[tuple[float, float, float]]] = {}
    seeds = sorted(samples["seed"].unique())
    for run_seed in seeds:
        frame = samples[samples["seed"] == run_seed]
        parts = {name: part for name, part in frame.groupby("split")}
        if set(parts) != {"cal", "test"}:
            raise ValueError(f"seed {run_seed}: needs a cal and a test split, has {sorted(parts)}")
        pooled = pd.concat([parts["cal"], parts["test"]], ignore_index=True)
        cal = _resplit_masks(np.random.default_rng([seed, int(run_seed)]), len(pooled), len(parts["cal"]), resplits)
        chunk = int(np.clip(4_000_000 // len(pooled), 1, 256))  # splits evaluated together: bounds [events, R] arrays
        for (mode, method), vs in by_method.items():
            pools = [_Pool(*variant_arrays(pooled, v), sweep_costs(v)) for v in vs]
            ads = [_resplit_ads(pools, cal[:, i:i + chunk], targets[mode], delta) for i in range(0, resplits, chunk)]
            for source, t in ads[0]:
                test_ad, pool_ad = (np.concatenate([a[(source, t)][k] for a in ads]) for k in (0, 1))
                per_seed.setdefault((mode, method, t, source), []).append(
                    (float(np.mean(test_ad > t + _TOL)), float(np.mean(pool_ad > t + _TOL)), float(test_ad.mean())))
    out = []
    for (mode, method, t, source), values in per_seed.items():
        rates, pool_rates, ads = zip(*values)
        row = {"mode": mode, "method": method, "target_ad": t, "threshold_source": source, "delta": delta,
               "resplits": resplits, "seeds": len(seeds), "violation_rate": float(np.mean(rates)),
               "pool_violation_rate": float(np.mean(pool_rates)), "mean_ad": float(np.mean(ads))}
        if len(rates) > 1:
            row["violation_rate_std"] = float(np.std(rates, ddof=1))
        out.append(row)
    return out


KEYS = ("mode", "method", "selection", "threshold_source", "target_ad", "budget_fraction", "anchor", "delta")
VALUES = ("threshold", "target_mflops", "system_accuracy", "cost_mflops", "relative_cost", "ad", "skipping_rate",
          "appeal_rate")


def aggregate(rows: list[dict]) -> list[dict]:
    """Mean over seeds of each operating point, ``*_std`` (ddof=1) when several seeds.

    ``exit_fractions`` is averaged stage by stage; ``variants`` lists each seed's chosen
    variant; ``feasible`` is True only if it held for every seed. A guaranteed point that
    fell back to the last stage on some seed has threshold ``inf``: its mean is ``inf``
    and its std None.
    """
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in KEYS), []).append(r)
    n_seeds = len({r["seed"] for r in rows})
    out = []
    for key, group in groups.items():
        row: dict[str, Any] = dict(zip(KEYS, key))
        for v in VALUES:
            vals = [g[v] for g in group if g[v] is not None]
            row[v] = float(np.mean(vals)) if vals else None
            if n_seeds > 1 and vals:
                spread = len(vals) > 1 and bool(np.isfinite(vals).all())
                row[f"{v}_std"] = float(np.std(vals, ddof=1)) if spread else (0.0 if len(vals) == 1 else None)
        exits = np.array([g["exit_fractions"] for g in group])  # [seeds, K]
        row["exit_fractions"] = exits.mean(axis=0).tolist()
        row["variants"] = [g["variant"] for g in group]
        row["feasible"] = all(g["feasible"] for g in group)
        out.append(row)
    return out


def value_field(mode: str) -> str:
    """What a target-AD point is judged on: mean cost (white-box, Table 1) or appeal
    rate (black-box, Table 2)."""
    return "cost_mflops" if mode == "white_box" else "appeal_rate"


def _target_index(points: list[dict]) -> dict[tuple, dict]:
    """``(mode, method, threshold source, target AD) -> point`` of the target-AD points."""
    return {(p["mode"], p["method"], p["threshold_source"], p["target_ad"]): p
            for p in points if p["selection"] == "target_ad"}


def _best_rival(index: dict[tuple, dict], post_hoc: Sequence[str], mode: str, source: str,
                target: float) -> dict | None:
    """The cheapest post-hoc point (by :func:`value_field`) at one mode, source and target, or None."""
    field = value_field(mode)
    rivals = [r for b in post_hoc if (r := index.get((mode, b, source, target))) is not None and r[field] is not None]
    return min(rivals, key=lambda r: r[field]) if rivals else None


def comparisons(points: list[dict], trained: Sequence[str], post_hoc: Sequence[str]) -> list[dict]:
    """Each trained method against the best post-hoc method at each target-AD point.

    ``ratio = best post-hoc value / the method's value`` (cost white-box, appeal rate
    black-box): > 1 means the trained method is cheaper. ``targets_met`` says whether
    both points reached their AD target on the test split (a val-tuned threshold may
    miss it: the ratio then compares points of different accuracy).
    """
    index = _target_index(points)
    out = []
    for (mode, method, source, target), p in index.items():
        if method not in trained:
            continue
        field = value_field(mode)
        best = _best_rival(index, post_hoc, mode, source, target)
        if best is None or p[field] is None:
            continue
        value = p[field]
        ratio = best[field] / value if value > 0 else (1.0 if best[field] == 0 else None)
        met = all(q["ad"] <= target + 1e-9 for q in (p, best))
        oracle = index.get((mode, ORACLE, "test", target))
        out.append({"mode": mode, "threshold_source": source, "target_ad": target, "method": method,
                    "best_post_hoc": best["method"], "field": field, "ratio": ratio, "targets_met": met,
                    "gap_closed": gap_closed(best[field], value, oracle[field] if oracle else None)})
    return out


def gap_closed(baseline: float, value: float, oracle: float | None) -> float | None:
    """``(baseline - value) / (baseline - oracle)``: the share of the best baseline's excess
    over the oracle router that a method removes (1: as cheap as the oracle; 0: no better
    than the baseline; negative: worse). None without an oracle point or a gap to close.

    Example: baseline 0.18, method 0.16, oracle 0.08 MFLOPs: ``0.02 / 0.10 = 0.2``.
    """
    if oracle is None or baseline - oracle <= 1e-12:
        return None
    return (baseline - value) / (baseline - oracle)


def gap_table(points: list[dict], post_hoc: Sequence[str]) -> list[dict]:
    """Every method's gap closed at each target-AD point (:func:`gap_closed`), against the
    best post-hoc method with the same threshold source and the oracle router (test
    thresholds: the limit). Post-hoc methods are listed too (the best one closes 0)."""
    index = _target_index(points)
    out = []
    for (mode, method, source, target), p in index.items():
        field = value_field(mode)
        oracle = index.get((mode, ORACLE, "test", target))
        best = _best_rival(index, post_hoc, mode, source, target)
        if method == ORACLE or oracle is None or oracle[field] is None or best is None or p[field] is None:
            continue
        out.append({"mode": mode, "threshold_source": source, "target_ad": target, "method": method,
                    "field": field, "value": p[field], "best_post_hoc": best["method"],
                    "best_post_hoc_value": best[field], "oracle_value": oracle[field],
                    "gap_closed": gap_closed(best[field], p[field], oracle[field])})
    return out
