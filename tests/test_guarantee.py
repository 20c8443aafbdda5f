"""Guaranteed thresholds (Learn then Test) and the violation simulation: known answers worked
by hand, the guarantee against a population whose risk is known in closed form, the
re-split simulation against the selection functions it vectorizes, and a --quick run's
report."""

import json
import re

import numpy as np
import pandas as pd
import pytest
from scipy.stats import binom

from cascade.evaluation import (
    Variant,
    binomial_p_value,
    cascade_point,
    cascade_sweep,
    degradation_scores,
    exit_stages,
    operating_points,
    select_by_accuracy,
    select_guaranteed,
    threshold_violations,
)
from cascade.evaluation.violations import _Pool, _resplit_ads, _resplit_masks

DELTA = 0.1


def _monte_carlo_slack(delta: float, draws: int) -> float:
    """Three standard errors of a rate estimated from ``draws`` Bernoulli(delta) draws."""
    return 3 * np.sqrt(delta * (1 - delta) / draws)


# ============================================================================ known answers


def test_binomial_p_value_known_answers():
    # P(Binom(10, .1) <= 0) = .9^10; <= 1 adds 10 * .1 * .9^9
    assert binomial_p_value(0, 10, 0.1) == pytest.approx(0.9**10) == pytest.approx(0.3486784401)
    assert binomial_p_value(1, 10, 0.1) == pytest.approx(0.9**10 + 10 * 0.1 * 0.9**9)
    # a zero target: no count certifies it
    assert binomial_p_value(0, 1000, 0.0) == 1.0
    assert binomial_p_value(np.array([0, 30]), 30, 0.1) == pytest.approx([0.9**30, 1.0])


def test_degradation_scores_known_answers():
    # two stages, white-box: only "little wrong, big right" counts, from its own score down
    scores = np.array([[0.9], [0.8], [0.3]])
    correct = np.array([[0, 1], [1, 1], [0, 0]], bool)
    assert degradation_scores(scores, correct).tolist() == [0.9, -np.inf, -np.inf]
    # three stages: the last bad stage k, at the running max of the scores up to k
    scores = np.array([[0.2, 0.7], [0.6, 0.3], [0.5, 0.9], [0.4, 0.8]])
    correct = np.array([[0, 1, 1],    # stage 0 bad: counts from t <= .2 (exits at stage 0 there)
                        [1, 0, 1],    # stage 1 bad: exits at or before it from t <= max(.6, .3) = .6,
                                      # although stage 0, where it exits at .6, is right: the bound
                        [0, 0, 1],    # both bad: the later one, from max(.5, .9) = .9
                        [1, 1, 0]],   # the last stage wrong: nothing to degrade
                       bool)
    assert degradation_scores(scores, correct).tolist() == [0.2, 0.6, 0.9, -np.inf]


def test_degradation_loss_is_monotone_and_bounds_ad():
    """By definition (exit stages, any bad stage at or after the exit) on random 2- to
    4-stage tables: the loss is 1 exactly at ``t <= s``, it only grows as t falls, and
    its mean bounds the AD from above at every threshold."""
    rng = np.random.default_rng(0)
    for k in (2, 3, 4):
        n = 300
        scores = rng.random((n, k - 1)).round(2)  # ties
        correct = rng.random((n, k)) < 0.8
        s = degradation_scores(scores, correct)
        bad = ~correct[:, :-1] & correct[:, -1:]
        previous = np.zeros(n, bool)
        for t in np.append(np.unique(scores), 1.5)[::-1]:  # falling
            tau = exit_stages(scores, t)
            loss = np.array([bad[i, tau[i]:].any() for i in range(n)])
            assert (loss == (s >= t)).all(), (k, t)
            assert (loss >= previous).all()  # monotone per input
            previous = loss
            ad = correct[:, -1].mean() - correct[np.arange(n), tau].mean()
            assert loss.mean() >= ad - 1e-12


