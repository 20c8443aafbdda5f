"""The operating-point table: every routed system at every selection, per seed (``points.csv``)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np
import pandas as pd

from cascade.core.enums import Mode, Selection, ThresholdSource
from cascade.evaluation.columns import (
    Variant,
    by_method,
    correct_array,
    sweep_costs,
    variant_arrays,
)
from cascade.evaluation.guarantee import degradation_scores, select_guaranteed
from cascade.evaluation.selection import Pick, select_by_accuracy, select_by_appeal_rate, select_by_cost
from cascade.evaluation.sweep import CascadeSweep, cascade_point, cascade_sweep

#: where a target-AD point's threshold comes from (``points.csv``'s ``threshold_source``),
#: the deployable ones first; budgets, appeal budgets and matched costs use ``val`` and ``test`` too
THRESHOLD_SOURCES = {
    ThresholdSource.VAL: "chosen on the calibration split",
    ThresholdSource.GUARANTEED: "certified on the calibration split (Learn then Test): AD <= target with probability "
                                ">= 1 - delta",
    ThresholdSource.TEST: "read off the test split (as the paper; not deployable)",
}

#: the split each chosen (not fixed, not certified) threshold is read off
_SPLIT = {ThresholdSource.VAL: "cal", ThresholdSource.TEST: "test"}

#: the method name of the oracle router's rows: the limit every router is measured against
ORACLE = "oracle"


@dataclass(frozen=True, kw_only=True, eq=False)
class OperatingPoint(Mapping[str, Any]):
    """One routed system at one selected threshold, measured on one seed's test split: a
    row of ``points.csv``.

    It reads as a mapping too (``point["ad"]``, ``{**point}``), whose keys are the
    ``points.csv`` columns in order (:meth:`as_row`).

    Attributes:
        seed: the run seed.
        mode: the mode of the system's last stage.
        method: the method's label (:data:`ORACLE` for the oracle router).
        target_ad: the AD target (``target_ad`` selections), else None.
        budget_fraction: the budget as a fraction of the last stage's cost (``budget``), else None.
        target_mflops: the mean cost allowed (``budget``, ``matched_cost``), else None.
        anchor: the fixed point matched (``matched_cost``: ``"<method> <variant>"``) or the
            variant whose own threshold it is (``fixed``), else None.
        delta: the allowed probability of missing the target (``guaranteed``), else None.
        selection: the rule that picked the threshold.
        threshold_source: where the threshold was chosen.
        variant: which of the method's systems was picked (``""`` when it has just one).
        feasible: False when no point met the constraint (the closest one was taken).
        threshold: the shared threshold.
        system_accuracy, cost_mflops, relative_cost, ad, skipping_rate, appeal_rate: the
            test split's figures (costs None when the last stage's cost is unknown).
        exit_fractions: ``[K]`` the fraction of test inputs exiting at each stage.
        appeal_budget: the fraction of inputs allowed to reach the last stage
            (``appeal_budget``), else None.
        gain: ``appeal_budget`` points: the test accuracy gained over the plain stage 0
            (the little network) alone, on this seed; else None.
    """

    seed: int
    mode: Mode
    method: str
    target_ad: float | None = None
    budget_fraction: float | None = None
    target_mflops: float | None = None
    anchor: str | None = None
    delta: float | None = None
    selection: Selection
    threshold_source: ThresholdSource
    variant: str
    feasible: bool
    threshold: float
    system_accuracy: float
    cost_mflops: float | None
    relative_cost: float | None
    ad: float
    skipping_rate: float
    appeal_rate: float
    exit_fractions: list[float]
    appeal_budget: float | None = None
    gain: float | None = None

    def as_row(self) -> dict[str, Any]:
        """The ``points.csv`` row, ``exit_fractions`` still a list."""
        return {name: getattr(self, name) for name in _COLUMNS}

    def __getitem__(self, key: str) -> Any:
        if key not in _COLUMNS:
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(_COLUMNS)

    def __len__(self) -> int:
        return len(_COLUMNS)


#: ``points.csv``'s columns, in order
_COLUMNS = tuple(f.name for f in fields(OperatingPoint))


def points_frame(points: Sequence[OperatingPoint]) -> pd.DataFrame:
    """``points.csv``: one row per point, ``exit_fractions`` joined as ``"f0;f1;..."``."""
    return pd.DataFrame([{**p.as_row(), "exit_fractions": ";".join(f"{f:.6g}" for f in p.exit_fractions)}
                         for p in points])


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


def oracle_budget_scores(correct: np.ndarray, seed: int) -> np.ndarray:
    """``[N, K-1]`` stop scores of the oracle router at an appeal budget: the most accurate
    router that sends the fewest inputs to the last stage.

    An input exits at its first right routed stage: the stages before it score -1 (pass
    on), that one 1. An input that only the last stage answers right scores the random
    value of :func:`oracle_scores` (the same draws) at every routed stage, so lower
    thresholds keep those inputs one at a time, in random order; one that no stage answers
    right scores 1 at stage 0. With two stages these are :func:`oracle_scores` exactly;
    with more, a stage-0 mistake the middle stage corrects is never appealed.

    Args:
        correct: ``[N, K]`` each stage's correctness, the last stage's in the last column.
        seed: fixes the order of the inputs only the last stage gets right.
    """
    correct = np.asarray(correct, dtype=bool)
    routed = correct[:, :-1]  # [N, K-1]
    first = np.where(routed.any(axis=1), routed.argmax(axis=1), -1)  # [N] first right routed stage
    scores = np.where(np.arange(routed.shape[1])[None, :] < first[:, None], -1.0, 1.0)
    order = np.random.default_rng(seed).random(len(correct)) * 0.5  # [N]
    only_last = (first < 0) & correct[:, -1]
    scores[only_last] = order[only_last, None]
    return scores


class _SeedTables:
    """One seed's per-sample arrays and sweeps of every variant on both splits; its points
    are measured on the test split."""

    def __init__(self, seed: int, frame: pd.DataFrame, variants: Sequence[Variant], oracles: Sequence[Variant]):
        split = {name: part for name, part in frame.groupby("split")}
        self.seed = seed
        self.arrays = {s: {v: variant_arrays(split[s], v) for v in variants} for s in ("cal", "test")}
        self.sweeps: dict[str, dict[Variant, CascadeSweep]] = {
            s: {v: cascade_sweep(*self.arrays[s][v], sweep_costs(v)) for v in variants} for s in ("cal", "test")}
        #: mode -> the plain stage 0's test accuracy (what an appeal-budget point gains over)
        self.little: dict[Mode, float] = {}
        #: the oracle router's test arrays at appeal budgets (:func:`oracle_budget_scores`)
        self.budget_oracles: dict[Variant, tuple[np.ndarray, np.ndarray]] = {}
        for o in oracles:
            correct = correct_array(split["test"], o)
            self.arrays["test"][o] = (oracle_scores(correct, seed), correct)
            self.budget_oracles[o] = (oracle_budget_scores(correct, seed), correct)
            self.little[o.mode] = float(correct[:, 0].mean())

    def point(self, vs: Sequence[Variant], pick: Pick, arrays: tuple[np.ndarray, np.ndarray] | None = None,
              **selected: Any) -> OperatingPoint:
        """The test split's figures at the threshold ``pick`` chose among ``vs`` (with the
        test ``arrays`` given, else the variant's own)."""
        v = vs[pick.variant]
        sc, co = self.arrays["test"][v] if arrays is None else arrays
        p = cascade_point(pick.threshold, sc, co, sweep_costs(v))
        ref = float(co[:, -1].mean())
        known = v.stage_mflops[-1] is not None
        return OperatingPoint(
            seed=self.seed, mode=v.mode, method=v.method, **selected, variant=v.variant, feasible=pick.feasible,
            threshold=p.threshold, system_accuracy=p.system_accuracy,
            cost_mflops=p.cost_mflops if known else None,
            relative_cost=p.cost_mflops / v.stage_mflops[-1] if known else None,
            ad=ref - p.system_accuracy, skipping_rate=1.0 - p.exit_fractions[-1],
            appeal_rate=p.exit_fractions[-1], exit_fractions=p.exit_fractions)

    def appeal_point(self, vs: Sequence[Variant], sweeps: Sequence[CascadeSweep], budget: float,
                     source: ThresholdSource, arrays: tuple[np.ndarray, np.ndarray] | None = None) -> OperatingPoint:
        """The ``appeal_budget`` point of ``vs`` chosen on ``sweeps``, with its gain over the
        plain stage 0 (None when no oracle variant names that stage's column)."""
        point = self.point(vs, select_by_appeal_rate(sweeps, budget), arrays, selection=Selection.APPEAL_BUDGET,
                           threshold_source=source, appeal_budget=budget)
        little = self.little.get(point.mode)
        return replace(point, gain=None if little is None else point.system_accuracy - little)


