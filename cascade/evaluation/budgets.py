"""Appeal budgets: what routing gains at a fixed appeal rate, with bootstrap intervals.

An *appeal budget* ``b`` bounds the **appeal rate**: the fraction of inputs that reach the
last stage (the big network white-box, the oracle black-box), the ``appeal_rate`` of every
operating point. With two stages that is the fraction sent past stage 0; with more, the
intermediate stages are not bounded (a cost budget, ``evaluation.budgets``, bounds them),
so ``b`` is a budget on calls to the big model. It is not a cost budget: the cost of the
last stage does not enter.

At each budget a method's point (``selection: appeal_budget``) is its most accurate
threshold whose appeal rate on the selection split is within ``b``, ties to fewer appeals
(:func:`~cascade.evaluation.selection.select_by_appeal_rate`): on the calibration split,
then applied to test (``val``), or read off test (``test``). The oracle router's point
(test, the limit) appeals only inputs that no earlier stage answers right and the last
stage does, as many as the budget allows.

Each is judged by its **gain**: test accuracy minus the plain little network's (stage 0
alone), in the same run and seed, so every method of a mode is measured from one
reference; and by its **share** of the oracle router's gain at the same budget,
``gain / oracle gain``. Regression tasks use the same accuracy as every operating point:
the fraction of inputs the task's loss counts correct (keypoints: RMSE < 4 px).

Intervals: as the recommendation's (:mod:`~cascade.evaluation.recommend`), a paired
bootstrap over the test inputs, stratified by seed, seeds pooled (mean of per-seed
means), every method and the oracle on the same draws, thresholds held fixed. The share's
interval is that of the resampled ratio of gains.

The recommendation at each budget (``val`` thresholds): the *best* is the method of
largest gain; a method is *tied* when the interval of its gain minus the best's contains
0; the simplest tied method is recommended (:func:`~cascade.evaluation.recommend.simplicity`).

Does learning pay? At each budget the best *learned* method (every method that is not a
confidence score: trained ones, and post-hoc heads fitted to where the next stage is
right, such as ``gain_head``) is compared with the best *confidence score* (a method whose
class sets ``Predictor.confidence_score``: MSP and its kin), each picked by its gain on the
full test split and then held fixed, as the ratio of their gains with its interval from the
same draws (resamples where the confidence score gains nothing are left out).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from cascade.core.enums import Mode, Selection, ThresholdSource
from cascade.evaluation.columns import Variant, correct_array, variant_arrays
from cascade.evaluation.points import ORACLE, oracle_budget_scores
from cascade.evaluation.recommend import (
    BOOTSTRAP_SEED,
    LEVEL,
    RESAMPLES,
    bootstrap_means,
    percentile_interval,
    simplicity,
)
from cascade.evaluation.sweep import TOL, exit_stages

#: the threshold sources of the budget tables, the deployable one first
SOURCES = (ThresholdSource.VAL, ThresholdSource.TEST)
DEFINITION = ("appeal rate = the fraction of inputs that reach the last stage (with 2 stages: sent past stage 0); "
              "at each budget, the most accurate threshold whose appeal rate on the selection split is within it "
              "(ties: fewer appeals); gain = test accuracy minus the plain little network's (stage 0 alone); "
              "share = gain / the oracle router's gain at the same budget (test thresholds)")
INTERVAL = ("paired bootstrap over the test inputs, stratified by seed (inputs resampled within each seed), seeds "
            "pooled (mean of per-seed means); thresholds fixed")
VERSUS = ("learned / confidence = the gain of the best learned method (not a confidence score) divided by the gain "
          "of the best confidence score (MSP and its kin), both picked on the full test split and held fixed in "
          "the resamples; ahead / behind: the interval of their difference lies above / below 0")
RULE = ("best = largest gain (val thresholds); tied = the interval of its gain minus the best's contains 0; "
        "recommended = the simplest tied method: post-hoc before trained, then fewer routing-head parameters, "
        "then the run's order")


def routed_correct(scores: np.ndarray, correct: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """``[N]`` whether each input's exit stage answers right at ``threshold``, and ``[N]``
    whether it appeals (reaches the last stage)."""
    tau = exit_stages(scores, threshold)
    return correct[np.arange(len(correct)), tau], tau == correct.shape[1] - 1


def _interval(x: np.ndarray, level: float = LEVEL) -> tuple[float | None, float | None]:
    """The percentile interval (by rank) of the finite resampled values; (None, None) when none is."""
    x = x[np.isfinite(x)]
    return percentile_interval(x, level) if len(x) else (None, None)


class _TestSplits:
    """Each seed's test rows, and each point's per-input correctness and appeals there."""

    def __init__(self, samples: pd.DataFrame, variants: Sequence[Variant], oracles: Sequence[Variant]):
        test = samples[samples["split"] == "test"]
        self.frames = {int(s): f for s, f in test.groupby("seed", sort=True)}
        self.seeds = list(self.frames)
        self.lookup = {(v.mode, v.method, v.variant): v for v in variants}
        self.oracles = {o.mode: o for o in oracles}
        self._arrays: dict[tuple[int, Variant], tuple[np.ndarray, np.ndarray]] = {}

    def little(self, mode: Mode, seed: int) -> np.ndarray:
        """``[n_s]`` the plain stage 0's correctness (the oracle variant's first column)."""
        return correct_array(self.frames[seed], self.oracles[mode])[:, 0]

    def routed(self, point: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """``[n_s]`` correctness and appeals of one per-seed point at its threshold."""
        seed, mode = int(point["seed"]), Mode(point["mode"])
        frame = self.frames[seed]
        if point["method"] == ORACLE:
            correct = correct_array(frame, self.oracles[mode])
            scores = oracle_budget_scores(correct, seed)
        else:
            v = self.lookup[mode, point["method"], point["variant"] or ""]
            if (seed, v) not in self._arrays:
                self._arrays[seed, v] = variant_arrays(frame, v)
            scores, correct = self._arrays[seed, v]
        return routed_correct(scores, correct, float(point["threshold"]))


class _Cell:
    """One (mode, source, budget) column of the tables: its methods and the oracle router
    (last), each seed's per-input gains ``[n_s, M + 1]``, and the seed-mean accuracy and
    appeal rate of each."""

    def __init__(self, t: _TestSplits, mode: Mode, source: ThresholdSource, budget: float, methods: list[str],
                 points: Mapping[tuple, Mapping[str, Any]]):
        self.mode, self.source, self.budget = mode, source, budget
        self.keys = [(m, source) for m in methods] + [(ORACLE, ThresholdSource.TEST)]
        self.gains, accs, appeals, little = [], [], [], []
        for s in t.seeds:
            base = t.little(mode, s)
            routed = [t.routed(points[s, mode, m, src, budget]) for m, src in self.keys]
            self.gains.append(np.stack([c.astype(float) - base for c, _ in routed], axis=1))  # [n_s, M + 1]
            accs.append([c.mean() for c, _ in routed])
            appeals.append([a.mean() for _, a in routed])
            little.append(base.mean())
        self.accuracy, self.appeal_rate = np.mean(accs, axis=0), np.mean(appeals, axis=0)
        self.little = float(np.mean(little))
        self.mean = np.mean([g.mean(axis=0) for g in self.gains], axis=0)  # [M + 1]

    def rows(self, boot: np.ndarray) -> list[dict]:
        """A row per method and the oracle router, from this cell's resampled gains ``[resamples, M + 1]``."""
        mean, out = self.mean, []
        oracle_boot = np.where(boot[:, -1] > TOL, boot[:, -1], np.nan)
        for j, (m, src) in enumerate(self.keys):
            share = float(mean[j] / mean[-1]) if mean[-1] > TOL else None
            g_lo, g_hi = _interval(boot[:, j])
            s_lo, s_hi = _interval(boot[:, j] / oracle_boot) if share is not None else (None, None)
            out.append({"mode": self.mode, "threshold_source": src, "appeal_budget": self.budget, "method": m,
                        "system_accuracy": float(self.accuracy[j]), "appeal_rate": float(self.appeal_rate[j]),
                        "little_accuracy": self.little, "gain": float(mean[j]), "gain_low": g_lo, "gain_high": g_hi,
                        "oracle_gain": float(mean[-1]), "share": share, "share_low": s_lo, "share_high": s_hi})
        return out