def _wrong_at(n: int, wrong: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """A black-box 2-stage table: scores ``i / n`` for i = 1..n, the first stage wrong at ``wrong``."""
    scores = (np.arange(1, n + 1) / n)[:, None]
    correct = np.ones((n, 2), bool)
    correct[np.array(wrong, dtype=int) - 1, 0] = False
    return scores, correct


def test_fixed_sequence_picks_the_threshold_worked_by_hand():
    # 30 inputs scored 1/30 .. 30/30, the first stage wrong at 5/30 and 20/30; target .1, delta .1.
    # p(0 losses) = .9^30 = .042 <= .1: certified; p(1 loss) = .042 + 30 * .1 * .9^29 = .184 > .1: not.
    # From the top, thresholds 30/30 .. 21/30 hold no loss; 20/30 holds one: testing stops there.
    assert binom.cdf(0, 30, 0.1) <= DELTA < binom.cdf(1, 30, 0.1)
    scores, correct = _wrong_at(30, [5, 20])
    sw = cascade_sweep(scores, correct, (1.0, 10.0))
    sel = select_guaranteed([sw], [degradation_scores(scores, correct)], 0.1, DELTA)
    assert sel.variant == 0 and sel.feasible and sel.threshold == pytest.approx(21 / 30)
    p = cascade_point(sel.threshold, scores, correct, (1.0, 10.0))
    assert p.exit_fractions == pytest.approx([10 / 30, 20 / 30]) and p.system_accuracy == 1.0
    # the val rule would keep everything on the first stage: 2 wrong of 30 = 6.7 % <= 10 %
    assert select_by_accuracy([sw], 30 * (1 - 0.1)).threshold == pytest.approx(1 / 30)


def test_nothing_certified_falls_back_to_the_last_stage():
    scores, correct = _wrong_at(30, [5, 20])
    sw = cascade_sweep(scores, correct, (1.0, 10.0))
    s = degradation_scores(scores, correct)
    # target 0: no count proves a zero risk
    sel = select_guaranteed([sw], [s], 0.0, DELTA)
    assert sel.threshold == np.inf and sel.feasible
    p = cascade_point(sel.threshold, scores, correct, (1.0, 10.0))
    assert p.exit_fractions == [0.0, 1.0] and p.cost_mflops == 11.0
    # ten inputs, even all right: p(0 losses) = .9^10 = .349 > .1
    few, right = _wrong_at(10, [])
    assert select_guaranteed([cascade_sweep(few, right, (1.0, 10.0))], [degradation_scores(few, right)], 0.1,
                             DELTA).threshold == np.inf
    with pytest.raises(ValueError, match="delta"):
        select_guaranteed([sw], [s], 0.1, 0.0)


def test_several_variants_split_delta_and_the_cheapest_certified_wins():
    # 25 inputs: p(0 losses) = .9^25 = .072: certified at delta .1, not at delta / 2 = .05
    assert binom.cdf(0, 25, 0.1) <= DELTA and binom.cdf(0, 25, 0.1) > DELTA / 2
    scores, correct = _wrong_at(25, [20])
    sw, s = cascade_sweep(scores, correct, (1.0, 10.0)), degradation_scores(scores, correct)
    assert select_guaranteed([sw], [s], 0.1, DELTA).threshold == pytest.approx(21 / 25)
    assert select_guaranteed([sw, sw], [s, s], 0.1, DELTA).threshold == np.inf  # Bonferroni: nothing left
    # 30 inputs: .042 <= .05, certified in each of two variants; A (wrong at 20/30) certifies down
    # to 21/30 (10 inputs stop early), B (wrong at 25/30) only to 26/30 (5): A is the cheaper
    a, b = _wrong_at(30, [20]), _wrong_at(30, [25])
    sweeps = [cascade_sweep(*v, (1.0, 10.0)) for v in (a, b)]
    degr = [degradation_scores(*v) for v in (a, b)]
    sel = select_guaranteed(sweeps, degr, 0.1, DELTA)
    assert (sel.variant, sel.threshold) == (0, pytest.approx(21 / 30))
    sel = select_guaranteed(sweeps[::-1], degr[::-1], 0.1, DELTA)
    assert (sel.variant, sel.threshold) == (1, pytest.approx(21 / 30))


def test_three_stage_bound_is_conservative():
    """Three stages: stage 0 always right, stage 1 wrong on the inputs with stage-0 scores
    30/60 .. 34/60, the last stage always right. The system never degrades (an input stops
    at stage 0, right, or goes past stage 1 to the last), but those five count as losses
    from their stage-0 score down: they would exit at or before the wrong stage 1."""
    n = 60
    scores = np.stack([np.arange(1, n + 1) / n, np.zeros(n)], axis=1)  # stage 1 never stops anything
    correct = np.ones((n, 3), bool)
    correct[29:34, 1] = False
    costs = (1.0, 2.0, 10.0)
    s = degradation_scores(scores, correct)
    assert s[29:34] == pytest.approx(np.arange(30, 35) / n) and (s[:29] == -np.inf).all() and (s[34:] == -np.inf).all()
    # n = 60, target .05: p(0 losses) = .95^60 = .046 <= .1 < p(1 loss) = .046 + 60 * .05 * .95^59 = .19:
    # certified while no loss is above the threshold, down to 35/60; 34/60 holds one
    assert binom.cdf(0, n, 0.05) <= DELTA < binom.cdf(1, n, 0.05)
    sw = cascade_sweep(scores, correct, costs)
    sel = select_guaranteed([sw], [s], 0.05, DELTA)
    assert sel.threshold == pytest.approx(35 / n)
    p = cascade_point(sel.threshold, scores, correct, costs)
    assert p.exit_fractions == pytest.approx([26 / n, 0, 34 / n]) and p.system_accuracy == 1.0
    # the AD is 0 at every threshold, so the val rule stops everything at stage 0
    assert select_by_accuracy([sw], n * (1 - 0.05)).threshold == pytest.approx(1 / n)


# ============================================================================ the guarantee itself


def test_guarantee_holds_against_a_known_population_risk():
    """Black-box, two stages: scores u ~ U(0, 1), the first stage wrong with probability
    c (1 - u). The risk at threshold t is the chance of stopping there wrong,
    ``c (1 - t)^2 / 2``. Over fresh calibration draws, a guaranteed threshold's risk
    exceeds the target at most a delta of the time; a val-tuned one about half the time."""
    c, n, draws = 0.4, 1000, 400
    rng = np.random.default_rng(1)
    over = {"val": 0, "guaranteed": 0}
    for target in (0.02, 0.05):
        for _ in range(draws):
            u = rng.random(n)
            scores, correct = u[:, None], np.stack([rng.random(n) >= c * (1 - u), np.ones(n, bool)], axis=1)
            sw = cascade_sweep(scores, correct, (1.0, 10.0))
            picks = {"val": select_by_accuracy([sw], n * (1 - target)).threshold,
                     "guaranteed": select_guaranteed([sw], [degradation_scores(scores, correct)], target,
                                                     DELTA).threshold}
            for source, t in picks.items():
                risk = c * (1 - min(t, 1.0)) ** 2 / 2
                over[source] += risk > target
    rates = {s: v / (2 * draws) for s, v in over.items()}
    print(f"risk over target: {rates}")
    assert rates["guaranteed"] <= DELTA + _monte_carlo_slack(DELTA, 2 * draws)
    assert rates["val"] > 0.3


def _synthetic(rng, n_cal: int, n_test: int, stages: int, seeds=(0,), variants: int = 1) -> tuple[pd.DataFrame,
                                                                                                   list[Variant]]:
    """A per-sample table whose scores track correctness: each routed stage is right with
    probability .55 + .45 score; the big network right 99 % of the time."""
    frames = []
    for seed in seeds:
        for split, n in (("cal", n_cal), ("test", n_test)):
            cols = {"seed": seed, "split": split, "index": np.arange(n), "big_correct": rng.random(n) < 0.99}
            for v in range(variants):
                for k in range(stages - 1):
                    score = rng.random(n)
                    cols[f"v{v}_s{k}"] = score
                    cols[f"v{v}_c{k}"] = rng.random(n) < 0.55 + 0.45 * score
            frames.append(pd.DataFrame(cols))
    out = []
    for mode in ("white_box", "black_box"):
        for v in range(variants):
            out.append(Variant("m", mode, f"v{v}", tuple(f"v{v}_s{k}" for k in range(stages - 1)),
                               (*(f"v{v}_c{k}" for k in range(stages - 1)), "big_correct" if mode == "white_box"
                                else None), tuple(1.0 + k + 0.01 * v for k in range(stages - 1)) + (20.0,)))
    return pd.concat(frames, ignore_index=True), out


@pytest.mark.parametrize("stages,variants", [(2, 1), (3, 1), (2, 3)])
def test_simulation_guaranteed_rarely_misses_val_often_does(stages, variants):
    """2 stages, the 3-stage conservative bound, and three variants (Bonferroni): over 200
    re-splits, the guaranteed thresholds' AD on the pool exceeds the target at most a delta
    of the time; the val-tuned ones miss far more often, on the test part and on the pool."""
    rng = np.random.default_rng(stages * 10 + variants)
    samples, vs = _synthetic(rng, 2000, 4000, stages, variants=variants)
    targets = {"white_box": [0.01, 0.02], "black_box": [0.02, 0.05]}
    rows = threshold_violations(samples, vs, targets, DELTA, resplits=200, seed=0)
    assert len(rows) == 2 * 2 * 2  # modes x targets x sources
    by = {(r["mode"], r["target_ad"], r["threshold_source"]): r for r in rows}
    for mode, ts in targets.items():
        for t in ts:
            val, guar = by[(mode, t, "val")], by[(mode, t, "guaranteed")]
            assert val["resplits"] == guar["resplits"] == 200 and val["seeds"] == 1 and guar["delta"] == DELTA
            print(f"{stages} stages x {variants} variant(s), {mode} AD {t}: violation rate val "  # pytest -s shows it
                  f"{val['violation_rate']:.3f} (pool {val['pool_violation_rate']:.3f}), guaranteed "
                  f"{guar['violation_rate']:.3f} (pool {guar['pool_violation_rate']:.3f})")
            assert guar["pool_violation_rate"] <= DELTA + _monte_carlo_slack(DELTA, 200)
            assert val["violation_rate"] > guar["violation_rate"]
            assert val["pool_violation_rate"] > guar["pool_violation_rate"]
            assert guar["mean_ad"] < val["mean_ad"]


@pytest.mark.parametrize("stages,variants,ties", [(2, 1, False), (2, 2, True), (3, 1, True), (4, 2, False)])
def test_simulation_picks_what_the_selection_functions_pick(stages, variants, ties):
    """The vectorized re-splits give, split by split, the AD of the thresholds that
    cascade_sweep + select_by_accuracy / select_guaranteed choose on the calibration part,
    applied with cascade_point to the test part."""
    rng = np.random.default_rng(stages + 7 * variants)
    n, n_cal = 400, 150
    costs = [tuple(1.0 + k + 0.5 * v for k in range(stages - 1)) + (10.0,) for v in range(variants)]
    last = rng.random(n) < 0.9
    data = []
    for _ in range(variants):
        scores = rng.random((n, stages - 1))
        scores = scores.round(1) if ties else scores
        correct = np.concatenate([rng.random((n, stages - 1)) < 0.5 + 0.5 * scores, last[:, None]], axis=1)
        data.append((scores, correct))
    cal = _resplit_masks(rng, n, n_cal, 12)  # [N, R]
    targets = [0.0, 0.02, 0.1]
    ads = _resplit_ads([_Pool(s, c, co) for (s, c), co in zip(data, costs)], cal, targets, DELTA)
    for r in range(cal.shape[1]):
        m = cal[:, r]
        sweeps = [cascade_sweep(s[m], c[m], co) for (s, c), co in zip(data, costs)]
        degr = [degradation_scores(s[m], c[m]) for s, c in data]
        ref = last[m].mean()
        for t in targets:
            for source, sel in (("val", select_by_accuracy(sweeps, n_cal * (ref - t))),
                                ("guaranteed", select_guaranteed(sweeps, degr, t, DELTA))):
                s, c = data[sel.variant]
                test = cascade_point(sel.threshold, s[~m], c[~m], costs[sel.variant])
                pool = cascade_point(sel.threshold, s, c, costs[sel.variant])
                assert ads[(source, t)][0][r] == pytest.approx(last[~m].mean() - test.system_accuracy, abs=1e-12)
                assert ads[(source, t)][1][r] == pytest.approx(last.mean() - pool.system_accuracy, abs=1e-12)


def test_operating_points_add_guaranteed_rows():
    rng = np.random.default_rng(3)
    samples, vs = _synthetic(rng, 500, 500, 2, seeds=(0, 1), variants=2)
    targets = {"white_box": [0.0, 0.05], "black_box": [0.05]}
    rows = operating_points(samples, vs, targets, budgets=[0.5], delta=0.2)
    guaranteed = [r for r in rows if r["threshold_source"] == "guaranteed"]
    assert len(guaranteed) == 2 * 3  # seeds x (mode, target)
    assert all(r["selection"] == "target_ad" and r["delta"] == 0.2 and r["feasible"] for r in guaranteed)
    assert all(r["delta"] is None for r in rows if r["threshold_source"] != "guaranteed")
    assert {r["threshold_source"] for r in rows if r["selection"] == "budget"} == {"test", "val"}
    zero = [r for r in guaranteed if r["target_ad"] == 0.0]  # the fallback: everything to the last stage
    assert all(r["threshold"] == np.inf and r["ad"] == 0 and r["appeal_rate"] == 1 for r in zero)


def test_simulation_argument_errors():
    samples, vs = _synthetic(np.random.default_rng(0), 50, 50, 2)
    with pytest.raises(ValueError, match="resplits"):
        threshold_violations(samples, vs, {"white_box": [0.1], "black_box": [0.1]}, DELTA, resplits=0)
    with pytest.raises(ValueError, match="cal and a test"):
        threshold_violations(samples[samples["split"] == "cal"], vs, {"white_box": [0.1], "black_box": [0.1]}, DELTA)


# ============================================================================ a --quick run


def _brute_force_guaranteed(scores: np.ndarray, correct: np.ndarray, target: float, delta: float) -> float:
    """Two stages, plain numpy: every distinct calibration score (and one above them all) as
    a threshold, highest first; the loss rate by definition (stops at the first stage,
    which is wrong, while the last is right); stop at the first p-value over delta."""
    candidates = np.append(np.unique(scores), np.nextafter(scores.max(), np.inf))[::-1]
    chosen = np.inf
    for t in candidates:
        losses = int(((scores[:, 0] >= t) & ~correct[:, 0] & correct[:, 1]).sum())
        if binom.cdf(losses, len(scores), target) > delta:
            break
        chosen = t
    return chosen


def test_quick_run_reports_the_three_sources(quick_digits_run):
    out = quick_digits_run
    # table.md: the deployable sources with their intervals, the test-tuned ones apart
    compact = (out / "table.md").read_text()
    for line in ("| appealnet | trained | val |", "| msp | post-hoc | guaranteed |",
                 "## White-box: mean MFLOPs (MACs) per input at each AD target, 95 % CI, deployable thresholds",
                 "## White-box, paper comparison: thresholds tuned on test (optimistic)", "| appealnet | trained | 0"):
        assert line in compact, line
    assert "| appealnet | trained | test |" not in compact and "how often" not in compact
    md = (out / "table_full.md").read_text()
    for line in ("| appealnet | trained | test |", "| appealnet | trained | val |",
                 "| appealnet | trained | guaranteed |", "| msp | post-hoc | guaranteed |",
                 ("## white-box: how often a threshold chosen on the calibration split misses its target "
                  "(delta = 0.100)"),
                 "## black-box: how often", "| AD 0.500 %: val | AD 0.500 %: guaranteed |"):
        assert line in md, line
    assert (out / "figures" / "threshold_violations.png").stat().st_size > 0
    m = json.loads((out / "metrics.json").read_text())
    rows = m["threshold_violations"]
    keys = sorted((r["mode"], r["method"], r["target_ad"], r["threshold_source"]) for r in rows)
    targets = {"white_box": [0.0, 0.001, 0.005, 0.01], "black_box": [0.005, 0.01, 0.02, 0.05]}
    assert keys == sorted((mode, me, t, s) for mode, ts in targets.items() for me in m["methods"] for t in ts
                          for s in ("val", "guaranteed"))
    assert all(r["resplits"] == 200 and r["delta"] == 0.1 and r["seeds"] == 1 for r in rows)
    # the rows are the simulation re-run on samples.csv (whose by-hand known answers are in
    # test_wrong_answers.py), value for value
    samples = pd.read_csv(out / "samples.csv")
    variants = [Variant(**{k: tuple(x) if isinstance(x, list) else x for k, x in v.items()}) for v in m["variants"]]
    again = {(r["mode"], r["method"], r["target_ad"], r["threshold_source"]): r
             for r in threshold_violations(samples, variants, targets, 0.1, resplits=200)}
    for r in rows:
        want = again[(r["mode"], r["method"], r["target_ad"], r["threshold_source"])]
        for key in ("violation_rate", "pool_violation_rate", "mean_ad"):
            assert r[key] == pytest.approx(want[key], abs=1e-12), (key, r)
    # a zero target: guaranteed never moves off the big network, so it never misses
    assert all(r["violation_rate"] == 0 for r in rows if r["target_ad"] == 0 and r["threshold_source"] == "guaranteed")

    # every guaranteed threshold of points.csv, recomputed from samples.csv with plain numpy
    points = pd.read_csv(out / "points.csv", keep_default_na=False, na_values=[""])
    samples = pd.read_csv(out / "samples.csv")
    guaranteed = points[points["threshold_source"] == "guaranteed"]
    assert len(guaranteed) == sum(len(ts) for ts in targets.values()) * len(m["methods"])
    assert (guaranteed["delta"] == 0.1).all()
    assert points.loc[points["threshold_source"] != "guaranteed", "delta"].isna().all()
    variants = {(v["mode"], v["method"]): v for v in m["variants"]}
    for p in guaranteed.to_dict("records"):
        v = variants[(p["mode"], p["method"])]
        cal = samples[(samples["seed"] == p["seed"]) & (samples["split"] == "cal")]
        scores = cal[v["score_columns"][0]].to_numpy(np.float64)[:, None]
        last = v["correct_columns"][-1]
        correct = np.stack([cal[v["correct_columns"][0]].to_numpy(bool),
                            np.ones(len(cal), bool) if last is None else cal[last].to_numpy(bool)], axis=1)
        assert p["threshold"] == _brute_force_guaranteed(scores, correct, p["target_ad"], 0.1), p


def test_config_keys_and_their_ranges(repo):
    from cascade import ConfigError, load_config

    cfg = load_config(repo / "configs" / "digits.yaml")
    assert cfg.evaluation.delta == 0.1 and cfg.evaluation.violation_resplits == 200
    cfg = load_config(repo / "configs" / "digits.yaml",
                      ["evaluation.delta=0.05", "evaluation.violation_resplits=0"])
    assert cfg.evaluation.delta == 0.05 and cfg.evaluation.violation_resplits == 0
    for bad in ("evaluation.delta=0", "evaluation.delta=1", "evaluation.violation_resplits=-1"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_config(repo / "configs" / "digits.yaml", [bad])


def test_report_without_the_simulation(quick_digits_run):
    """``evaluation.violation_resplits: 0`` leaves threshold_violations out of metrics.json:
    the report then has the three sources and no violation table."""
    from cascade.report import render_full

    m = json.loads((quick_digits_run / "metrics.json").read_text())
    # table_full.md's violation table shows metrics.json's rates: "val % (pool %)" per method and target
    md = (quick_digits_run / "table_full.md").read_text()
    rows = {(r["method"], r["target_ad"], r["threshold_source"]): r for r in m["threshold_violations"]
            if r["mode"] == "white_box"}
    table = md.split("## white-box: how often")[1].split("\n\n")[1].splitlines()
    columns = [(t, s) for t in sorted({t for _, t, _ in rows}) for s in ("val", "guaranteed")]  # as rendered
    assert [c.strip().split(": ")[1] for c in table[0].strip("|").split("|")[1:]] == [s for _, s in columns]
    cells = {}
    for line in table[2:]:
        method, *values = [c.strip() for c in line.strip("|").split("|")]
        cells.update({(method, *col): c for col, c in zip(columns, values)})
    assert len(cells) == len(rows)
    for (method, t, source), r in rows.items():
        shown = re.fullmatch(r"([0-9.]+) % \(([0-9.]+) %\)", cells[(method, t, source)])
        assert float(shown[1]) == pytest.approx(100 * r["violation_rate"], rel=5e-3, abs=1e-9)
        assert float(shown[2]) == pytest.approx(100 * r["pool_violation_rate"], rel=5e-3, abs=1e-9)
    del m["threshold_violations"]
    md = render_full(m)
    assert "| msp | post-hoc | guaranteed |" in md and "how often" not in md