def _method_points(t: _SeedTables, vs: Sequence[Variant], targets: Sequence[float], budgets: Sequence[float],
                   delta: float, appeal_budgets: Sequence[float] = ()) -> list[OperatingPoint]:
    """One method's target-AD and budget points (test and val thresholds), its guaranteed
    ones, then its appeal-budget points (test and val)."""
    rows = []
    last_cost = vs[0].stage_mflops[-1]
    for source in (ThresholdSource.TEST, ThresholdSource.VAL):
        split = _SPLIT[source]
        sw = [t.sweeps[split][v] for v in vs]
        ref = float(t.arrays[split][vs[0]][1][:, -1].mean())
        for target in targets:
            rows.append(t.point(vs, select_by_accuracy(sw, sw[0].n * (ref - target)), selection=Selection.TARGET_AD,
                                threshold_source=source, target_ad=target))
        for b in budgets if last_cost is not None else ():  # no cost, no budget
            rows.append(t.point(vs, select_by_cost(sw, b * last_cost), selection=Selection.BUDGET,
                                threshold_source=source, budget_fraction=b, target_mflops=b * last_cost))
    cal_sweeps = [t.sweeps["cal"][v] for v in vs]
    degradations = [degradation_scores(*t.arrays["cal"][v]) for v in vs]
    for target in targets:
        rows.append(t.point(vs, select_guaranteed(cal_sweeps, degradations, target, delta),
                            selection=Selection.TARGET_AD, threshold_source=ThresholdSource.GUARANTEED,
                            target_ad=target, delta=delta))
    for source in (ThresholdSource.TEST, ThresholdSource.VAL):
        sw = [t.sweeps[_SPLIT[source]][v] for v in vs]
        rows += [t.appeal_point(vs, sw, b, source) for b in appeal_budgets]
    return rows


