"""Tables (``table.md``, ``table.csv``) and figures of a multi-stage cascade run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cascade.multistage_eval import cascade_point, cascade_sweep, variant_arrays

_SOURCE = {
    "val": "thresholds chosen on the calibration split, applied to test",
    "test": "thresholds read off the test split",
}


def _pct(v: float | None, std: float | None = None) -> str:
    if v is None:
        return "n/a"
    s = f"{v * 100:.2f} %"
    return s + (f" ± {std * 100:.2f}" if std is not None else "")


def _mflops(v: float | None, std: float | None = None) -> str:
    if v is None:
        return "n/a"
    s = f"{v:.4g}"
    return s + (f" ± {std:.2g}" if std is not None else "")


def _exits(fr: list[float]) -> str:
    return " / ".join(f"{f * 100:.0f}" for f in fr)


def table_rows(metrics: dict[str, Any]) -> pd.DataFrame:
    """The long-form table: one row per aggregated operating point (exit fractions as ``a;b;c``)."""
    rows = []
    for p in metrics["operating_points"]:
        r = {k: v for k, v in p.items() if not isinstance(v, list)}
        r["exit_fractions"] = ";".join(f"{f:.6g}" for f in p["exit_fractions"])
        r["chosen_alpha"] = ";".join("" if a is None else f"{a:g}" for a in p["chosen_alpha"])
        rows.append(r)
    return pd.DataFrame(rows)


def render_markdown(metrics: dict[str, Any]) -> str:
    """Stages, the greedy policy against every method at matched cost, budgets, target ADs."""
    acc, acc_std = metrics["accuracy"], metrics.get("accuracy_std", {})
    k = metrics["num_stages"]
    ref = metrics["reference"]
    mode = metrics["modes"][0].replace("_", "-")
    lines = [f"# {metrics['task']}: {k}-stage cascade, seeds {metrics['seeds']} ({mode})", "",
             "## Stages alone (test split)", "",
             "| stage | MFLOPs (MACs) | params | accuracy |", "|---|---:|---:|---:|"]
    for name, c in metrics["networks"].items():
        params = "n/a (oracle)" if c["params"] is None else f"{c['params']:,}"
        lines.append(f"| {name} | {c['mflops']:.4g} | {params} | {_pct(acc.get(name), acc_std.get(name))} |")
    pol = metrics["policy"]
    lines += ["", f"Stopping policy: {pol['params']} params, "
                  f"{', '.join(f'{m * 1e6:.0f}' for m in pol['mflops_per_stage'])} MACs at each decision.", ""]

    points = metrics["operating_points"]
    methods = list(dict.fromkeys(p["method"] for p in points))
    others = [m for m in methods if m != "reinforce"]
    greedy = [p for p in points if p["selection"] == "greedy"]
    lines += ["## REINFORCE policy (greedy, P(stop) >= threshold) vs the largest stage alone", "",
              "| alpha | accuracy | MFLOPs | % of last stage's MFLOPs | exits % (stage 0 / ... / K-1) "
              "| vs last stage alone |",
              "|---:|---:|---:|---:|---|---:|"]
    for g in greedy:
        gain = g["system_accuracy"] - ref["accuracy"]
        lines.append(f"| {g['alpha']:g} | {_pct(g['system_accuracy'], g.get('system_accuracy_std'))} | "
                     f"{_mflops(g['cost_mflops'], g.get('cost_mflops_std'))} | {g['relative_cost'] * 100:.1f} % | "
                     f"{_exits(g['exit_fractions'])} | {gain * 100:+.2f} pt |")
    lines += ["", f"Last stage alone: {_pct(ref['accuracy'])} at {ref['mflops']:.4g} MFLOPs.", ""]

    for source in ("val", "test"):
        matched = {(p["alpha"], p["method"]): p for p in points
                   if p["selection"] == "matched_cost" and p["threshold_source"] == source}
        if not matched:
            continue
        lines += [f"## Accuracy at the policy's cost (matched MFLOPs); {_SOURCE[source]}", "",
                  "| alpha | MFLOPs | reinforce | " + " | ".join(others) + " |",
                  "|---:|---:|---:|" + "---:|" * len(others)]
        for g in greedy:
            cells = []
            for m in others:
                p = matched.get((g["alpha"], m))
                if p is None:
                    cells.append("n/a")
                    continue
                flag = "" if p["feasible"] else " (over budget)"
                cells.append(f"{_pct(p['system_accuracy'])} @ {p['cost_mflops']:.3g}{flag}")
            head = f"| {g['alpha']:g} | {g['cost_mflops']:.3g} | {_pct(g['system_accuracy'])} | "
            lines.append(head + " | ".join(cells) + " |")
        lines.append("")

    budgets = sorted({p["budget_fraction"] for p in points if p["selection"] == "budget"})
    targets = sorted({p["target_ad"] for p in points if p["selection"] == "target_ad"})
    for source in ("val", "test"):
        if budgets:
            part = {(p["method"], p["budget_fraction"]): p for p in points
                    if p["selection"] == "budget" and p["threshold_source"] == source}

            def budget_cell(p: dict) -> str:
                return _pct(p["system_accuracy"], p.get("system_accuracy_std")) + (
                    "" if p["feasible"] else " (infeasible)")

            lines += _grid(f"Accuracy at a mean-cost budget (fraction of the last stage's MFLOPs); {_SOURCE[source]}",
                           [f"<= {b * 100:g} %" for b in budgets], budgets, methods, part, budget_cell)
        if targets:
            part = {(p["method"], p["target_ad"]): p for p in points
                    if p["selection"] == "target_ad" and p["threshold_source"] == source}
            reference = "last stage alone" if metrics["modes"][0] == "white_box" else "oracle"

            def target_cell(p: dict) -> str:
                return (f"{_mflops(p['cost_mflops'], p.get('cost_mflops_std'))} (AD {p['ad'] * 100:.2f} %)"
                        + ("" if p["feasible"] else " (not reached)"))

            lines += _grid(f"Mean MFLOPs at a target accuracy degradation vs the {reference}; {_SOURCE[source]}",
                           [f"AD {t * 100:g} %" for t in targets], targets, methods, part, target_cell)
    return "\n".join(lines)


def _grid(title: str, headers: list[str], keys: list, methods: list[str], part: dict, cell) -> list[str]:
    """A markdown table: one row per method, one column per key, ``cell(point)`` in each."""
    lines = [f"## {title}", "", "| method | " + " | ".join(headers) + " |", "|---|" + "---:|" * len(headers)]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(cell(part[(m, k)]) for k in keys) + " |")
    return lines + [""]


def write_tables(metrics: dict[str, Any], out: Path) -> str:
    """``table.md`` and ``table.csv``; the markdown."""
    from cascade import report

    return report.write_tables(metrics, out, render_markdown, table_rows)


def write_figures(samples: pd.DataFrame, variants: dict, metrics: dict[str, Any], out: Path) -> None:
    """``accuracy_vs_mflops.png`` (test split of the first seed: every method's threshold
    sweep, the greedy policies, each stage alone) and ``exit_fractions.png`` (greedy
    policies, mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig_dir = out / "figures"
    fig_dir.mkdir(exist_ok=True)
    seed = metrics["seeds"][0]
    k = metrics["num_stages"]
    test = samples[(samples["seed"] == seed) & (samples["split"] == "test")]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (method, vs) in enumerate(variants.items()):
        color = colors[i % len(colors)]
        for j, v in enumerate(vs):
            sc, co = variant_arrays(test, v, k)
            sw = cascade_sweep(sc, co, v.stage_mflops)
            label = None if j > 0 else (method + " (threshold swept, per alpha)" if method == "reinforce" else method)
            ax.plot(sw.cost_mflops, sw.system_accuracy, color=color, lw=1.0 if method == "reinforce" else 1.5,
                    alpha=0.6 if method == "reinforce" else 1.0, label=label)
            if method == "reinforce":
                p = cascade_point(metrics["greedy_threshold"], sc, co, v.stage_mflops)
                ax.plot(p.cost_mflops, p.system_accuracy, "o", color=color, ms=7,
                        label="reinforce greedy" if j == 0 else None)
                ax.annotate(f"a={v.alpha:g}", (p.cost_mflops, p.system_accuracy), fontsize=7,
                            xytext=(3, -9), textcoords="offset points")
    for s in range(k):
        col = f"plain_s{s}_correct"
        ax.plot(metrics["stage_costs"][s], test[col].mean(), "s", color="k", ms=6,
                label="stages alone" if s == 0 else None)
        ax.annotate(f"stage {s}", (metrics["stage_costs"][s], test[col].mean()), fontsize=7, xytext=(4, 4),
                    textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("mean MFLOPs (MACs) per input")
    ax.set_ylabel("system accuracy")
    lo = min(test[f"plain_s{s}_correct"].mean() for s in range(k))
    ax.set_ylim(max(0.0, lo - 0.02), 1.0 + 1e-3)
    ax.set_title(f"{metrics['task']}: {k}-stage cascade, seed {seed}, test")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(fig_dir / "accuracy_vs_mflops.png", dpi=120)
    plt.close(fig)

    greedy = [p for p in metrics["operating_points"] if p["selection"] == "greedy"]
    fig, ax = plt.subplots(figsize=(1.2 + 0.8 * len(greedy), 3.5))
    bottom = np.zeros(len(greedy))
    for s in range(k):
        vals = np.array([g["exit_fractions"][s] for g in greedy])
        ax.bar([f"{g['alpha']:g}" for g in greedy], vals, bottom=bottom, label=f"stage {s}")
        bottom += vals
    ax.set_xlabel("alpha (REINFORCE, greedy)")
    ax.set_ylabel("fraction of inputs exiting")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(fig_dir / "exit_fractions.png", dpi=120)
    plt.close(fig)

