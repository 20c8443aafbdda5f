"""``table_full.md``: every table of a run, beside the compact ``table.md``.

Per mode: the target-AD table (each method x threshold source x target, with the value,
its spread over seeds, the AD reached on test and the ratio against the best post-hoc
method), the gap closed to the oracle router, how often calibration-chosen thresholds
miss their target on re-splits, the budget tables and the methods at their own threshold
(with every other method at the same cost).
"""

from __future__ import annotations

from typing import Any

from cascade.core.enums import Mode, Selection, ThresholdSource
from cascade.evaluation.points import THRESHOLD_SOURCES
from cascade.evaluation.summaries import value_field
from cascade.report.budgets import budget_tables
from cascade.report.format import (
    MISSED,
    axes,
    header,
    method_kind,
    networks_table,
    pct,
    sig,
    title,
    value,
)

_MODE_TITLE = {
    Mode.WHITE_BOX: "White-box: mean cost in MFLOPs (MACs) at each accuracy-degradation target (AppealNet Table 1)",
    Mode.BLACK_BOX: "Black-box: appeal rate at each accuracy-degradation target (AppealNet Table 2)",
}
#: how each threshold source's tables are titled
_SOURCE = {s: f"thresholds {how}" + ("" if s == ThresholdSource.TEST else ", applied to test")
           for s, how in THRESHOLD_SOURCES.items()}
#: the threshold sources chosen on the calibration split, whose misses the re-splits count
_CHOSEN = (ThresholdSource.VAL, ThresholdSource.GUARANTEED)


def render_full(metrics: dict[str, Any]) -> str:
    """``table_full.md``: the title, the networks, then per mode every long table (module docstring)."""
    lines = [title(metrics), "", "Every table of the run; the recommendation and the compact tables are in table.md.",
             ""]
    lines += networks_table(metrics)
    points = metrics["operating_points"]
    for mode in metrics["modes"]:
        mine = [p for p in points if p["mode"] == mode]
        lines += _target_tables(metrics, mode, mine)
        lines += _gap_table(mode, [g for g in metrics.get("gap_closed", []) if g["mode"] == mode])
        lines += _violation_table(mode, [v for v in metrics.get("threshold_violations", []) if v["mode"] == mode])
        lines += _budget_tables(mode, mine)
        lines += _fixed_tables(mode, mine)
    budgets = budget_tables(metrics)
    if budgets:
        lines += ["## Appeal budgets", "", *budgets]
    return "\n".join(lines)


def _target_tables(metrics: dict, mode: str, points: list[dict]) -> list[str]:
    """One table per mode: a row per (method, threshold source), a column per target."""
    field = value_field(mode)
    fmt = pct if field == "appeal_rate" else value
    ratios = {(c["threshold_source"], c["target_ad"], c["method"]): c for c in metrics.get("comparisons", [])
              if c["mode"] == mode}
    part = {(p["method"], p["threshold_source"], p["target_ad"]): p for p in points
            if p["selection"] == Selection.TARGET_AD and p["threshold_source"] in THRESHOLD_SOURCES}
    if not part:
        return []
    targets = sorted({t for _, _, t in part})
    methods = list(dict.fromkeys(m for m, _, _ in part))
    sources = [s for s in THRESHOLD_SOURCES if any(k[1] == s for k in part)]
    lines = header(_MODE_TITLE[mode], ["method", "kind", "thresholds"], [f"AD {sig(t * 100)} %" for t in targets])
    for m in methods:
        for source in sources:
            if not any((m, source, t) in part for t in targets):
                continue  # the oracle router has test thresholds only
            cells = []
            for t in targets:
                p = part.get((m, source, t))
                if p is None:
                    cells.append("")
                    continue
                missed = p["ad"] > t + 1e-9
                cell = fmt(p[field], p.get(f"{field}_std"))
                cell += f" (AD {sig(p['ad'] * 100)} %{' ' + MISSED if missed else ''})"
                c = ratios.get((source, t, m))
                if c is not None and c["ratio"] is not None:
                    cell += f", {sig(c['ratio'])}x vs {c['best_post_hoc']}"
                cells.append(cell)
            lines.append(f"| {m} | {method_kind(metrics, m).replace('_', '-')} | {source} | " + " | ".join(cells) + " |")
    deltas = sorted({p["delta"] for p in part.values() if p.get("delta") is not None})
    lines += ["", "Thresholds: " + "; ".join(
        f"{s}: {_SOURCE[s]}" + (f", delta = {', '.join(map(sig, deltas))}" if s == ThresholdSource.GUARANTEED and deltas else "")
        for s in sources) + ".",
              (f"Each cell: the value, then (AD reached on test; {MISSED} = over its target). "
               "Nx vs M = the best post-hoc method M's value / this method's with the same thresholds (> 1: this "
               "method is cheaper), both printed in this table."), ""]
    return lines


