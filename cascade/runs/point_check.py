"""The exported operating point, recomputed from the run's per-sample table.

``points.csv`` is derived from ``samples.csv`` (:func:`cascade.evaluation.operating_points`);
export recomputes the one point it deploys with that same function, on that seed's
calibration and test rows, and refuses a ``points.csv`` row that disagrees: a threshold
edited by hand, or a points file paired with another run's samples. The figures a bundle
reports as expected are then the recomputed ones. An ``appeal_budget`` row is recomputed
the same way (its ``appeal_budget`` in place of the target AD).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, ValidationError

from cascade.core.enums import Selection
from cascade.core.errors import CascadeError
from cascade.evaluation.columns import Variant
from cascade.evaluation.points import operating_points
from cascade.runs.layout import METRICS, POINTS, SAMPLES

#: how far a recomputed figure may lie from the run's (float rounding in a CSV round trip)
TOLERANCE = 1e-9
#: the fields of a point compared with the run's, then taken from the recomputation
CHECKED = ("threshold", "system_accuracy", "ad", "skipping_rate", "appeal_rate", "cost_mflops", "relative_cost")


class _VariantRecord(BaseModel):
    """One of ``metrics.json``'s ``variants``: the ``samples.csv`` columns of a system."""

    method: str
    mode: str
    variant: str
    score_columns: list[str]
    correct_columns: list[str | None]
    stage_mflops: list[float | None]
    fixed_threshold: float | None = None

    def as_variant(self) -> Variant:
        return Variant(self.method, self.mode, self.variant, tuple(self.score_columns), tuple(self.correct_columns),
                       tuple(self.stage_mflops), self.fixed_threshold)


def recompute_point(run: Path, metrics: dict, point: dict[str, Any]) -> dict[str, Any]:
    """``point`` (a ``points.csv`` row of a target-AD or appeal-budget selection) with its
    figures recomputed from ``samples.csv``.

    Args:
        run: the run folder.
        metrics: its ``metrics.json`` (its ``variants`` name the columns).
        point: the row: ``seed, mode, method, variant, threshold_source``, its
            ``target_ad`` (or ``selection: appeal_budget`` and its ``appeal_budget``) and
            the figures of :data:`CHECKED`; a guaranteed point's ``delta``.

    Raises:
        CascadeError: an unreadable ``samples.csv`` or ``metrics.json`` variants, or a
            recomputed threshold, system or figure that is not the row's (one line
            naming ``points.csv``).
    """
    mode, method, source = point["mode"], point["method"], point["threshold_source"]
    variants, samples = _seed_samples(run, metrics, point)
    # delta decides only the guaranteed points, whose rows hold theirs
    delta = 0.1 if point.get("delta") is None else float(point["delta"])
    selection = Selection.APPEAL_BUDGET if point.get("selection") == Selection.APPEAL_BUDGET else Selection.TARGET_AD
    if selection == Selection.APPEAL_BUDGET:
        budget = float(point["appeal_budget"])
        rows = operating_points(samples, variants, {mode: []}, (), delta=delta, appeal_budgets=[budget])
        what = f"appeal budget {budget:g}"
    else:
        rows = operating_points(samples, variants, {mode: [float(point["target_ad"])]}, (), delta=delta)
        what = f"target AD {point['target_ad']:g}"
    (fresh,) = [r for r in rows if r["selection"] == selection and r["threshold_source"] == source]
    where = f"{run / POINTS}: the {source} point of {method} ({mode}, seed {point['seed']}, {what})"
    if (fresh["variant"] or "") != (point.get("variant") or ""):
        raise CascadeError(f"{where} uses system {point.get('variant')!r}, but samples.csv chooses "
                           f"{fresh['variant']!r}; the points are not this run's: run it again")
    for key in CHECKED:
        if not _same(point.get(key), fresh[key]):
            raise CascadeError(f"{where} has {key} {point.get(key)!r}, but samples.csv gives {fresh[key]!r}; the "
                               "two files are not of one run (one was edited, cut short or swapped): run it again")
    return {**point, **{k: fresh[k] for k in (*CHECKED, "feasible")}}


def _seed_samples(run: Path, metrics: dict, point: dict[str, Any]) -> tuple[list[Variant], pd.DataFrame]:
    """The point's method's variants (``metrics.json``) and its seed's rows of
    ``samples.csv``, checked: the columns they read are there and hold what they should."""
    path = run / SAMPLES
    seed, mode, method = point["seed"], point["mode"], point["method"]
    try:
        variants = [_VariantRecord.model_validate(v).as_variant() for v in metrics.get("variants", [])]
    except ValidationError as exc:
        raise CascadeError(f"{run / METRICS}: variants: {str(exc).splitlines()[0]}") from None
    variants = [v for v in variants if v.method == method and v.mode == mode]
    if not variants:
        raise CascadeError(f"{run / METRICS}: variants: no system of {method} ({mode}) to recompute the point "
                           "from")
    columns = {c for v in variants for c in (*v.score_columns, *v.correct_columns) if c is not None}
    try:
        samples = pd.read_csv(path, usecols=lambda c: c in columns | {"seed", "split"})
    except FileNotFoundError:
        raise CascadeError(f"{path}: not found; export recomputes the operating point from it") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as exc:
        raise CascadeError(f"{path}: not a readable CSV ({str(exc).splitlines()[0]})") from None
    missing = sorted((columns | {"seed", "split"}) - set(samples.columns))
    if missing:
        raise CascadeError(f"{path}: no column {missing[0]} (metrics.json's variants of {method} read it)")
    samples = samples[samples["seed"] == seed]
    for split in ("cal", "test"):
        if not (samples["split"] == split).any():
            raise CascadeError(f"{path}: no {split} rows of seed {seed}")
    for c in sorted(columns):
        values = samples[c]
        ok = values.isin([True, False]).all() if c.endswith("_correct") else \
            pd.to_numeric(values, errors="coerce").notna().all()
        if not ok:
            raise CascadeError(f"{path}: column {c} holds values that are not "
                               + ("True/False" if c.endswith("_correct") else "numbers"))
    return variants, samples


def _same(a: Any, b: Any) -> bool:
    """Equal to :data:`TOLERANCE`, both missing, or the same infinity."""
    if a is None or b is None:
        return a is None and b is None
    try:
        a, b = float(a), float(b)
    except (TypeError, ValueError):
        return False
    if not (math.isfinite(a) and math.isfinite(b)):
        return a == b
    return bool(np.isclose(a, b, rtol=TOLERANCE, atol=TOLERANCE))
