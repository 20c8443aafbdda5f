"""Tables of a run: the compact, decision-ready ``table.md``, the long ``table_full.md``
(:mod:`cascade.report.full`) and the long-form ``table.csv``.

``table.md``: the title; the recommendation, one table per mode with a row per target
and threshold source (guaranteed first: the one to deploy; val beside it); the networks;
then per mode one table of the deployable points (val and guaranteed thresholds) of every
method at every target, each value with its 95 % interval (``metrics.json: intervals``)
and marked when it missed its target on test; and a paper-comparison table of the
test-tuned points (optimistic: thresholds read off the test split). Every number is
printed to 3 significant digits.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from cascade.core.enums import Mode, Selection, ThresholdSource
from cascade.evaluation.intervals import interval_index
from cascade.evaluation.points import ORACLE
from cascade.evaluation.summaries import value_field
from cascade.report.format import (
    MISSED,
    header,
    method_kind,
    networks_table,
    note,
    pct,
    sig,
    title,
    value,
)
from cascade.report.budgets import budget_tables
from cascade.report.full import render_full
from cascade.runs.layout import TABLE, TABLE_CSV, TABLE_FULL

__all__ = ["MISSED", "method_kind", "pct", "recommendation_section", "render_markdown", "sig", "table_rows",
           "value", "write_tables"]

#: the deployable threshold sources, in the order the tables show them
DEPLOYABLE = (ThresholdSource.GUARANTEED, ThresholdSource.VAL)
#: what each mode's value is, as a table title says it
_VALUE = {Mode.WHITE_BOX: "mean MFLOPs (MACs) per input", Mode.BLACK_BOX: "appeal rate (%)"}
_TITLE = {Mode.WHITE_BOX: "White-box", Mode.BLACK_BOX: "Black-box"}


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
    """``table.md``: the title, the recommendation, the networks, then per mode the
    deployable points with their intervals and the paper-comparison (test-tuned) points."""
    lines = [title(metrics), ""]
    lines += recommendation_section(metrics)
    lines += networks_table(metrics)
    intervals = interval_index(metrics)
    chosen = {(c["mode"], c["method"], c["threshold_source"], c["target_ad"])
              for c in (metrics.get("recommendation") or {}).get("choices", [])}
    for mode in metrics["modes"]:
        mine = [p for p in metrics["operating_points"] if p["mode"] == mode and p["selection"] == Selection.TARGET_AD]
        lines += deployable_table(metrics, mode, mine, intervals, chosen)
        lines += paper_table(metrics, mode, mine)
    budgets = budget_tables(metrics, (ThresholdSource.VAL,))
    if budgets:
        lines += ["## Appeal budgets (val thresholds; test-tuned rows in table_full.md)", "", *budgets]
    lines += [f"The long tables (each threshold source, gap closed, re-split misses and more): {TABLE_FULL}.", ""]
    return "\n".join(lines)


def recommendation_section(metrics: dict[str, Any]) -> list[str]:
    """``## Recommendation``: per mode a table, a row per target and threshold source:
    the guaranteed choice (bold: deploy it) and the val one beside it
    (``metrics.json: recommendation``); nothing for metrics without one."""
    rec = metrics.get("recommendation")
    if not rec or not rec["choices"]:
        return []
    lines = ["## Recommendation", ""]
    modes = list(dict.fromkeys(c["mode"] for c in rec["choices"]))
    for mode in modes:
        mine = [c for c in rec["choices"] if c["mode"] == mode]
        if len(modes) > 1:
            lines += [f"### {_TITLE.get(mode, mode)}", ""]
        rate, saving = (("keeps", "vs big alone") if mode == Mode.WHITE_BOX else ("appeals", "oracle calls"))
        lines += ["| AD ≤ | thresholds | method | threshold | " + f"{rate} | MFLOPs | {saving} | "
                  "vs msp: ratio [95 % CI] | vs runner-up: ratio [95 % CI] | tied |",
                  "|---:|---|---|---:|---:|---:|---:|---|---|---:|"]
        previous = None
        for c in mine:
            target = "" if c["target_ad"] == previous else f"{sig(c['target_ad'] * 100)} %"
            previous = c["target_ad"]
            lines.append(f"| {target} | " + " | ".join(_choice_cells(c)) + " |")
        lines.append("")
    lines += note(f"Ratios: chosen / other ({_what(modes)}; < 1: the chosen is cheaper), {int(rec['level'] * 100)} % "
                  f"CI from a paired bootstrap over the test inputs ({rec['resamples']} resamples, stratified by seed, "
                  "thresholds fixed); ahead / behind: the CI lies under / over 1. **Bold**: deploy it (guaranteed: AD "
                  "≤ target with probability ≥ 1 - delta); val: tuned on the calibration split, cheaper, no "
                  "guarantee. Tied: methods whose ratio to the best has a CI containing 1 (of all methods); the "
                  "simplest tied one is chosen: post-hoc before trained, then fewer routing-head parameters. "
                  f"{MISSED}: missed its target on test.")
    return lines


def _what(modes: list[str]) -> str:
    """What a ratio divides, in the recommendation's modes."""
    return " and ".join({Mode.WHITE_BOX: "of the cost white-box", Mode.BLACK_BOX: "of the appeal rate black-box"}
                        .get(m, m) for m in modes)


