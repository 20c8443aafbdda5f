"""Tables of a run (``table.md``, ``table.csv``): views of one operating-point table.

Every number is printed to 3 significant digits; a ratio appears only beside the two
values it divides; a val-tuned or guaranteed point shows the AD it actually reached on
test and is marked when that misses its target.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from cascade.core.enums import Mode, Selection, ThresholdSource
from cascade.evaluation.points import ORACLE, THRESHOLD_SOURCES
from cascade.evaluation.summaries import value_field

_MODE_TITLE = {
    Mode.WHITE_BOX: "White-box: mean cost in MFLOPs (MACs) at each accuracy-degradation target (AppealNet Table 1)",
    Mode.BLACK_BOX: "Black-box: appeal rate at each accuracy-degradation target (AppealNet Table 2)",
}
#: how each threshold source's tables are titled
_SOURCE = {s: f"thresholds {how}" + ("" if s == ThresholdSource.TEST else ", applied to test")
           for s, how in THRESHOLD_SOURCES.items()}
#: the threshold sources chosen on the calibration split, whose misses the re-splits count
_CHOSEN = (ThresholdSource.VAL, ThresholdSource.GUARANTEED)
#: marks a val-tuned point whose test AD missed its target, or an infeasible one
MISSED = "✗"


def sig(x: float | None, digits: int = 3) -> str:
    """``x`` to ``digits`` significant digits, without exponent for everyday magnitudes
    (``0.00237``, ``1.00``, ``12.2``, ``1,234``)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    x = float(f"{x:.{digits}g}")  # round first: 0.99996 is 1.00, not 1.000
    if x == 0:
        return "0"
    magnitude = math.floor(math.log10(abs(x)))
    if magnitude >= digits - 1:
        return f"{x:,.0f}"
    if magnitude < -6:
        return f"{x:.{digits - 1}e}"
    return f"{x:.{max(0, digits - 1 - magnitude)}f}"


def pct(x: float | None, std: float | None = None) -> str:
    """A fraction as a percentage to 3 significant digits (``± std`` when given)."""
    if x is None:
        return "n/a"
    s = f"{sig(x * 100)} %"
    return s + (f" ± {sig(std * 100)}" if std is not None else "")


def value(x: float | None, std: float | None = None) -> str:
    if x is None:
        return "n/a"
    return sig(x) + (f" ± {sig(std)}" if std is not None else "")


def method_kind(metrics: dict, method: str) -> str:
    """A method's kind in the run (``trained``, ``post_hoc``...), ``limit`` for the oracle router."""
    if method == ORACLE:
        return "limit"
    return metrics["methods"].get(method, {}).get("kind", "")


def table_rows(metrics: dict[str, Any]) -> pd.DataFrame:
    """The long-form table: one row per aggregated operating point (lists as ``a;b;c``)."""
    rows = []
    for p in metrics["operating_points"]:
        r = {k: v for k, v in p.items() if not isinstance(v, list)}
        r["kind"] = method_kind(metrics, p["method"])
        r["exit_fractions"] = ";".join(f"{f:.6g}" for f in p["exit_fractions"])
        r["variants"] = ";".join(p["variants"])
        rows.append(r)
    return pd.DataFrame(rows)


def render_markdown(metrics: dict[str, Any]) -> str:
    """The recommendation, networks, then per mode: the target-AD table (test-tuned, val-tuned and guaranteed
    thresholds side by side), how often val and guaranteed thresholds miss their target
    on re-splits, budget tables and the methods' own thresholds against every other
    method at matched cost."""
    lines = [f"# {metrics['task']}: {metrics['num_stages']}-stage cascade, seeds {metrics['seeds']}", ""]
    lines += recommendation_section(metrics)
    lines += _networks(metrics)
    points = metrics["operating_points"]
    for mode in metrics["modes"]:
        mine = [p for p in points if p["mode"] == mode]
        lines += _target_tables(metrics, mode, mine)
        lines += _gap_table(mode, [g for g in metrics.get("gap_closed", []) if g["mode"] == mode])
        lines += _violation_table(mode, [v for v in metrics.get("threshold_violations", []) if v["mode"] == mode])
        lines += _budget_tables(mode, mine)
        lines += _fixed_tables(mode, mine)
    return "\n".join(lines)


def recommendation_section(metrics: dict[str, Any]) -> list[str]:
    """``## Recommendation``: per mode and target, the guaranteed choice and the val one
    beside it (``metrics.json: recommendation``); nothing for metrics without one."""
    rec = metrics.get("recommendation")
    if not rec or not rec["choices"]:
        return []
    by = {(c["mode"], c["target_ad"], c["threshold_source"]): c for c in rec["choices"]}
    lines = ["## Recommendation", ""]
    for mode, target in dict.fromkeys((m, t) for m, t, _ in by):
        parts: list[str] = []
        for s in (ThresholdSource.GUARANTEED, ThresholdSource.VAL):
            if (c := by.get((mode, target, s))) is not None:
                parts.append(_choice(c, first=not parts))
        lines.append(f"- {mode}, AD ≤ {sig(target * 100)} %: " + ". Beside it, ".join(parts) + ".")
    lines += ["", (f"Ratios: chosen / other, of the cost white-box and the appeal rate black-box (< 1: the chosen "
                   f"is cheaper), {int(rec['level'] * 100)} % interval "
                   f"from a {rec['interval']}, {rec['resamples']} resamples. {rec['rule'].capitalize()}. "
                   f"{MISSED}: missed its target on test (never the best)."), ""]
    return lines


