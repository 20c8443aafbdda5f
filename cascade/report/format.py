"""What every table of a run shares: numbers to 3 significant digits, the miss mark, a
method's kind, table heads, the title and the networks table."""

from __future__ import annotations

import math
import textwrap
from typing import Any

from cascade.core.enums import Mode
from cascade.evaluation.points import ORACLE

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


def networks_table(metrics: dict) -> list[str]:
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


def axes(part: dict[tuple[str, float], dict]) -> tuple[list[float], list[str]]:
    """The columns (targets or budgets, ascending) and rows (methods, in run order) of a grid."""
    return sorted({t for _, t in part}), list(dict.fromkeys(m for m, _ in part))


def header(title: str, labels: list[str], columns: list[str]) -> list[str]:
    """A section title and a markdown table head: text ``labels`` first, numeric ``columns`` after."""
    return [f"## {title}", "", "| " + " | ".join(labels + columns) + " |",
            "|" + "---|" * len(labels) + "---:|" * len(columns)]




def title(metrics: dict[str, Any]) -> str:
    """The first line of ``table.md`` and ``table_full.md``."""
    return f"# {metrics['task']}: {metrics['num_stages']}-stage cascade, seeds {metrics['seeds']}"


def note(text: str, width: int = 150) -> list[str]:
    """A paragraph under a table, wrapped to ``width`` (markdown joins the lines), and a blank line."""
    return [*textwrap.wrap(text, width, break_on_hyphens=False), ""]
