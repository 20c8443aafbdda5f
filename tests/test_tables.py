"""The compact table.md (cascade/report/tables.py) and each deployable point's 95 % interval
(cascade/evaluation/intervals.py): known answers worked by hand."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import cascade.evaluation.recommend as rec_module
from cascade.core.enums import Mode
from cascade.evaluation import aggregate
from cascade.evaluation.columns import Variant
from cascade.evaluation.intervals import interval_index, point_intervals
from cascade.evaluation.points import operating_points
from cascade.evaluation.recommend import (
    Deployable,
    bootstrap_means,
    bootstrap_weights,
    percentile_interval,
    pooled_means,
)
from cascade.report.tables import deployable_table, paper_table, recommendation_section

# ------------------------------------------------------------------ the bootstrap's known answers


def test_identical_values_give_a_zero_width_interval_at_that_value():
    values = [np.full((50, 1), 0.25), np.full((30, 1), 0.25)]
    boot = bootstrap_means(values, resamples=200)
    assert percentile_interval(boot[:, 0]) == (0.25, 0.25)


def test_two_inputs_resampled_give_the_binomial_means():
    # inputs 0 and 1: a resample draws 0, 1 or 2 copies of the 1, with probability 1/4, 1/2, 1/4,
    # so the mean is 0, 0.5 or 1; the 2.5 % and 97.5 % quantiles are then 0 and 1
    boot = bootstrap_means([np.array([[0.0], [1.0]])], resamples=4000)[:, 0]
    assert set(np.unique(boot)) == {0.0, 0.5, 1.0}
    share = {v: float(np.mean(boot == v)) for v in (0.0, 0.5, 1.0)}
    # 4000 draws: each share within 4 standard errors (sqrt(p (1 - p) / 4000) <= 0.008)
    assert share[0.5] == pytest.approx(0.5, abs=0.032) and share[0.0] == pytest.approx(0.25, abs=0.028)
    assert percentile_interval(boot) == (0.0, 1.0)


def test_seeds_are_resampled_apart_and_pooled():
    # seed A's inputs are 0 and 0, seed B's 0 and 1: pooled = (0 + mean_B) / 2 is 0, 0.25 or 0.5
    # (never 0.75 or 1, which mixing the seeds' inputs would allow); the interval is [0, 0.5]
    values = [np.array([[0.0], [0.0]]), np.array([[0.0], [1.0]])]
    boot = bootstrap_means(values, resamples=1000)[:, 0]
    assert set(np.unique(boot)) == {0.0, 0.25, 0.5}
    assert percentile_interval(boot) == (0.0, 0.5)


def test_percentile_interval_is_by_rank():
    # 1000 draws 0..999: the 26th smallest (index 25) and the 975th (index 974)
    assert percentile_interval(np.arange(1000.0)[::-1]) == (25.0, 974.0)
    assert percentile_interval(np.array([1.0, np.inf, 2.0, 3.0])) == (1.0, np.inf)  # an inf draw stays a rank


def test_chunked_draws_are_the_dense_ones_and_bounded(monkeypatch):
    rng = np.random.default_rng(3)
    values = [rng.random((700, 3)), rng.random((400, 3))]
    dense = pooled_means(values, bootstrap_weights([700, 400], resamples=300, seed=5))
    shapes = []
    draw = rec_module._draw
    monkeypatch.setattr(rec_module, "_draw", lambda g, n, k: shapes.append((k, n)) or draw(g, n, k))
    chunked = bootstrap_means(values, resamples=300, seed=5, cells=7000)
    assert np.allclose(chunked, dense, rtol=0, atol=1e-12)  # the same counts, drawn 10 resamples at a time
    assert max(k * n for k, n in shapes) <= 7000 and sum(k for k, n in shapes if n == 700) == 300
    # the run's default: about four million counts at once (32 MB), whatever the split's size
    shapes.clear()
    bootstrap_means([np.zeros((20_000, 1))], resamples=200)
    assert max(k * n for k, n in shapes) <= rec_module.CHUNK_CELLS


# ------------------------------------------------------------------ the intervals of a run's points

N = 300


def _samples() -> pd.DataFrame:
    """Two seeds, a little network right on 90 % of inputs (cost 1), the big one always (cost 10);
    ``sure`` scores every input 1 (all kept), ``half`` knows nothing."""
    parts = []
    for seed in (0, 1):
        for split in ("cal", "test"):
            rng = np.random.default_rng(10 * seed + (split == "test"))
            correct = rng.random(N) < 0.9
            parts.append(pd.DataFrame({"seed": seed, "split": split, "stage0_correct": correct, "big_correct": True,
                                       "stage0_score_sure": 1.0, "stage0_score_half": rng.random(N)}))
    return pd.concat(parts, ignore_index=True)


def _variant(name: str) -> Variant:
    return Variant(name, Mode.WHITE_BOX, "", (f"stage0_score_{name}",), ("stage0_correct", "big_correct"), (1.0, 10.0))


def test_each_deployable_point_gets_its_value_and_interval():
    samples = _samples()
    variants = [_variant("sure"), _variant("half")]
    rows = operating_points(samples, variants, {"white_box": [0.1, 0.2]}, delta=0.1)
    out = point_intervals(Deployable(samples, variants, rows, resamples=500))
    assert out["level"] == 0.95 and out["resamples"] == 500 and "stratified by seed" in out["method"]
    got = interval_index({"intervals": out})
    points = {(p["mode"], p["method"], p["threshold_source"], p["target_ad"]): p for p in aggregate(rows)
              if p["selection"] == "target_ad"}
    # every val and guaranteed point, none test-tuned
    assert set(got) == {k for k in points if k[2] in ("val", "guaranteed")}
    for key, ci in got.items():
        assert ci["field"] == "cost_mflops"
        assert ci["value"] == pytest.approx(points[key]["cost_mflops"], abs=1e-12)  # the point's own value
        assert ci["low"] <= ci["value"] <= ci["high"]
    # "sure" keeps every input whenever its threshold is at most 1 (AD 10 % is reachable: the
    # little network is wrong on ~10 %): every input costs 1, so the interval is [1, 1]
    kept = [ci for (_, m, _, _), ci in got.items() if m == "sure" and ci["value"] == pytest.approx(1.0)]
    assert kept and all((ci["low"], ci["high"]) == (1.0, 1.0) for ci in kept)
    # "half" appeals a share p_s of seed s's inputs, each costing 1 + 10 = 11 against 1: the pooled
    # mean (m_0 + m_1) / 2 has variance (100 p_0 (1 - p_0) / N + 100 p_1 (1 - p_1) / N) / 4, and
    # the 95 % interval spans about 2 x 1.96 standard deviations of it
    per_seed = {}
    for r in rows:
        if r["method"] == "half" and r["selection"] == "target_ad" and r["threshold_source"] != "test":
            per_seed.setdefault((r["threshold_source"], r["target_ad"]), []).append(r["appeal_rate"])
    assert len(per_seed) == 4
    widths = []
    for (source, target), rates in per_seed.items():
        ci = got["white_box", "half", source, target]
        sd = np.sqrt(sum(100 * p * (1 - p) / N for p in rates) / 4)
        widths.append(ci["high"] - ci["low"])
        assert widths[-1] == pytest.approx(2 * 1.96 * sd, rel=0.2), (source, target, rates)
    assert min(widths) > 0  # neither all nor no inputs appeal: a real spread


# ------------------------------------------------------------------ table.md's rendering


def _choice(**over) -> dict:
    c = {"mode": "white_box", "target_ad": 0.01, "threshold_source": "guaranteed", "method": "msp",
         "threshold": 0.862, "thresholds": [0.85, 0.874], "skipping_rate": 0.793, "appeal_rate": 0.207,
         "cost_mflops": 0.0742, "times_cheaper": 4.68, "ad": 0.0006, "target_met": True,
         "tied": ["msp", "entropy"], "ratio_to_best": {"msp": {}, "entropy": {}, "gap": {}},
         "vs_msp": None, "flagged": [],
         "vs_runner_up": {"method": "entropy", "ratio": 1.0, "low": 0.965, "high": 1.04, "verdict": "tied"}}
    return {**c, **over}


def test_the_recommendation_is_a_table_a_row_per_target_and_source():
    val = _choice(threshold_source="val", method="gap", threshold=0.0877, skipping_rate=0.988, cost_mflops=0.00644,
                  times_cheaper=53.9, tied=["gap"], flagged=["msp"],
                  vs_msp={"method": "msp", "ratio": 0.406, "low": 0.315, "high": 0.507, "verdict": "ahead"},
                  vs_runner_up={"method": "msp_ts", "ratio": 0.652, "low": 0.522, "high": 0.81, "verdict": "ahead"})
    lines = recommendation_section({"recommendation": {"level": 0.95, "resamples": 1000, "choices": [_choice(), val]}})
    assert lines[:3] == ["## Recommendation", "",
                         ("| AD ≤ | thresholds | method | threshold | keeps | MFLOPs | vs big alone | "
                          "vs msp: ratio [95 % CI] | vs runner-up: ratio [95 % CI] | tied |")]
    assert lines[4] == ("| 1.00 % | guaranteed | **msp** | 0.862 | 79.3 % | 0.0742 | 4.68x cheaper | — (it is msp) | "
                        "entropy 1.00x [0.965, 1.04] tied | 2 of 3 |")
    assert lines[5] == ("|  | val | gap | 0.0877 | 98.8 % | 0.00644 | 53.9x cheaper | 0.406x [0.315, 0.507] ahead "
                        "(msp ✗) | msp_ts 0.652x [0.522, 0.810] ahead | 1 of 3 |")
    assert lines[6] == "" and "1000 resamples" in " ".join(lines[7:])
    assert all(len(line) < 200 for line in lines)


def test_black_box_rows_count_oracle_calls_and_never_print_infinite_ratios():
    c = _choice(mode="black_box", target_ad=0.05, threshold_source="val", appeal_rate=0.00123, cost_mflops=0.0028,
                times_cheaper=124.0, thresholds=[0.3, 0.33], threshold=0.313, tied=["msp"],
                vs_runner_up={"method": "deferral_head", "ratio": float("inf"), "low": 1.0, "high": float("inf"),
                              "verdict": "tied"})
    none = _choice(mode="black_box", target_ad=0.005, appeal_rate=1.0, skipping_rate=0.0, cost_mflops=0.35,
                   threshold=float("inf"), thresholds=[float("inf")] * 2, vs_runner_up=None, times_cheaper=0.99)
    lines = recommendation_section({"recommendation": {"level": 0.95, "resamples": 1000, "choices": [none, c]}})
    assert "| appeals | MFLOPs | oracle calls |" in lines[2]
    # 1 / 0.00123 = 813 times fewer calls to the oracle than sending it every input
    assert lines[4] == ("| 0.500 % | guaranteed | **msp** | none certified (all to the last stage) | 100 % | 0.350 | "
                        "none saved (all appeal) | — (it is msp) | — (no other met the target) | 2 of 3 |")
    assert lines[5] == ("| 5.00 % | val | msp | 0.313 | 0.123 % | 0.00280 | 813x fewer | — (it is msp) | "
                        "deferral_head n/a (it makes 0 appeals), tied | 1 of 3 |")
    assert "∞x" not in "\n".join(lines)


def _point(method: str, source: str, target: float, cost: float, ad: float, std: float | None = None) -> dict:
    return {"mode": "white_box", "method": method, "selection": "target_ad", "threshold_source": source,
            "target_ad": target, "cost_mflops": cost, "cost_mflops_std": std, "ad": ad, "delta": 0.1
            if source == "guaranteed" else None}


def test_the_deployable_table_shows_each_value_with_its_interval():
    metrics = {"methods": {"msp": {"kind": "post_hoc"}, "appealnet": {"kind": "trained"}}}
    points = [_point("appealnet", "val", 0.0, 0.05, 0.00185), _point("appealnet", "guaranteed", 0.0, 0.35, 0.0),
              _point("msp", "val", 0.0, 0.0461, 0.0), _point("msp", "guaranteed", 0.0, 0.35, 0.0),
              _point("msp", "test", 0.0, 0.0264, 0.0, 0.0271), _point("oracle", "test", 0.0, 0.00558, 0.0, 0.0028)]
    intervals = {("white_box", "appealnet", "val", 0.0): {"low": 0.0446, "high": 0.0556},
                 ("white_box", "msp", "val", 0.0): {"low": 0.041, "high": 0.0515},
                 ("white_box", "msp", "guaranteed", 0.0): {"low": 0.35, "high": 0.35}}
    chosen = {("white_box", "msp", "guaranteed", 0.0)}
    lines = deployable_table(metrics, "white_box", points, intervals, chosen)
    assert lines[2:8] == [
        "| method | kind | thresholds | AD ≤ 0 % |", "|---|---|---|---:|",
        "| appealnet | trained | guaranteed | 0.350 |",  # no interval in metrics.json: the value alone
        "| msp | post-hoc | guaranteed | **0.350 [0.350, 0.350]** |",
        "| appealnet | trained | val | 0.0500 [0.0446, 0.0556] ✗ AD 0.185 % |",
        "| msp | post-hoc | val | 0.0461 [0.0410, 0.0515] |"]
    assert "delta = 0.100" in " ".join(lines[8:])
    paper = paper_table(metrics, "white_box", points)
    assert "tuned on test" in paper[0] and paper[4:6] == ["| msp | post-hoc | 0.0264 ± 0.0271 |",
                                                        "| oracle | limit | 0.00558 ± 0.00280 |"]
    assert "papers' numbers only" in " ".join(paper)


# ------------------------------------------------------------------ a real run


def test_a_run_shows_each_deployable_point_with_its_interval(quick_digits_run):
    import json

    from cascade.report import render_markdown, sig

    m = json.loads((quick_digits_run / "metrics.json").read_text())
    md = (quick_digits_run / "table.md").read_text()
    assert md == render_markdown(m) + "\n" and (quick_digits_run / "table_full.md").is_file()
    intervals = interval_index(m)
    points = {(p["mode"], p["method"], p["threshold_source"], p["target_ad"]): p for p in m["operating_points"]
              if p["selection"] == "target_ad"}
    assert set(intervals) == {k for k in points if k[2] in ("val", "guaranteed")}
    for key, ci in intervals.items():  # the interval's value is the point's
        assert ci["value"] == pytest.approx(points[key][ci["field"]], abs=1e-12)
    # the white-box table: a cell per (method, source, target), "value [low, high]" as metrics.json says
    table = md.split("## White-box: mean MFLOPs (MACs) per input")[1].split("\n\n")[1].splitlines()
    targets = sorted({k[3] for k in intervals if k[0] == "white_box"})
    seen = 0
    for line in table[2:]:
        method, _, source, *cells = [c.strip() for c in line.strip("|").split("|")]
        for t, cell in zip(targets, cells):
            ci = intervals["white_box", method, source, t]
            shown = f"{sig(ci['value'])} [{sig(ci['low'])}, {sig(ci['high'])}]"
            assert cell.strip("*").startswith(shown) or cell.startswith(f"**{shown}**"), (cell, shown)
            assert ("✗" in cell) == (points["white_box", method, source, t]["ad"] > t + 1e-9)
            seen += 1
    assert seen == sum(k[0] == "white_box" for k in intervals)
    # the paper comparison: the test-tuned rows only, the oracle router among them
    paper = md.split("## White-box, paper comparison")[1].split("\n\n")[1]
    assert "| oracle | limit |" in paper and paper.count("\n| ") == len(m["methods"]) + 1  # and the oracle router