def _oracle_points(t: _SeedTables, o: Variant, targets: Sequence[float],
                   appeal_budgets: Sequence[float] = ()) -> list[OperatingPoint]:
    """The oracle router's target-AD points, then its appeal-budget points, thresholds read
    off the test split. At an appeal budget it appeals only inputs no earlier stage answers
    right and the last stage does (two stages: little wrong, big right), as many as fit
    (:func:`oracle_budget_scores`)."""
    sw = cascade_sweep(*t.arrays["test"][o], sweep_costs(o))
    ref = float(t.arrays["test"][o][1][:, -1].mean())
    budget_sw = cascade_sweep(*t.budget_oracles[o], sweep_costs(o))
    return [t.point([o], select_by_accuracy([sw], sw.n * (ref - target)), selection=Selection.TARGET_AD,
                    threshold_source=ThresholdSource.TEST, target_ad=target) for target in targets] + \
        [t.appeal_point([o], [budget_sw], b, ThresholdSource.TEST, t.budget_oracles[o]) for b in appeal_budgets]


def _fixed_points(t: _SeedTables, v: Variant, methods: dict[tuple[Mode, str], list[Variant]]) -> list[OperatingPoint]:
    """A variant's own threshold, then every other method of its mode at that point's cost."""
    fixed = t.point([v], Pick(0, v.fixed_threshold, True), selection=Selection.FIXED,
                    threshold_source=ThresholdSource.FIXED, anchor=v.variant)
    if fixed.cost_mflops is None:
        return [fixed]  # no cost to match
    rows = [fixed]
    cal_cost = cascade_point(v.fixed_threshold, *t.arrays["cal"][v], sweep_costs(v)).cost_mflops
    anchor = f"{v.method} {v.variant}".strip()
    for (mode, method), others in methods.items():
        if mode != v.mode or method == v.method:
            continue
        for source, budget in ((ThresholdSource.TEST, fixed.cost_mflops), (ThresholdSource.VAL, cal_cost)):
            sw = [t.sweeps[_SPLIT[source]][o] for o in others]
            rows.append(t.point(others, select_by_cost(sw, budget), selection=Selection.MATCHED_COST,
                                threshold_source=source, anchor=anchor, target_mflops=budget))
    return rows


def operating_points(samples: pd.DataFrame, variants: Sequence[Variant], targets: dict[str, list[float]],
                     budgets: Sequence[float] = (), delta: float = 0.1,
                     oracles: Sequence[Variant] = (), appeal_budgets: Sequence[float] = ()) -> list[OperatingPoint]:
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
      ``matched_cost``: every other method at that point's mean cost (``anchor`` names it);
    - ``appeal_budget``: the most accurate point whose appeal rate (the fraction of inputs
      reaching the last stage) is at most each budget, ties to fewer appeals
      (:func:`select_by_appeal_rate`), with its ``gain`` over the plain stage 0 alone.

    A method with several variants is judged by the best of them at each selection.

    Args:
        samples: the per-sample table (``seed``, ``split`` cal|test and the variants' columns).
        variants: every routed system of every method and mode.
        targets: ``mode -> AD targets`` (fractions).
        budgets: mean-cost budgets, fractions of the last stage's cost.
        delta: the guaranteed points' allowed probability of missing their target.
        oracles: per mode, the plain stages' correctness and costs (``score_columns``
            unused): the oracle router (:func:`oracle_scores`), reported as method
            :data:`ORACLE` at each target AD and appeal budget with test thresholds, the
            limit; their stage 0 is what appeal-budget points' ``gain`` is measured against.
        appeal_budgets: fractions of the inputs allowed to reach the last stage.

    Returns:
        One :class:`OperatingPoint` per (seed, mode, method, selection, source, target / budget /
        anchor), seeds in order.
    """
    methods = by_method(variants)
    rows: list[OperatingPoint] = []
    for seed, frame in samples.groupby("seed", sort=True):
        t = _SeedTables(int(seed), frame, variants, oracles)
        for (mode, _), vs in methods.items():
            rows += _method_points(t, vs, targets[mode], budgets, delta, appeal_budgets)
        for o in oracles:
            rows += _oracle_points(t, o, targets[o.mode], appeal_budgets)
        for v in variants:
            if v.fixed_threshold is not None:
                rows += _fixed_points(t, v, methods)
    return rows
