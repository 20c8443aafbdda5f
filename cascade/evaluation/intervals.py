"""A 95 % interval for every deployable operating point's value (``metrics.json: intervals``).

The value is what a target-AD point is judged on (:func:`~cascade.evaluation.summaries.value_field`):
the mean cost in MFLOPs white-box, the appeal rate black-box. Its interval is the same
**bootstrap over the test inputs, thresholds fixed at their calibration choice,
stratified by seed, seeds pooled** as the recommendation's
(:mod:`cascade.evaluation.recommend`: the same draws, :class:`~cascade.evaluation.recommend.Deployable`):
each resample draws every seed's test inputs with replacement within that seed, the
point's value is the mean over seeds of its per-seed means, and the interval is the
2.5 and 97.5 percentiles of the resampled values (by rank). It is the test split's
sampling error at the deployed thresholds: it does not include the calibration split's
(a threshold chosen on another calibration split would differ; the violation simulation
measures that).

Only the deployable threshold sources (``guaranteed``, ``val``) get one: a test-tuned
threshold was chosen on the very inputs the bootstrap would resample.

``metrics.json: intervals``::

    {"method": "<the sentence above>", "level": 0.95, "resamples": 1000, "bootstrap_seed": 0,
     "points": [{"mode", "method", "threshold_source", "target_ad", "field" ("cost_mflops" |
                 "appeal_rate"), "value" (the point's, as in operating_points), "low", "high"}]}
"""

from __future__ import annotations

from typing import Any

from cascade.evaluation.recommend import (
    INTERVAL,
    LEVEL,
    Deployable,
    percentile_interval,
)
from cascade.evaluation.summaries import value_field


def point_intervals(d: Deployable, level: float = LEVEL) -> dict[str, Any]:
    """``metrics.json``'s ``intervals``: each deployable point's value and its percentile
    interval over ``d``'s resamples (module docstring)."""
    points = []
    for i, (mode, target, source, method) in enumerate(d.columns):
        low, high = percentile_interval(d.boot[:, i], level)
        points.append({"mode": mode, "method": method, "threshold_source": source, "target_ad": target,
                       "field": value_field(mode), "value": float(d.mean[i]), "low": low, "high": high})
    return {"method": INTERVAL, "level": level, "resamples": d.boot.shape[0], "bootstrap_seed": d.seed,
            "points": points}


def interval_index(metrics: dict[str, Any]) -> dict[tuple, dict[str, Any]]:
    """``(mode, method, threshold source, target AD) -> interval`` of a run's ``metrics.json``
    (empty for a run without intervals)."""
    return {(p["mode"], p["method"], p["threshold_source"], p["target_ad"]): p
            for p in (metrics.get("intervals") or {}).get("points", [])}
