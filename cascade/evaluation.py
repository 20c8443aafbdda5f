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

from dataclasses import dataclass
from typing import Any, Sequence

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


_BASE = {"target_ad": None, "budget_fraction": None, "target_mflops": None, "anchor": None}


def operating_points(samples: pd.DataFrame, variants: Sequence[Variant], targets: dict[str, list[float]],
                     budgets: Sequence[float] = ()) -> list[dict]:
    """Every operating point of every variant, per seed, from the per-sample table.

    Selections (the ``selection`` field), each with thresholds read off the test split
    (``threshold_source = test``, as the papers) and chosen on the calibration split
    (``val``) then applied to test:

    - ``target_ad``: the cheapest point with accuracy degradation ``AD = acc(last stage
      alone) - acc(system)`` at or under each target of the mode (black-box: ``1 - acc``);
    - ``budget``: the most accurate point whose mean cost is at most each fraction of
      the last stage's cost;
    - ``fixed``: a variant's own threshold (``threshold_source = fixed``); and
      ``matched_cost``: every other method at that point's mean cost (``anchor`` names it).

    A method with several variants is judged by the best of them at each selection.

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


KEYS = ("mode", "method", "selection", "threshold_source", "target_ad", "budget_fraction", "anchor")
VALUES = ("threshold", "target_mflops", "system_accuracy", "cost_mflops", "relative_cost", "ad", "skipping_rate",
          "appeal_rate")


def aggregate(rows: list[dict]) -> list[dict]:
    """Mean over seeds of each operating point, ``*_std`` (ddof=1) when several seeds.

    ``exit_fractions`` is averaged stage by stage; ``variants`` lists each seed's chosen
    variant; ``feasible`` is True only if it held for every seed.
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
                row[f"{v}_std"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
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


def comparisons(points: list[dict], trained: Sequence[str], post_hoc: Sequence[str]) -> list[dict]:
    """Each trained method against the best post-hoc method at each target-AD point.

    ``ratio = best post-hoc value / the method's value`` (cost white-box, appeal rate
    black-box): > 1 means the trained method is cheaper. ``targets_met`` says whether
    both points reached their AD target on the test split (a val-tuned threshold may
    miss it: the ratio then compares points of different accuracy).
    """
    index = {(p["mode"], p["method"], p["threshold_source"], p["target_ad"]): p
             for p in points if p["selection"] == "target_ad"}
    out = []
    for (mode, method, source, target), p in index.items():
        if method not in trained:
            continue
        field = value_field(mode)
        rivals = [index[(mode, b, source, target)] for b in post_hoc if (mode, b, source, target) in index]
        rivals = [r for r in rivals if r[field] is not None]
        if not rivals or p[field] is None:
            continue
        best = min(rivals, key=lambda r: r[field])
        value = p[field]
        ratio = best[field] / value if value > 0 else (1.0 if best[field] == 0 else None)
        met = all(q["ad"] <= target + 1e-9 for q in (p, best))
        out.append({"mode": mode, "threshold_source": source, "target_ad": target, "method": method,
                    "best_post_hoc": best["method"], "field": field, "ratio": ratio, "targets_met": met})
    return out