def _choice_cells(c: dict) -> list[str]:
    """One recommendation row after its target: source, method, threshold, rate, MFLOPs,
    the saving, vs msp, vs the runner-up, the tied count."""
    first = c["threshold_source"] == ThresholdSource.GUARANTEED
    method = f"**{c['method']}**" if first else c["method"]
    if not c["target_met"]:
        method += f" {MISSED} AD {sig(c['ad'] * 100)} %"
    none = sum(not math.isfinite(t) for t in c["thresholds"])  # no certified threshold: all to the last stage
    thr = (sig(c["threshold"]) if not none else "none certified (all to the last stage)"
           if none == len(c["thresholds"]) else f"none certified on {none} of {len(c['thresholds'])} seeds")
    white = c["mode"] == Mode.WHITE_BOX
    rate = pct(c["skipping_rate"] if white else c["appeal_rate"])
    vs = c["vs_msp"]
    msp = "— (it is msp)" if vs is None else vs if isinstance(vs, str) else _versus(vs, c["mode"], name=False)
    if "msp" in c["flagged"]:
        msp += f" (msp {MISSED})"
    runner = "— (no other met the target)" if c["vs_runner_up"] is None else _versus(c["vs_runner_up"], c["mode"])
    n = len(c["ratio_to_best"])
    return [c["threshold_source"], method, thr, rate, sig(c["cost_mflops"]), _saving(c), msp, runner,
            f"{len(c['tied'])} of {n}"]


def _saving(c: dict) -> str:
    """White-box: how many times cheaper than the big network alone; black-box: how many
    times fewer oracle calls than sending it every input (the black-box cost is the
    appeal rate)."""
    if c["mode"] != Mode.WHITE_BOX:
        a = c["appeal_rate"]
        return "none at all (0 appeals)" if a == 0 else "none saved (all appeal)" if a >= 1 else f"{sig(1 / a)}x fewer"
    x = c["times_cheaper"]
    if x is None:
        return "n/a"
    return f"{sig(x)}x cheaper" if x >= 1 else f"{sig(1 / x)}x dearer"


def _versus(v: dict, mode: str, name: bool = True) -> str:
    """``[other ]ratio x [low, high] verdict``; a ratio over a zero value has none."""
    who = f"{v['method']} " if name else ""
    if not math.isfinite(v["ratio"]):  # "∞x": the other one costs nothing
        zero = "costs 0" if mode == Mode.WHITE_BOX else "makes 0 appeals"
        return f"{who}n/a ({'it' if name else v['method']} {zero}), {v['verdict']}"

    def r(x: float) -> str:
        return sig(x) if math.isfinite(x) else "∞"

    return f"{who}{r(v['ratio'])}x [{r(v['low'])}, {r(v['high'])}] {v['verdict']}"


