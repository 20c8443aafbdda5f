"""Operating points of a cascade from per-sample arrays: sort once, cumulative sums.

The per-sample table (``samples.csv``) is the single source of truth: every operating
point is computed from it alone, so anyone can recompute them. The modules, in the
order they build on each other:

- :mod:`~cascade.evaluation.sweep`: every threshold's operating point of one cascade;
- :mod:`~cascade.evaluation.selection`: the rules that pick a point (budget, appeal budget, accuracy);
- :mod:`~cascade.evaluation.guarantee`: the certified rule (Learn then Test);
- :mod:`~cascade.evaluation.columns`: a routed system's columns of the per-sample table;
- :mod:`~cascade.evaluation.points`: the operating-point table (``points.csv``);
- :mod:`~cascade.evaluation.violations`: how often chosen thresholds miss on new data;
- :mod:`~cascade.evaluation.summaries`: means over seeds and comparisons (``metrics.json``);
- :mod:`~cascade.evaluation.recommend`: which method to deploy, with bootstrap intervals;
- :mod:`~cascade.evaluation.budgets`: gains at fixed appeal budgets, with intervals.
"""

from cascade.evaluation.columns import Variant, sweep_costs, variant_arrays
from cascade.evaluation.guarantee import (
    binomial_p_value,
    degradation_scores,
    select_guaranteed,
)
from cascade.evaluation.points import (
    ORACLE,
    THRESHOLD_SOURCES,
    OperatingPoint,
    operating_points,
    oracle_budget_scores,
    oracle_scores,
    points_frame,
)
from cascade.evaluation.selection import Pick, select_by_accuracy, select_by_appeal_rate, select_by_cost
from cascade.evaluation.summaries import (
    KEYS,
    VALUES,
    aggregate,
    comparisons,
    gap_closed,
    gap_table,
    value_field,
)
from cascade.evaluation.sweep import (
    CascadePoint,
    CascadeSweep,
    cascade_point,
    cascade_sweep,
    cumulative_costs,
    exit_stages,
)
from cascade.evaluation.violations import threshold_violations

__all__ = [
    "KEYS",
    "ORACLE",
    "THRESHOLD_SOURCES",
    "VALUES",
    "CascadePoint",
    "CascadeSweep",
    "OperatingPoint",
    "Pick",
    "Variant",
    "aggregate",
    "binomial_p_value",
    "cascade_point",
    "cascade_sweep",
    "comparisons",
    "cumulative_costs",
    "degradation_scores",
    "exit_stages",
    "gap_closed",
    "gap_table",
    "operating_points",
    "oracle_budget_scores",
    "oracle_scores",
    "points_frame",
    "select_by_accuracy",
    "select_by_appeal_rate",
    "select_by_cost",
    "select_guaranteed",
    "sweep_costs",
    "threshold_violations",
    "value_field",
    "variant_arrays",
]