def learned_vs_confidence(methods: Sequence[str], mean: np.ndarray, boot: np.ndarray,
                          confidence: Collection[str]) -> dict[str, Any] | None:
    """The best learned method against the best confidence score (module docstring).

    Args:
        methods: ``[M]`` the methods; mean: ``[M]`` their gains; boot: ``[resamples, M]`` resampled.
        confidence: the methods that are confidence scores.

    Returns:
        ``{"learned", "confidence", "ratio", "low", "high", "verdict", "difference": {"low", "high"}}``
        (``ratio``, ``low``, ``high`` None when the confidence score gains nothing), or None
        without a method of either group.
    """
    learned = [i for i, m in enumerate(methods) if m not in confidence]
    scores = [i for i, m in enumerate(methods) if m in confidence]
    if not learned or not scores:
        return None
    a = max(learned, key=lambda i: (mean[i], -i))
    b = max(scores, key=lambda i: (mean[i], -i))
    d_lo, d_hi = _interval(boot[:, a] - boot[:, b])
    ratio, lo, hi = None, None, None
    if mean[b] > TOL:
        ratio = float(mean[a] / mean[b])
        lo, hi = _interval(boot[:, a] / np.where(boot[:, b] > TOL, boot[:, b], np.nan))
    verdict = "tied"
    if d_lo is not None and d_lo > TOL:
        verdict = "ahead"
    elif d_hi is not None and d_hi < -TOL:
        verdict = "behind"
    return {"learned": methods[a], "confidence": methods[b], "ratio": ratio, "low": lo, "high": hi,
            "verdict": verdict, "difference": {"low": d_lo, "high": d_hi}}