def _gap_table(mode: str, rows: list[dict]) -> list[str]:
    """Each method's share of the best baseline's excess over the oracle router it removes."""
    if not rows:
        return []
    targets = sorted({g["target_ad"] for g in rows})
    cell = {(g["method"], g["threshold_source"], g["target_ad"]): g for g in rows}
    keys = list(dict.fromkeys((g["method"], g["threshold_source"]) for g in rows))
    keys.sort(key=lambda k: list(THRESHOLD_SOURCES).index(k[1]) if k[1] in THRESHOLD_SOURCES else 99)
    lines = header(f"{_MODE_TITLE[mode].split(':')[0]}: gap closed to the oracle router", ["method", "thresholds"],
                    [f"AD {sig(t * 100)} %" for t in targets])
    for m, source in keys:
        cells = []
        for t in targets:
            g = cell.get((m, source, t))
            cells.append("" if g is None or g["gap_closed"] is None else
                         f"{g['gap_closed'] * 100:.0f} % (vs {g['best_post_hoc']})")
        if not any(cells):
            continue  # no gap to close at any target (the baseline is at the oracle)
        lines.append(f"| {m} | {source} | " + " | ".join(cells) + " |")
    lines += ["", ("Gap closed = (best post-hoc - method) / (best post-hoc - oracle router), on the value of the "
                   "table above (the oracle with test thresholds: the limit; the best post-hoc with the row's "
                   "thresholds). 0 %: no better than the best baseline; 100 %: as good as the oracle; negative: "
                   "worse than the best baseline."), ""]
    return lines


def _violation_table(mode: str, rows: list[dict]) -> list[str]:
    """How often val and guaranteed thresholds miss their target on random re-splits."""
    if not rows:
        return []
    by = {(r["method"], r["threshold_source"], r["target_ad"]): r for r in rows}
    targets = sorted({t for _, _, t in by})
    methods = list(dict.fromkeys(m for m, _, _ in by))
    first = rows[0]
    lines = header(f"{mode.replace('_', '-')}: how often a threshold chosen on the calibration split misses its "
                    f"target (delta = {sig(first['delta'])})", ["method"],
                    [f"AD {sig(t * 100)} %: {s}" for t in targets for s in _CHOSEN])
    for m in methods:
        cells = []
        for t in targets:
            for s in _CHOSEN:
                r = by.get((m, s, t))
                cells.append("" if r is None else f"{pct(r['violation_rate'])} ({pct(r['pool_violation_rate'])})")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", (f"Each cell: the fraction of {first['resplits']} random re-splits of each seed's calibration + "
                   f"test rows (same sizes; mean over {first['seeds']} seed(s)) on which the threshold chosen on the "
                   "new calibration part gave an AD over the target on the new test part; in parentheses, over the "
                   "target on the whole pool, the population of that simulation: the event a guaranteed threshold "
                   "keeps under delta."), ""]
    return lines


def _budget_tables(mode: str, points: list[dict]) -> list[str]:
    lines = []
    for source in (ThresholdSource.TEST, ThresholdSource.VAL):
        part = {(p["method"], p["budget_fraction"]): p for p in points
                if p["selection"] == Selection.BUDGET and p["threshold_source"] == source}
        if not part:
            continue
        budgets, methods = axes(part)
        lines += header(f"{mode.replace('_', '-')}: accuracy within a mean-cost budget (fraction of the last "
                         f"stage's MFLOPs); {_SOURCE[source]}", ["method"], [f"<= {sig(b * 100)} %" for b in budgets])
        for m in methods:
            cells = []
            for b in budgets:
                p = part[(m, b)]
                over = p["cost_mflops"] is not None and p["cost_mflops"] > p["target_mflops"] * (1 + 1e-9)
                cells.append(pct(p["system_accuracy"], p.get("system_accuracy_std"))
                             + f" @ {sig(p['cost_mflops'])}" + (f" {MISSED}" if over or not p["feasible"] else ""))
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines += ["", f"Each cell: accuracy @ mean MFLOPs on test ({MISSED}: over the budget).", ""]
    return lines


def _fixed_tables(mode: str, points: list[dict]) -> list[str]:
    fixed = [p for p in points if p["selection"] == Selection.FIXED]
    if not fixed:
        return []
    lines = [f"## {mode.replace('_', '-')}: methods at their own threshold", "",
             "| method | variant | threshold | accuracy | MFLOPs | % of last stage | exits % (stage 0 / ... / last) |",
             "|---|---|---:|---:|---:|---:|---|"]
    for p in fixed:
        lines.append(f"| {p['method']} | {p['anchor']} | {sig(p['threshold'])} | "
                     f"{pct(p['system_accuracy'], p.get('system_accuracy_std'))} | "
                     f"{value(p['cost_mflops'], p.get('cost_mflops_std'))} | {pct(p['relative_cost'])} | "
                     f"{' / '.join(sig(f * 100) for f in p['exit_fractions'])} |")
    lines.append("")
    for source in (ThresholdSource.VAL, ThresholdSource.TEST):
        matched = {(p["anchor"], p["method"]): p for p in points
                   if p["selection"] == Selection.MATCHED_COST and p["threshold_source"] == source}
        if not matched:
            continue
        others = list(dict.fromkeys(m for _, m in matched))
        lines += [f"### Accuracy of the others at each such point's cost; {_SOURCE[source]}", "",
                  "| at the cost of | its accuracy | " + " | ".join(others) + " |",
                  "|---|---:|" + "---:|" * len(others)]
        for p in fixed:
            anchor = f"{p['method']} {p['anchor']}".strip()
            cells = []
            for m in others:
                q = matched.get((anchor, m))
                if q is None:
                    cells.append("")
                    continue
                flag = "" if q["feasible"] else f" {MISSED}"
                cells.append(f"{pct(q['system_accuracy'])} @ {sig(q['cost_mflops'])}{flag}")
            lines.append(f"| {anchor} ({sig(p['cost_mflops'])}) | {pct(p['system_accuracy'])} | "
                         + " | ".join(cells) + " |")
        lines += ["", f"Each cell: accuracy @ mean MFLOPs on test ({MISSED}: no threshold within that cost).", ""]
    return lines

