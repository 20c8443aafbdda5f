"""Figures of a run (``figures/*.png``): threshold sweeps against cost, score histograms,
threshold violations and the gap closed to the oracle router."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from cascade.core.enums import Mode, Selection, ThresholdSource
from cascade.evaluation.columns import (
    Variant,
    correct_array,
    sweep_costs,
    variant_arrays,
)
from cascade.evaluation.points import oracle_scores
from cascade.evaluation.sweep import cascade_point, cascade_sweep
from cascade.report.tables import method_kind, sig


def write_figures(samples: pd.DataFrame, variants: list[Variant], metrics: dict[str, Any], writer: Any) -> None:
    """Per mode, ``accuracy_vs_cost_<mode>.png``: every method's threshold sweep on each
    seed's test split (one faint line per seed: the spread across seeds), its own-threshold
    points, each plain stage alone, and the recommended points (``metrics.json:
    recommendation``, guaranteed: a star per target); ``score_histograms.png``: each
    method's first-stage score on the first seed, inputs the stage gets right vs wrong; and
    ``threshold_violations.png`` when the run simulated re-splits."""
    plt = _pyplot()
    test = samples[samples["split"] == "test"]
    tests = {int(s): f for s, f in test.groupby("seed", sort=True)}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for mode in metrics["modes"]:
        _accuracy_vs_cost_figure(metrics, tests, mode, [v for v in variants if v.mode == mode], colors, writer, plt)
    _violation_figure(metrics, writer, plt)
    _gap_figure(metrics, writer, plt)
    first = tests[min(tests)] if tests else test
    _score_histograms(first, [v for v in variants if v.mode == metrics["modes"][0]], writer, plt)


def _pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend."""
    # matplotlib is a heavy import that only figure writing needs: loaded here, so that
    # `cascade --help`, route and serve never import it
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _accuracy_vs_cost_figure(metrics: dict[str, Any], tests: dict[int, pd.DataFrame], mode: Mode,
                             mine: list[Variant], colors: list[str], writer: Any, plt: Any) -> None:
    """``accuracy_vs_cost_<mode>.png`` (see :func:`write_figures`); the x axis is the skipping
    rate when the last stage's cost is unknown."""
    fig, ax = plt.subplots(figsize=(8.5, 4.8))
    unknown_cost = any(v.stage_mflops[-1] is None for v in mine)
    alpha = 1.0 if len(tests) == 1 else 0.45
    for i, (seed, test) in enumerate(tests.items()):
        _sweep_curves(ax, metrics, test, mine, unknown_cost, colors, alpha, label=i == 0)
        if mine:  # the oracle router on the plain stages: the limit
            plain = next((v for v in mine if method_kind(metrics, v.method) == "post_hoc"), mine[0])
            co = correct_array(test, plain)
            sw = cascade_sweep(oracle_scores(co, seed), co, sweep_costs(plain))
            x = 1 - sw.exit_counts[:, -1] / sw.n if unknown_cost else sw.cost_mflops
            ax.plot(x, sw.system_accuracy, color="k", lw=1, ls=":", alpha=alpha,
                    label="oracle router (limit)" if i == 0 else None)
    frames = list(tests.values())
    last = mine[0].correct_columns[-1] if mine else None
    ref = 1.0 if last is None else float(np.mean([t[last].mean() for t in frames]))
    ax.axhline(ref, color="k", ls="--", lw=1, label="big alone (mean over seeds)" if last else "oracle")
    if unknown_cost:
        ax.set_xlabel("skipping rate (answered before the oracle)")
    else:
        ax.set_xscale("log")
        ax.set_xlabel("mean MFLOPs (MACs) per input")
        for k in range(metrics["num_stages"] - 1):  # each plain stage alone: its own cost, its accuracy
            acc = [t[f"stage{k}_correct"].mean() for t in frames]
            ax.plot([metrics["networks"][f"stage{k}"]["mflops"]] * len(acc), acc, "s", color="k", ms=4,
                    label="plain stages alone (each seed)" if k == 0 else None)
    _recommended(ax, metrics, mode, unknown_cost)
    ax.set_ylabel("system accuracy")
    ax.set_title(f"{metrics['task']} {mode.replace('_', '-')}, test split, {len(tests)} seed(s): a line per seed",
                 fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: the curves stay visible
    fig.tight_layout()
    writer.figure(fig, f"accuracy_vs_cost_{mode}.png")


def _recommended(ax: Any, metrics: dict[str, Any], mode: str, unknown_cost: bool) -> None:
    """A star at each recommended (guaranteed) point of ``mode``, at its mean cost and
    accuracy over seeds, labelled with its method and the targets it is recommended for."""
    points = {(p["method"], p["threshold_source"], p["target_ad"]): p for p in metrics["operating_points"]
              if p["mode"] == mode and p["selection"] == Selection.TARGET_AD}
    spots: dict[tuple, list[float]] = {}
    for c in (metrics.get("recommendation") or {}).get("choices", []):
        p = points.get((c["method"], c["threshold_source"], c["target_ad"]))
        if c["mode"] != mode or c["threshold_source"] != ThresholdSource.GUARANTEED or p is None:
            continue
        x = p["skipping_rate"] if unknown_cost else p["cost_mflops"]
        spots.setdefault((c["method"], x, p["system_accuracy"]), []).append(c["target_ad"])
    for n, ((method, x, y), targets) in enumerate(spots.items()):
        ax.plot(x, y, "*", ms=15, mfc="gold", mec="k", mew=1, zorder=5, label="recommended" if n == 0 else None)
        ax.annotate(f"{method}, AD ≤ {', '.join(sig(t * 100) for t in targets)} %", (x, y), fontsize=7,
                    xytext=(-8, 7 + 9 * (n % 2)), textcoords="offset points", ha="right", zorder=6,
                    bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none", "alpha": 0.8})


def _sweep_curves(ax: Any, metrics: dict[str, Any], test: pd.DataFrame, mine: list[Variant], unknown_cost: bool,
                  colors: list[str], alpha: float = 1.0, label: bool = True) -> None:
    """Each variant's threshold sweep on one seed's test split (a method's first variant
    labelled when ``label``, the others paler), and its own threshold's point."""
    methods = list(dict.fromkeys(v.method for v in mine))
    for v in mine:
        color = colors[methods.index(v.method) % len(colors)]
        sc, co = variant_arrays(test, v)
        costs = sweep_costs(v)
        sw = cascade_sweep(sc, co, costs)
        x = 1 - sw.exit_counts[:, -1] / sw.n if unknown_cost else sw.cost_mflops
        first = v is next(u for u in mine if u.method == v.method)
        kind = method_kind(metrics, v.method)
        ax.plot(x, sw.system_accuracy, color=color, lw=1.6 if kind == "trained" else 0.9,
                alpha=alpha if first else alpha / 2, label=v.method if first and label else None)
        if v.fixed_threshold is not None:
            p = cascade_point(v.fixed_threshold, sc, co, costs)
            at = 1 - p.exit_fractions[-1] if unknown_cost else p.cost_mflops
            ax.plot(at, p.system_accuracy, "o", color=color, ms=5, alpha=alpha)
            if label:
                ax.annotate(v.variant, (at, p.system_accuracy), fontsize=7, xytext=(3, -9),
                            textcoords="offset points")


def _score_histograms(test: pd.DataFrame, variants: list[Variant], writer: Any, plt: Any) -> None:
    """``score_histograms.png``: each method's (first variant's) first-stage score, inputs
    the stage gets right vs wrong."""
    firsts = list({v.method: v for v in reversed(variants)}.values())[::-1]
    if not firsts:
        return
    fig, axes = plt.subplots(1, len(firsts), figsize=(3.2 * len(firsts), 3), squeeze=False)
    for ax, v in zip(axes[0], firsts):
        right = test[v.correct_columns[0]].to_numpy(bool)
        score = test[v.score_columns[0]].to_numpy(float)
        bins = np.linspace(score.min(), score.max() + 1e-9, 30)
        for group, label in ((right, "stage 0 right"), (~right, "stage 0 wrong")):
            if group.any():  # a stage right on every input has no "wrong" histogram to draw
                ax.hist(score[group], bins=bins, alpha=0.6, density=True, label=label)
        ax.set_title(v.method)
        ax.set_xlabel("score")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    writer.figure(fig, "score_histograms.png")


def _violation_figure(metrics: dict[str, Any], writer: Any, plt: Any) -> None:
    """``threshold_violations.png``: per mode, how often val and guaranteed thresholds miss
    their target on re-splits' test parts (bars: the mean over methods, dots: each method;
    dashes: the mean rate on the whole pool, the event the guarantee bounds), and delta."""
    rows = metrics.get("threshold_violations") or []
    fig, panels = _mode_panels(metrics, rows, plt, (5, 3.6))
    if not panels:
        return
    for ax, mode in panels:
        mine = [r for r in rows if r["mode"] == mode]
        targets = sorted({r["target_ad"] for r in mine})
        x = np.arange(len(targets))
        for offset, source in ((-0.2, ThresholdSource.VAL), (0.2, ThresholdSource.GUARANTEED)):
            rates = [[r["violation_rate"] for r in mine if r["target_ad"] == t and r["threshold_source"] == source]
                     for t in targets]
            ax.bar(x + offset, [np.mean(r) for r in rates], width=0.4, alpha=0.7, label=f"{source} (mean over methods)")
            for i, r in enumerate(rates):
                ax.plot(np.full(len(r), x[i] + offset), r, ".", color="k", ms=4,
                        label="each method" if i == 0 and source == ThresholdSource.VAL else None)
            pool = [np.mean([r["pool_violation_rate"] for r in mine if r["target_ad"] == t
                             and r["threshold_source"] == source]) for t in targets]
            ax.plot(x + offset, pool, "_", color="k", ms=14, mew=2,
                    label="on the pool (the risk)" if source == ThresholdSource.VAL else None)
        ax.axhline(mine[0]["delta"], color="r", ls="--", lw=1, label=f"delta = {sig(mine[0]['delta'])}")
        ax.set_xticks(x, [f"{sig(t * 100)} %" for t in targets])
        ax.set_xlabel("AD target")
        ax.set_ylabel("fraction of re-splits over the target (test part)")
        ax.set_ylim(0, 1)
        ax.set_title(f"{metrics['task']} {mode.replace('_', '-')}: {mine[0]['resplits']} re-splits x "
                     f"{mine[0]['seeds']} seed(s)", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    writer.figure(fig, "threshold_violations.png")


def _gap_figure(metrics: dict[str, Any], writer: Any, plt: Any) -> None:
    """``gap_closed.png``: per mode, each method's gap closed to the oracle router at each
    target AD, val-tuned thresholds (the deployable figure)."""
    rows = [g for g in metrics.get("gap_closed", []) if g["threshold_source"] == ThresholdSource.VAL
            and g["gap_closed"] is not None]
    fig, panels = _mode_panels(metrics, rows, plt, (5.5, 3.8))
    if not panels:
        return
    for ax, mode in panels:
        mine = [g for g in rows if g["mode"] == mode]
        targets = sorted({g["target_ad"] for g in mine})
        methods = list(dict.fromkeys(g["method"] for g in mine))
        width = 0.8 / len(methods)
        for i, m in enumerate(methods):
            vals = {g["target_ad"]: g["gap_closed"] for g in mine if g["method"] == m}
            ax.bar(np.arange(len(targets)) + i * width, [vals.get(t, np.nan) * 100 for t in targets], width, label=m)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(np.arange(len(targets)) + 0.4 - width / 2, [f"{sig(t * 100)} %" for t in targets])
        ax.set_xlabel("target AD")
        ax.set_ylabel("gap closed to the oracle router (%)")
        ax.set_title(f"{metrics['task']} {mode.replace('_', '-')}, val thresholds")
        ax.legend(fontsize=7)
    fig.tight_layout()
    writer.figure(fig, "gap_closed.png")


def _mode_panels(metrics: dict[str, Any], rows: list[dict], plt: Any, size: tuple[float, float]) -> tuple[Any, list]:
    """A figure with one panel per mode that has ``rows``, and ``[(axes, mode)]`` (empty: no figure)."""
    modes = [m for m in metrics["modes"] if any(r["mode"] == m for r in rows)]
    if not modes:
        return None, []
    fig, axes = plt.subplots(1, len(modes), figsize=(size[0] * len(modes), size[1]), squeeze=False)
    return fig, list(zip(axes[0], modes))