def _choice(rows: list[dict], boot: np.ndarray, kinds: Mapping[str, Any],
            params: Mapping[str, int | None], confidence: Collection[str]) -> dict[str, Any]:
    """The recommendation at one (mode, val, budget) from its method rows (the oracle left out)."""
    methods = [r["method"] for r in rows]
    best = max(range(len(rows)), key=lambda i: (rows[i]["gain"], -i))
    diffs = {i: _interval(boot[:, i] - boot[:, best]) for i in range(len(rows))}
    tied = [i for i in range(len(rows)) if i == best or (diffs[i][0] is not None
                                                         and diffs[i][0] <= TOL and diffs[i][1] >= -TOL)]
    chosen = min(tied, key=lambda i: simplicity(methods[i], kinds, params, i))
    r = rows[chosen]
    return {"mode": r["mode"], "threshold_source": r["threshold_source"], "appeal_budget": r["appeal_budget"],
            "method": methods[chosen], "kind": kinds.get(methods[chosen]), "gain": r["gain"],
            "gain_low": r["gain_low"], "gain_high": r["gain_high"], "share": r["share"], "best": methods[best],
            "tied": [methods[i] for i in tied],
            "gain_minus_best": {methods[i]: {"low": lo, "high": hi} for i, (lo, hi) in diffs.items()},
            "learned_vs_confidence": learned_vs_confidence(methods, np.array([r["gain"] for r in rows]), boot,
                                                           confidence)}


def appeal_budget_summary(samples: pd.DataFrame, variants: Sequence[Variant], rows: Sequence[Mapping[str, Any]],
                          oracles: Sequence[Variant], kinds: Mapping[str, Any] | None = None,
                          params: Mapping[tuple[str, str], int | None] | None = None,
                          confidence: Collection[str] = ()) -> dict[str, Any]:
    """``metrics.json``'s ``appeal_budgets``: per mode, threshold source and budget, every
    method's and the oracle router's gain over the little network and share of the
    oracle's gain, with intervals, and the recommendation (module docstring).

    Args:
        samples: the per-sample table.
        variants: every routed system (a point's ``variant`` names which of a method's).
        rows: the per-seed operating points (``points.csv``); only ``appeal_budget`` ones are read.
        oracles: per mode, the plain stages' variant (its stage 0 is the little network).
        kinds: ``method -> MethodKind`` (for the tie-break).
        params: ``(mode, method) -> its routing heads' parameters``, where known.
        confidence: the methods that are confidence scores (for ``learned_vs_confidence``).

    Returns:
        ``{"definition", "interval", "rule", "versus", "resamples", "bootstrap_seed", "level", "rows",
        "choices"}``; ``rows`` and ``choices`` are empty without appeal-budget points or oracles.
    """
    out: dict[str, Any] = {"definition": DEFINITION, "interval": INTERVAL, "rule": RULE, "versus": VERSUS,
                           "resamples": RESAMPLES, "bootstrap_seed": BOOTSTRAP_SEED, "level": LEVEL, "rows": [],
                           "choices": []}
    points = {(int(r["seed"]), Mode(r["mode"]), r["method"], r["threshold_source"], float(r["appeal_budget"])): r
              for r in rows if r["selection"] == Selection.APPEAL_BUDGET}
    t = _TestSplits(samples, variants, oracles)
    if not points or not t.oracles:
        return out
    cells = []
    budgets = list(dict.fromkeys((k[1], k[4]) for k in points if k[2] == ORACLE and k[1] in t.oracles))
    for mode, budget in sorted(budgets, key=lambda c: (list(t.oracles).index(c[0]), c[1])):
        for source in SOURCES:
            methods = list(dict.fromkeys(k[2] for k in points if k[1] == mode and k[3] == source
                                         and k[4] == budget and k[2] != ORACLE))
            if methods:
                cells.append(_Cell(t, mode, source, budget, methods, points))
    # every cell's columns side by side: one bootstrap, the same draws for all (paired)
    boot = bootstrap_means([np.concatenate([c.gains[i] for c in cells], axis=1) for i in range(len(t.seeds))])
    edges = np.cumsum([0] + [len(c.keys) for c in cells])
    for c, lo, hi in zip(cells, edges[:-1], edges[1:]):
        rows = c.rows(boot[:, lo:hi])
        out["rows"] += rows if c.source == SOURCES[0] else rows[:-1]  # the oracle's row once per budget
        if c.source == ThresholdSource.VAL:
            mine = {m: p for (md, m), p in (params or {}).items() if md == c.mode}
            out["choices"].append(_choice(rows[:-1], boot[:, lo:hi - 1], kinds or {}, mine, confidence))
    return out
