"""The appeal-budget tables of ``table.md``: per mode, what each method gains over the little
network at fixed appeal rates, with intervals, and its share of the oracle router's gain.

They read ``metrics.json``'s ``appeal_budgets`` (:mod:`cascade.evaluation.budgets`) alone.
"""

from __future__ import annotations

from typing import Any

from cascade.core.enums import Mode, ThresholdSource
from cascade.evaluation.points import ORACLE

#: the mode's heading
_TITLES = {Mode.WHITE_BOX: "White-box", Mode.BLACK_BOX: "Black-box"}
#: the threshold sources in table order, the deployable one first
_SOURCES = (ThresholdSource.VAL, ThresholdSource.TEST)


def _signed(x: float | None) -> str:
    return "—" if x is None else f"{x * 100:+.2f}"


def gain_cell(row: dict[str, Any]) -> str:
    """``+0.85 [+0.40, +1.30] · 32 % [15, 50]``: the gain in accuracy points with its
    interval, then the share of the oracle router's gain with its interval.

    Example: gain 0.0085 in [0.004, 0.013], share 0.32 in [0.15, 0.50] gives the string above.
    """
    text = f"{_signed(row['gain'])} [{_signed(row['gain_low'])}, {_signed(row['gain_high'])}]"
    if row.get("share") is None:
        return f"{text} · —"
    share = f"{row['share'] * 100:.0f} %"
    if row.get("share_low") is not None:
        share += f" [{row['share_low'] * 100:.0f}, {row['share_high'] * 100:.0f}]"
    return f"{text} · {share}"


def _kind(metrics: dict[str, Any], method: str) -> str:
    """A method's kind in the run, ``limit`` for the oracle router."""
    return "limit" if method == ORACLE else metrics.get("methods", {}).get(method, {}).get("kind", "").replace("_", "-")


def _mode_table(metrics: dict[str, Any], mode: str, rows: list[dict[str, Any]]) -> list[str]:
    """One mode's table: a row per (method, threshold source) and the oracle router, a column per budget."""
    budgets = sorted({r["appeal_budget"] for r in rows})
    cells = {(r["method"], r["threshold_source"], r["appeal_budget"]): r for r in rows}
    order = list(dict.fromkeys((r["method"], r["threshold_source"]) for r in rows))
    order.sort(key=lambda k: (k[0] == ORACLE, _SOURCES.index(k[1]) if k[1] in _SOURCES else len(_SOURCES)))
    little = rows[0]["little_accuracy"]
    lines = [f"### {_TITLES.get(Mode(mode), mode)}: accuracy gained at fixed appeal budgets", "",
             f"Test accuracy gained over the plain little network alone ({little * 100:.2f} %), in points, "
             "with its 95 % interval, then the share of the oracle router's gain at the same budget. Appeal "
             "rate: the fraction of inputs that reach the last stage. val: thresholds chosen on the "
             "calibration split; test: read off the test split (not deployable); the oracle router: the limit.",
             "", "| method | kind | thresholds | " + " | ".join(f"{b * 100:g} %" for b in budgets) + " |",
             "|---|---|---|" + "---|" * len(budgets)]
    for method, source in order:
        row = [gain_cell(c) if (c := cells.get((method, source, b))) else "—" for b in budgets]
        lines.append(f"| {method} | {_kind(metrics, method)} | {source} | " + " | ".join(row) + " |")
    lines.append("")
    return lines


def _choices(choices: list[dict[str, Any]]) -> list[str]:
    """One line per budget: the method recommended at val thresholds and the tied ones."""
    if not choices:
        return []
    lines = []
    for c in choices:
        others = [m for m in c["tied"] if m != c["method"]]
        tied = f"; tied with it: {', '.join(others)}" if others else ""
        best = f" (largest gain: {c['best']})" if c["best"] != c["method"] else ""
        lines.append(f"- {c['appeal_budget'] * 100:g} %: {c['method']}, {_signed(c['gain'])} points{best}{tied}"
                     f"{versus_text(c.get('learned_vs_confidence'))}")
    return ["Recommended at each appeal budget (val thresholds; the simplest method tied with the largest "
            "gain; then the best learned method's gain over the best confidence score's, 95 % interval):", "",
            *lines, ""]


def versus_text(v: dict[str, Any] | None) -> str:
    """``; learned gain_head / confidence gap: 1.62x [1.31, 2.05], ahead``, or "" without both groups.

    Example: the confidence score gains nothing: ``; learned gain_head / confidence msp: n/a (msp gains
    nothing), ahead`` (the verdict is then read off the difference of the gains).
    """
    if not v:
        return ""
    head = f"; learned {v['learned']} / confidence {v['confidence']}: "
    if v["ratio"] is None:
        return f"{head}n/a ({v['confidence']} gains nothing), {v['verdict']}"
    ci = f" [{v['low']:.2f}, {v['high']:.2f}]" if v["low"] is not None else ""
    return f"{head}{v['ratio']:.2f}x{ci}, {v['verdict']}"


def budget_tables(metrics: dict[str, Any], sources: tuple[str, ...] = _SOURCES) -> list[str]:
    """The appeal-budget section: per mode, rows = methods (val, then test thresholds)
    and the oracle router, columns = budgets, cells = :func:`gain_cell`; then the
    recommendation at each budget. Empty without appeal-budget rows.

    Args:
        metrics: a run's ``metrics.json``.
        sources: the methods' threshold sources shown (``table.md``: val alone;
            ``table_full.md``: val and test); the oracle router is always shown.

    Returns:
        Markdown lines.
    """
    section = metrics.get("appeal_budgets") or {}
    rows = [r for r in section.get("rows", []) if r["method"] == ORACLE or r["threshold_source"] in sources]
    lines: list[str] = []
    for mode in metrics.get("modes", []):
        mine = [r for r in rows if r["mode"] == mode]
        if not mine:
            continue
        lines += _mode_table(metrics, mode, mine)
        lines += _choices([c for c in section.get("choices", []) if c["mode"] == mode])
    if lines:
        lines += [f"Intervals: {section['interval']}, {section['resamples']} resamples.", ""]
    return lines
