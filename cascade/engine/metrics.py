"""What the evaluation reads of a run and what ``metrics.json`` holds.

:func:`build_variants` names, per mode and method, the ``samples.csv`` columns of each
routed system and its stages' costs (:class:`~cascade.evaluation.Variant`);
:func:`build_metrics` assembles ``metrics.json`` from the per-sample table, the
networks' costs and the operating points.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from typing import Any

import pandas as pd
from torch import nn

from cascade.contracts.methods import MethodKind, RoutedSystem
from cascade.core.enums import Mode
from cascade.engine.phases import Systems, build_oracle
from cascade.engine.plan import Plan
from cascade.evaluation import ORACLE, Variant, aggregate, comparisons, gap_table
from cascade.evaluation.budgets import appeal_budget_summary
from cascade.evaluation.intervals import point_intervals
from cascade.evaluation.recommend import Deployable, recommend
from cascade.methods.catalogue import MethodEntry, scorer_key
from cascade.nn.cost import measure_cost
from cascade.runs.layout import (
    BIG,
    column,
    scorer_column,
    stage_name,
    system_stage_name,
)

#: a trained system whose first-stage scores on the test split all lie within this range has collapsed
COLLAPSE_RANGE = 1e-3


def network_costs(plan: Plan, plain: list, big: nn.Module | None) -> dict[str, dict]:
    """``network name -> cost`` of the plain stages and the big network."""
    shape = plan.task.input_shape
    costs = {stage_name(k): measure_cost(n, shape).as_dict() for k, n in enumerate(plain)}
    if big is not None:
        costs[BIG] = measure_cost(big, shape).as_dict()
    return costs


def last_column(mode: Mode) -> str | None:
    """The last stage's correctness column: the big network's (white-box), or none (black-box: always right)."""
    return column(BIG, "correct") if mode == Mode.WHITE_BOX else None


def last_cost(plan: Plan, mode: Mode, costs: dict) -> float | None:
    """The last stage's MFLOPs in ``mode``."""
    return build_oracle(plan, mode, None, costs).cost_mflops if mode == Mode.BLACK_BOX else costs[BIG]["mflops"]


def plain_variant(plan: Plan, method: str, mode: Mode, costs: dict, r: int, key: str | None) -> Variant:
    """A system of the plain stages: their correctness and costs, and the scores of post-hoc
    method ``key`` (None: no score columns, the oracle router's)."""
    scores = () if key is None else tuple(scorer_column(stage_name(k), key) for k in range(r))
    return Variant(method, mode.value, "", scores, (*(column(stage_name(k), "correct") for k in range(r)),
                                                     last_column(mode)),
                   (*(costs[stage_name(k)]["mflops"] for k in range(r)), last_cost(plan, mode, costs)))


def oracle_variants(plan: Plan, costs: dict, r: int) -> list[Variant]:
    """Per mode, the plain stages' correctness and costs: what the oracle router routes."""
    return [plain_variant(plan, ORACLE, mode, costs, r, None) for mode in plan.modes]


def build_variants(plan: Plan, systems: Systems, costs: dict, plain: list) -> tuple[list[Variant], dict[str, dict]]:
    """Every routed system's :class:`Variant`, per mode and method in config order, and
    ``metrics.json``'s ``systems``: each trained system's costs and sizes."""
    r = len(plain)
    variants, meta = [], {}
    for mode in plan.modes:
        for entry in plan.methods:
            if entry.kind == MethodKind.POST_HOC:
                variants.append(plain_variant(plan, entry.label, mode, costs, r, scorer_key(entry, mode)))
                continue
            for name, (e, m, system) in systems.items():
                if e is entry and m == mode:
                    variant, meta[name] = _system_variant(plan, entry, name, mode, system, costs, r)
                    variants.append(variant)
    return variants, meta


def _system_variant(plan: Plan, entry: MethodEntry, name: str, mode: Mode, system: RoutedSystem, costs: dict,
                    r: int) -> tuple[Variant, dict]:
    """Trained system ``name``'s variant and its ``systems`` entry in ``metrics.json``."""
    stage_costs = [measure_cost(s, plan.task.input_shape) for s in system.stages]
    prefixes = [system_stage_name(name, k) for k in range(r)]
    variant = Variant(entry.label, mode.value, system.variant, tuple(column(p, "score") for p in prefixes),
                      (*(column(p, "correct") for p in prefixes), last_column(mode)),
                      (*(c.mflops for c in stage_costs), last_cost(plan, mode, costs)), system.fixed_threshold)
    params = sum(p.numel() for p in system.module().parameters())
    plain_params = sum(costs[stage_name(k)]["params"] for k in range(r))
    meta = {"method": entry.label, "mode": mode.value, "variant": system.variant,
            "stage_mflops": [c.mflops for c in stage_costs],
            "head_mflops": [c.mflops - costs[stage_name(k)]["mflops"] for k, c in enumerate(stage_costs)],
            "params": params, "head_params": params - plain_params, **system.info}
    return variant, meta


