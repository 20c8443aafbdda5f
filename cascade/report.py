"""Paper-style tables (``table.md``, ``table.csv``) and figures from a run's results."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cascade.thresholds import sweep

_MODE_TITLE = {
    "white_box": "White-box: system cost in MFLOPs (MACs) at each accuracy degradation (AppealNet Table 1)",
    "black_box": "Black-box: appeal rate at each accuracy degradation (AppealNet Table 2)",
}
_SOURCE_TITLE = {
    "test": "thresholds read off the test split (as the paper)",
    "val": "thresholds chosen on the calibration split, applied to test",
}


def _fmt(mean: float | None, std: float | None, pct: bool) -> str:
    if mean is None:
        return "n/a"
    scale, unit = (100.0, "%") if pct else (1.0, "")
    digits = 2 if pct else 4
    s = f"{mean * scale:.{digits}f}{unit}"
    if std is not None:
        s += f" ± {std * scale:.{digits}f}"
    return s


def table_rows(metrics: dict[str, Any]) -> pd.DataFrame:
    """The long-form table: one row per (mode, source, method, target) with its value."""
    ratios = {(s["mode"], s["threshold_source"], s["target_ad"], s["baseline"]): s["ratio"] for s in metrics["savings"]}
    rows = []
    for p in metrics["operating_points"]:
        field = "cost_mflops" if p["mode"] == "white_box" else "appeal_rate"
        rows.append({
            "mode": p["mode"], "threshold_source": p["threshold_source"], "method": p["method"],
            "target_ad": p["target_ad"], "field": field, "value": p[field], "std": p.get(f"{field}_std"),
            "skipping_rate": p["skipping_rate"], "system_accuracy": p["system_accuracy"], "ad": p["ad"],
            "appealnet_saving": None if p["method"] == "appealnet"
            else ratios.get((p["mode"], p["threshold_source"], p["target_ad"], p["method"])),
        })
    return pd.DataFrame(rows)


def render_markdown(metrics: dict[str, Any]) -> str:
    """Networks, then one table per (mode, threshold source)."""
    acc, acc_std = metrics["accuracy"], metrics.get("accuracy_std", {})
    # the criterion's extra per-sample errors (e.g. regression's RMSE), as mean columns
    errors, errors_std = metrics.get("errors", {}), metrics.get("errors_std", {})
    error_names = list(dict.fromkeys(name for per_net in errors.values() for name in per_net))
    lines = [f"# {metrics['task']}: seeds {metrics['seeds']}", "", "## Networks (test split)", "",
             "| network | MFLOPs (MACs) | params | accuracy |" + "".join(f" mean {e} |" for e in error_names),
             "|---|---:|---:|---:|" + "---:|" * len(error_names)]
    for name, c in metrics["networks"].items():
        a = acc.get(name)
        cells = [_fmt(errors.get(name, {}).get(e), errors_std.get(name, {}).get(e), False) for e in error_names]
        lines.append(f"| {name} | {c['mflops']:.4f} | {c['params']:,} | {_fmt(a, acc_std.get(name), True)} |"
                     + "".join(f" {cell} |" for cell in cells))
    head = metrics["predictor_head"]
    lines += ["", f"Predictor head: {head['mflops'] * 1e6:.0f} MACs, {head['params']} params "
                  f"({head['relative_mflops'] * 100:.2f} % of the little network's MACs).", ""]
    table = table_rows(metrics)
    for mode in metrics["modes"]:
        for source in ("test", "val"):
            part = table[(table["mode"] == mode) & (table["threshold_source"] == source)]
            if part.empty:
                continue
            pct = mode == "black_box"
            targets = sorted(part["target_ad"].unique())
            lines += [f"## {_MODE_TITLE[mode]}; {_SOURCE_TITLE[source]}", "",
                      "| method | " + " | ".join(f"AD {t * 100:g} %" for t in targets) + " |",
                      "|---|" + "---:|" * len(targets)]
            methods = list(dict.fromkeys(part["method"]))
            for method in methods:
                cells = []
                for t in targets:
                    r = part[(part["method"] == method) & (part["target_ad"] == t)].iloc[0]
                    std = None if pd.isna(r["std"]) else r["std"]
                    cell = _fmt(r["value"], std, pct)
                    if method != "appealnet" and r["appealnet_saving"] is not None and not pd.isna(r["appealnet_saving"]):
                        cell += f" ({r['appealnet_saving']:.2f}x)"
                    cells.append(cell)
                lines.append(f"| {method} | " + " | ".join(cells) + " |")
            lines += ["", "(Nx) = the baseline's value / AppealNet's: > 1 means AppealNet is cheaper.", ""]
    return "\n".join(lines)


def write_tables(metrics: dict[str, Any], out: Path, render=None, rows=None) -> str:
    """``table.md`` (``render(metrics)``) and ``table.csv`` (``rows(metrics)``); the markdown.

    The defaults are the AppealNet tables; other experiments pass their own renderers.
    """
    md = (render or render_markdown)(metrics)
    (out / "table.md").write_text(md + "\n")
    (rows or table_rows)(metrics).to_csv(out / "table.csv", index=False)
    return md


def write_figures(samples: pd.DataFrame, routes: dict, metrics: dict[str, Any], out: Path) -> None:
    """Accuracy vs skipping rate per mode, and score histograms (little right vs wrong).

    Curves use the test split of the first seed.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig_dir = out / "figures"
    fig_dir.mkdir(exist_ok=True)
    seed = metrics["seeds"][0]
    test = samples[(samples["seed"] == seed) & (samples["split"] == "test")]
    for mode in metrics["modes"]:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for (m, method), r in routes.items():
            if m != mode:
                continue
            big = np.ones(len(test), bool) if r.big_correct is None else test[r.big_correct].to_numpy(bool)
            sw = sweep(test[r.score].to_numpy(float), test[r.little_correct].to_numpy(bool), big)
            ax.plot(sw.skipping_rate, sw.system_accuracy, label=method, lw=2 if method == "appealnet" else 1)
        big_acc = 1.0 if mode == "black_box" else test["big_correct"].mean()
        ax.axhline(big_acc, color="k", ls="--", lw=1, label="big alone" if mode == "white_box" else "oracle")
        ax.set_xlabel("skipping rate (kept on the little network)")
        ax.set_ylabel("system accuracy")
        ax.set_title(f"{metrics['task']} {mode.replace('_', '-')}, seed {seed}, test")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(fig_dir / f"accuracy_vs_skipping_{mode}.png", dpi=120)
        plt.close(fig)

    methods = [(m, r) for (mode, m), r in routes.items() if mode == metrics["modes"][0]]
    fig, axes = plt.subplots(1, len(methods), figsize=(3.2 * len(methods), 3), squeeze=False)
    for ax, (method, r) in zip(axes[0], methods):
        right = test[r.little_correct].to_numpy(bool)
        score = test[r.score].to_numpy(float)
        bins = np.linspace(score.min(), score.max() + 1e-9, 30)
        ax.hist(score[right], bins=bins, alpha=0.6, density=True, label="little right")
        ax.hist(score[~right], bins=bins, alpha=0.6, density=True, label="little wrong")
        ax.set_title(method)
        ax.set_xlabel("score")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(fig_dir / "score_histograms.png", dpi=120)
    plt.close(fig)