def _choice(c: dict, first: bool) -> str:
    """One source's choice: method, threshold, rate, cost, and its comparisons."""
    rate = (f"keeps {pct(c['skipping_rate'])}" if c["mode"] == Mode.WHITE_BOX else f"appeals {pct(c['appeal_rate'])}")
    none = sum(not math.isfinite(t) for t in c["thresholds"])  # no certified threshold: all to the last stage
    thr = (f"threshold {sig(c['threshold'])}" if not none else "none certified: all to the last stage"
           if none == len(c["thresholds"]) else f"none certified on {none} of {len(c['thresholds'])} seeds")
    s = f"{'deploy ' if first else ''}{c['method']} ({c['threshold_source']}, {thr}, {rate})"
    if not c["target_met"]:
        s += f" {MISSED} AD {sig(c['ad'] * 100)} %"
    if c["cost_mflops"] is not None:
        s += f", {sig(c['cost_mflops'])} MFLOPs"
    x = c["times_cheaper"]
    if x is not None:
        last = " than the last stage" if first else ""
        s += f", {sig(x)}x cheaper{last}" if x >= 1 else f", {sig(1 / x)}x the last stage's cost"
    vs, missed = c["vs_msp"], f" {MISSED}" if "msp" in c["flagged"] else ""
    s += f"; vs msp{missed}: " + ("—" if vs is None else vs if isinstance(vs, str) else _versus(vs))
    if c["vs_runner_up"] is not None:
        s += f"; vs runner-up {c['vs_runner_up']['method']}: {_versus(c['vs_runner_up'])}"
    if len(c["tied"]) > 1:
        s += f"; {len(c['tied'])} tied"
    return s


def _versus(v: dict) -> str:
    def r(x: float) -> str:  # a ratio over a zero cost is inf
        return sig(x) if math.isfinite(x) else "∞"

    return f"{r(v['ratio'])}x [{r(v['low'])}, {r(v['high'])}] ({v['verdict']})"


def _networks(metrics: dict) -> list[str]:
    acc, acc_std = metrics["accuracy"], metrics.get("accuracy_std", {})
    errors, errors_std = metrics.get("errors", {}), metrics.get("errors_std", {})
    names = list(dict.fromkeys(e for per in errors.values() for e in per))
    lines = ["## Networks (test split)", "",
             "| network | MFLOPs (MACs) | params | accuracy |" + "".join(f" mean {e} |" for e in names),
             "|---|---:|---:|---:|" + "---:|" * len(names)]
    rows = [(n, c["mflops"], c["params"]) for n, c in metrics["networks"].items()]
    for system, meta in metrics["systems"].items():
        for k, mflops in enumerate(meta["stage_mflops"]):
            rows.append((f"{system}_stage{k}", mflops, None))
    for name, mflops, params in rows:
        cells = [value(errors.get(name, {}).get(e), errors_std.get(name, {}).get(e)) for e in names]
        p = "" if params is None else f"{params:,}"
        lines.append(f"| {name} | {sig(mflops)} | {p} | {pct(acc.get(name), acc_std.get(name))} |"
                     + "".join(f" {c} |" for c in cells))
    for mode, cost in metrics["last_stage_mflops"].items():
        if mode == Mode.BLACK_BOX:
            lines.append(f"| black-box oracle | {sig(cost)} | | 100 % (by definition) |" + " |" * len(names))
    lines.append("")
    for system, meta in metrics["systems"].items():
        heads = ", ".join(sig(m * 1e6) for m in meta["head_mflops"])
        lines.append(f"- {system}: routing heads add {heads} MACs and {meta['head_params']:,} params.")
    return lines + [""]


def _axes(part: dict[tuple[str, float], dict]) -> tuple[list[float], list[str]]:
    """The columns (targets or budgets, ascending) and rows (methods, in run order) of a grid."""
    return sorted({t for _, t in part}), list(dict.fromkeys(m for m, _ in part))


def _header(title: str, labels: list[str], columns: list[str]) -> list[str]:
    """A section title and a markdown table head: text ``labels`` first, numeric ``columns`` after."""
    return [f"## {title}", "", "| " + " | ".join(labels + columns) + " |",
            "|" + "---|" * len(labels) + "---:|" * len(columns)]


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
    lines = _header(_MODE_TITLE[mode], ["method", "kind", "thresholds"], [f"AD {sig(t * 100)} %" for t in targets])
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
    lines = _header(f"{_MODE_TITLE[mode].split(':')[0]}: gap closed to the oracle router", ["method", "thresholds"],
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
    lines = _header(f"{mode.replace('_', '-')}: how often a threshold chosen on the calibration split misses its "
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
        budgets, methods = _axes(part)
        lines += _header(f"{mode.replace('_', '-')}: accuracy within a mean-cost budget (fraction of the last "
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


def write_tables(metrics: dict[str, Any], writer: Any) -> str:
    """``table.md`` and ``table.csv`` through the run's writer; the markdown."""
    md = render_markdown(metrics)
    writer.text("table.md", md + "\n")
    writer.csv("table.csv", table_rows(metrics))
    return md