def build_metrics(plan: Plan, samples: pd.DataFrame, costs: dict, systems: dict[str, dict], variants: list[Variant],
                  rows: list[dict], error_names: set[str], histories: dict[str, list]) -> dict[str, Any]:
    """``metrics.json`` (but ``threshold_violations``, added by the experiment when asked for).

    Args:
        plan: the run's plan.
        samples: the per-sample table.
        costs: the networks' costs (:func:`network_costs`).
        systems: the trained systems' entries (:func:`build_variants`).
        variants: every routed system's variant.
        rows: every operating point.
        error_names: the criterion's extra per-sample errors (columns ``<network>_<name>``).
        histories: every training phase's loss history, by phase.
    """
    test = samples[samples["split"] == "test"]
    points = aggregate(rows)
    trained = [m.label for m in plan.trained_methods]
    post_hoc = [m.label for m in plan.post_hoc_methods]
    deployable = Deployable(samples, variants, rows)  # the bootstrap, drawn once for both
    return {
        "task": plan.cfg.task.name,
        "kind": plan.kind.value,
        "config": plan.source,
        "workdir": os.getcwd(),
        "seeds": list(plan.cfg.seeds),
        "modes": [m.value for m in plan.modes],
        "num_stages": len(plan.stage_specs) + 1,
        "flops_unit": "MFLOPs = millions of multiply-accumulates (the AppealNet paper's FLOPs)",
        # the big network is listed only where it runs (white-box); black-box runs may use its cost alone
        "networks": {k: v for k, v in costs.items() if k != BIG or Mode.WHITE_BOX in plan.modes},
        "last_stage_mflops": {m.value: last_cost(plan, m, costs) for m in plan.modes},
        "methods": {m.label: {"kind": m.kind.value, "confidence_score": m.confidence_score} for m in plan.methods},
        "systems": systems,
        **_accuracies(samples, test),
        **_error_means(test, sorted(error_names)),
        "variants": [asdict(v) for v in variants],
        "operating_points": points,
        "comparisons": comparisons(points, trained, post_hoc),
        "gap_closed": gap_table(points, post_hoc),
        "recommendation": recommend(samples, variants, rows, {m.label: m.kind for m in plan.methods},
                                    _head_params(systems), {m.value: last_cost(plan, m, costs) for m in plan.modes},
                                    deployable),
        "intervals": point_intervals(deployable),
        "appeal_budgets": appeal_budget_summary(samples, variants, rows,
                                                oracle_variants(plan, costs, len(plan.stage_specs)),
                                                {m.label: m.kind for m in plan.methods}, _head_params(systems),
                                                {m.label for m in plan.methods if m.confidence_score}),
        "predictor_collapsed": _collapsed(test, systems),
        "training": histories,
    }


def _head_params(systems: dict[str, dict]) -> dict[tuple[str, str], int]:
    """``(mode, method) -> its routing heads' parameters`` (the most of its variants')."""
    out: dict[tuple[str, str], int] = {}
    for meta in systems.values():
        key = (meta["mode"], meta["method"])
        out[key] = max(out.get(key, 0), meta["head_params"])
    return out


def _accuracies(samples: pd.DataFrame, test: pd.DataFrame) -> dict[str, dict[str, float]]:
    """``accuracy[network]``: the mean over seeds of each network's test accuracy; ``accuracy_std`` across seeds."""
    acc_cols = [c for c in samples.columns if c.endswith("_correct")]
    by_seed = test.groupby("seed")[acc_cols].mean()
    strip = len("_correct")
    accuracy = {c[:-strip]: float(by_seed[c].mean()) for c in acc_cols}
    accuracy_std = {c[:-strip]: float(by_seed[c].std(ddof=1)) for c in acc_cols} if len(by_seed) > 1 else {}
    return {"accuracy": accuracy, "accuracy_std": accuracy_std}


def _collapsed(test: pd.DataFrame, systems: dict[str, dict]) -> dict[str, list[int]]:
    """``system -> seeds`` on which its first stage's test scores lie within :data:`COLLAPSE_RANGE`."""
    collapsed = {}
    for name in systems:
        spread = test.groupby("seed")[column(system_stage_name(name, 0), "score")].agg(
            lambda s: float(s.max() - s.min()))
        collapsed[name] = [int(s) for s, v in spread.items() if v < COLLAPSE_RANGE]
    return collapsed


def _error_means(test: pd.DataFrame, names: list[str]) -> dict[str, dict]:
    """``errors[network][name]``: mean over seeds of each network's mean per-sample error
    on the test split (e.g. RMSE for regression), and ``errors_std`` across seeds."""
    errors: dict[str, dict[str, float]] = {}
    errors_std: dict[str, dict[str, float]] = {}
    for col in test.columns:
        for name in names:
            if col.endswith(f"_{name}"):
                by_seed = test.groupby("seed")[col].mean()
                net = col[: -len(name) - 1]
                errors.setdefault(net, {})[name] = float(by_seed.mean())
                if len(by_seed) > 1:
                    errors_std.setdefault(net, {})[name] = float(by_seed.std(ddof=1))
    return {"errors": errors, "errors_std": errors_std}
