"""Summaries of the operating points for ``metrics.json``: means over seeds, each trained
method against the best post-hoc one, and the gap to the oracle router each closes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cascade.core.enums import Mode, Selection, ThresholdSource
from cascade.evaluation.points import ORACLE

#: what identifies a point across seeds, and the figures averaged over them
KEYS = ("mode", "method", "selection", "threshold_source", "target_ad", "budget_fraction", "anchor", "delta",
        "appeal_budget")
VALUES = ("threshold", "target_mflops", "system_accuracy", "cost_mflops", "relative_cost", "ad", "skipping_rate",
          "appeal_rate", "gain")


def aggregate(rows: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Mean over seeds of each operating point, ``*_std`` (ddof=1) when several seeds.

    ``exit_fractions`` is averaged stage by stage; ``variants`` lists each seed's chosen
    variant; ``feasible`` is True only if it held for every seed. A guaranteed point that
    fell back to the last stage on some seed has threshold ``inf``: its mean is ``inf``
    and its std None.
    """
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(r.get(k) for k in KEYS), []).append(r)
    n_seeds = len({r["seed"] for r in rows})
    out = []
    for key, group in groups.items():
        row: dict[str, Any] = dict(zip(KEYS, key))
        for v in VALUES:
            vals = [g.get(v) for g in group if g.get(v) is not None]
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


def value_field(mode: Mode) -> str:
    """What a target-AD point is judged on: mean cost (white-box, Table 1) or appeal
    rate (black-box, Table 2)."""
    return "cost_mflops" if mode == Mode.WHITE_BOX else "appeal_rate"


def _target_index(points: Sequence[Mapping[str, Any]]) -> dict[tuple, Mapping[str, Any]]:
    """``(mode, method, threshold source, target AD) -> point`` of the target-AD points."""
    return {(p["mode"], p["method"], p["threshold_source"], p["target_ad"]): p
            for p in points if p["selection"] == Selection.TARGET_AD}


def _best_rival(index: dict[tuple, Mapping[str, Any]], post_hoc: Sequence[str], mode: Mode, source: ThresholdSource,
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
        oracle = index.get((mode, ORACLE, ThresholdSource.TEST, target))
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
        oracle = index.get((mode, ORACLE, ThresholdSource.TEST, target))
        best = _best_rival(index, post_hoc, mode, source, target)
        if method == ORACLE or oracle is None or oracle[field] is None or best is None or p[field] is None:
            continue
        out.append({"mode": mode, "threshold_source": source, "target_ad": target, "method": method,
                    "field": field, "value": p[field], "best_post_hoc": best["method"],
                    "best_post_hoc_value": best[field], "oracle_value": oracle[field],
                    "gap_closed": gap_closed(best[field], p[field], oracle[field])})
    return out