def _fmt(mode: str, x: float | None) -> str:
    """A value of ``mode``: MFLOPs, or the appeal rate in percent (no sign: the head says so)."""
    if x is None:
        return "n/a"
    return sig(x) if mode == Mode.WHITE_BOX else sig(x * 100)


def deployable_table(metrics: dict, mode: str, points: list[dict], intervals: dict[tuple, dict],
                     chosen: set[tuple]) -> list[str]:
    """One table per mode: a row per (deployable source, method), a column per target; each
    cell the value with its 95 % interval, bold where recommended, :data:`MISSED` with the
    AD reached where it missed its target on test."""
    field = value_field(mode)
    part = {(p["method"], p["threshold_source"], p["target_ad"]): p for p in points
            if p["threshold_source"] in DEPLOYABLE}
    if not part:
        return []
    targets = sorted({t for _, _, t in part})
    methods = list(dict.fromkeys(m for m, _, _ in part))
    lines = header(f"{_TITLE.get(mode, mode)}: {_VALUE[mode]} at each AD target, 95 % CI, deployable thresholds",
                   ["method", "kind", "thresholds"], [f"AD ≤ {sig(t * 100)} %" for t in targets])
    for source in DEPLOYABLE:
        for m in methods:
            cells = []
            for t in targets:
                p = part.get((m, source, t))
                if p is None:
                    cells.append("")
                    continue
                cell = _fmt(mode, p[field])
                ci = intervals.get((mode, m, source, t))
                if ci is not None:
                    cell += f" [{_fmt(mode, ci['low'])}, {_fmt(mode, ci['high'])}]"
                if (mode, m, source, t) in chosen:
                    cell = f"**{cell}**"
                if p["ad"] > t + 1e-9:
                    cell += f" {MISSED} AD {sig(p['ad'] * 100)} %"
                cells.append(cell)
            if any(cells):
                lines.append(f"| {m} | {method_kind(metrics, m).replace('_', '-')} | {source} | "
                             + " | ".join(cells) + " |")
    deltas = sorted({p["delta"] for p in part.values() if p.get("delta") is not None})
    lines += ["", *note(f"Thresholds chosen on the calibration split, applied to test (guaranteed: certified, delta = "
                   f"{', '.join(map(sig, deltas)) or 'n/a'}). [95 % CI]: bootstrap over the test inputs, thresholds "
                   f"fixed, stratified by seed, seeds pooled. **Bold**: recommended. {MISSED}: over its target on "
                   "test (the AD reached).")]
    return lines


def paper_table(metrics: dict, mode: str, points: list[dict]) -> list[str]:
    """The test-tuned points, for comparison with the papers' numbers only (the mean over
    seeds ± their std)."""
    field = value_field(mode)
    part = {(p["method"], p["target_ad"]): p for p in points if p["threshold_source"] == ThresholdSource.TEST}
    if not part:
        return []
    targets = sorted({t for _, t in part})
    methods = list(dict.fromkeys(m for m, _ in part))
    fmt = pct if field == "appeal_rate" else value
    lines = header(f"{_TITLE.get(mode, mode)}, paper comparison: thresholds tuned on test (optimistic)",
                   ["method", "kind"], [f"AD ≤ {sig(t * 100)} %" for t in targets])
    for m in methods:
        cells = ["" if (p := part.get((m, t))) is None else fmt(p[field], p.get(f"{field}_std")) for t in targets]
        lines.append(f"| {m} | {method_kind(metrics, m).replace('_', '-')} | " + " | ".join(cells) + " |")
    lines += ["", *note("Thresholds read off the test split itself, as the AppealNet paper's tables do: optimistic, not "
                   f"deployable; for comparison with the papers' numbers only. ±: std over seeds. {ORACLE} = the "
                   "oracle router, the limit.")]
    return lines


def write_tables(metrics: dict[str, Any], writer: Any) -> str:
    """``table.md``, ``table_full.md`` and ``table.csv`` through the run's writer; ``table.md``'s text."""
    md = render_markdown(metrics)
    writer.text(TABLE, md + "\n")
    writer.text(TABLE_FULL, render_full(metrics) + "\n")
    writer.csv(TABLE_CSV, table_rows(metrics))
    return md
