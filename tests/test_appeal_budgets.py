"""Appeal budgets (``selection: appeal_budget``): the rule on tables worked by hand, the
oracle router's point, the gain / share summary and its table, a --quick digits run whose
points are recomputed from samples.csv with plain numpy, a 3-stage run (the budget bounds
the inputs reaching the last stage), and the config's one-line errors."""

import json

import numpy as np
import pandas as pd
import pytest

from cascade.core.enums import Selection
from cascade.evaluation import Variant, cascade_sweep, operating_points, oracle_budget_scores, oracle_scores
from cascade.evaluation.budgets import (
    DEFINITION,
    INTERVAL,
    RULE,
    VERSUS,
    _choice,
    appeal_budget_summary,
    learned_vs_confidence,
)
from cascade.evaluation.recommend import BOOTSTRAP_SEED, LEVEL, RESAMPLES
from cascade.evaluation.selection import select_by_appeal_rate
from cascade.report.budgets import budget_tables, gain_cell, versus_text
from cascade.runs.point_check import recompute_point
from tests.conftest import REPO

# ten inputs, two stages, sorted by stage-0 score (higher = keep the little network's answer)
SCORES = np.array([0.95, 0.90, 0.80, 0.70, 0.60, 0.50, 0.40, 0.30, 0.20, 0.10])
LITTLE = np.array([1, 1, 1, 0, 1, 0, 0, 1, 0, 1], bool)  # 6 / 10 right
BIG = np.array([1, 0, 1, 1, 1, 1, 0, 1, 1, 1], bool)  # 8 / 10 right
# appealing the k lowest scores (inputs 9, 8, 7, ...) changes the correct count by BIG - LITTLE:
# 0, +1, 0, 0, +1, 0, +1, 0, -1, 0, so the accuracy after k appeals is
# k:   0    1    2    3    4    5    6    7    8    9    10
#     .6   .6   .7   .7   .7   .8   .8   .9   .9   .8   .8


def _sweep(little=LITTLE, big=BIG, scores=SCORES):
    return cascade_sweep(scores[:, None], np.stack([little, big], axis=1), [1.0, 10.0])


@pytest.mark.parametrize("budget, threshold, accuracy, appeals", [
    (0.1, 0.10, 0.6, 0),  # k <= 1: k = 0 and 1 tie at 0.6, fewer appeals wins: nothing appealed
    (0.2, 0.30, 0.7, 2),  # k <= 2: k = 2 (inputs 8, 9), the only 0.7
    (0.25, 0.30, 0.7, 2),  # 2.5 appeals allowed: still k = 2
    (0.3, 0.30, 0.7, 2),  # k <= 3: k = 2 and 3 tie at 0.7, fewer appeals wins (0.3 * 10 rounds above 3)
    (1.0, 0.80, 0.9, 7),  # any k: k = 7 and 8 tie at 0.9: k = 7, inputs 0-2 kept (scores >= 0.8)
])
def test_select_by_appeal_rate_white_box_by_hand(budget, threshold, accuracy, appeals):
    sw = _sweep()
    pick = select_by_appeal_rate([sw], budget)
    assert pick.variant == 0 and pick.feasible and pick.threshold == threshold
    i = int(np.flatnonzero(sw.threshold == pick.threshold)[0])
    assert sw.system_accuracy[i] == pytest.approx(accuracy) and sw.exit_counts[i, -1] == appeals


@pytest.mark.parametrize("budget, threshold, accuracy", [
    # appealing inputs 9, 8, 7, 6, 5 ... adds 1 - LITTLE: 0, +1, 0, +1, +1 ...
    (0.1, 0.10, 0.6),  # input 9 is right already: appealing it gains nothing, so none is appealed
    (0.2, 0.30, 0.7),  # inputs 8, 9: +1
    (0.3, 0.30, 0.7),  # k = 3 (adds input 7, right already) ties k = 2: fewer appeals
    (0.4, 0.50, 0.8),  # inputs 6-9: +2
])
def test_select_by_appeal_rate_black_box_by_hand(budget, threshold, accuracy):
    """Black-box: the oracle is always right, so appealing never loses; the rule appeals the
    least confident inputs up to the budget, stopping after the last wrong one it can reach."""
    oracle = np.ones(10, bool)
    sw = _sweep(big=oracle)
    pick = select_by_appeal_rate([sw], budget)
    p = (SCORES < pick.threshold)  # appealed
    assert pick.threshold == threshold
    assert np.where(p, True, LITTLE).mean() == pytest.approx(accuracy)
    assert p.mean() <= budget + 1e-12


# -- operating points, the oracle router and the summary on a cal and a test split worked by hand

# the test split: scores 0.01 above the calibration split's, input 8 now right on the little
# network (7 / 10 right) and input 6 right on the big one (9 / 10): the little network is
# wrong and the big right on inputs 3, 5 and 6 only
TEST_SCORES = np.array([0.96, 0.91, 0.81, 0.71, 0.61, 0.51, 0.41, 0.31, 0.21, 0.11])
TEST_LITTLE = np.array([1, 1, 1, 0, 1, 0, 0, 1, 1, 1], bool)
TEST_BIG = np.array([1, 0, 1, 1, 1, 1, 1, 1, 1, 1], bool)
MSP = Variant("msp", "white_box", "", ("stage0_score_msp",), ("stage0_correct", "big_correct"), (1.0, 10.0))
ORACLE_WB = Variant("oracle", "white_box", "", (), ("stage0_correct", "big_correct"), (1.0, 10.0))


def _samples() -> pd.DataFrame:
    def part(split, scores, little, big):
        return pd.DataFrame({"seed": 0, "split": split, "stage0_score_msp": scores, "stage0_correct": little,
                             "big_correct": big})

    return pd.concat([part("cal", SCORES, LITTLE, BIG), part("test", TEST_SCORES, TEST_LITTLE, TEST_BIG)],
                     ignore_index=True)


def _appeal_rows(budgets=(0.2, 0.5)):
    rows = operating_points(_samples(), [MSP], {"white_box": []}, oracles=[ORACLE_WB], appeal_budgets=budgets)
    return {(r["method"], r["threshold_source"], r["appeal_budget"]): r for r in rows
            if r["selection"] == Selection.APPEAL_BUDGET}


@pytest.mark.parametrize("key, threshold, accuracy, appeal, gain", [
    # val, 0.2: the calibration split's pick (t = 0.30) appeals test inputs 8 and 9, both right
    # on the little network already: accuracy stays 0.7, gain 0
    (("msp", "val", 0.2), 0.30, 0.7, 0.2, 0.0),
    # test, 0.2: on test, appealing 9, 8 or 7 gains nothing, so nothing is appealed (t = lowest score)
    (("msp", "test", 0.2), 0.11, 0.7, 0.0, 0.0),
    # val, 0.5: t = 0.60 on cal (5 appeals, 0.8 there) appeals test inputs 5-9: +2 (inputs 5, 6)
    (("msp", "val", 0.5), 0.60, 0.9, 0.5, 0.2),
    (("msp", "test", 0.5), 0.61, 0.9, 0.5, 0.2),  # k = 5 is the first to reach 0.9 on test
])
def test_appeal_budget_points_by_hand(key, threshold, accuracy, appeal, gain):
    p = _appeal_rows()[key]
    assert p["threshold"] == pytest.approx(threshold) and p["feasible"]
    assert p["system_accuracy"] == pytest.approx(accuracy) and p["appeal_rate"] == pytest.approx(appeal)
    assert p["gain"] == pytest.approx(gain) and p["target_ad"] is None and p["budget_fraction"] is None


@pytest.mark.parametrize("budget, accuracy, appeal", [
    (0.05, 0.7, 0.0),  # half an input: none appealed
    (0.2, 0.9, 0.2),  # two of the three inputs where the little network is wrong and the big right
    (0.5, 1.0, 0.3),  # all three, and no more (more appeals would not add a right answer)
    (1.0, 1.0, 0.3),
])
def test_oracle_router_budget_point_by_hand(budget, accuracy, appeal):
    p = _appeal_rows((budget,))[("oracle", "test", budget)]
    assert p["system_accuracy"] == pytest.approx(accuracy) and p["appeal_rate"] == pytest.approx(appeal)
    assert p["gain"] == pytest.approx(accuracy - 0.7)


def test_oracle_budget_scores_three_stages_by_hand():
    """Three stages: each input exits at its first right routed stage; only inputs that the
    last stage alone answers right are candidates for an appeal (random scores below 0.5)."""
    correct = np.array([[1, 0, 1],  # stage 0 right: stop there
                        [0, 1, 1],  # stage 1 corrects it: pass stage 0 on (-1), stop at 1
                        [0, 0, 1],  # only the big network: an appeal candidate
                        [0, 0, 0],  # nobody: stop at stage 0
                        [0, 1, 0]], bool)  # stage 1 right, big wrong: stop at stage 1
    s = oracle_budget_scores(correct, seed=0)
    order = np.random.default_rng(0).random(5) * 0.5
    assert s.tolist() == [[1, 1], [-1, 1], [order[2], order[2]], [1, 1], [-1, 1]]
    two = correct[:, [0, 2]]  # two stages: the oracle router's own scores
    assert np.array_equal(oracle_budget_scores(two, 3), oracle_scores(two, 3))
    # at a budget of 1 input in 5 the oracle gets the candidate: all but input 3 right
    sw = cascade_sweep(s, correct, [1.0, 2.0, 10.0])
    pick = select_by_appeal_rate([sw], 0.2)
    i = int(np.flatnonzero(sw.threshold == pick.threshold)[0])
    assert sw.system_correct[i] == 4 and sw.exit_counts[i].tolist() == [2, 2, 1]
    pick = select_by_appeal_rate([sw], 0.1)  # no appeal: stage 1 still corrects input 1 and 4
    i = int(np.flatnonzero(sw.threshold == pick.threshold)[0])
    assert sw.system_correct[i] == 3 and sw.exit_counts[i].tolist() == [3, 2, 0]


def test_summary_gain_and_share_by_hand():
    rows = operating_points(_samples(), [MSP], {"white_box": []}, oracles=[ORACLE_WB], appeal_budgets=[0.2, 0.5])
    out = appeal_budget_summary(_samples(), [MSP], rows, [ORACLE_WB], {"msp": "post_hoc"})
    by = {(r["method"], r["threshold_source"], r["appeal_budget"]): r for r in out["rows"]}
    assert set(by) == {(m, s, b) for b in (0.2, 0.5) for m, s in (("msp", "val"), ("msp", "test"), ("oracle", "test"))}
    assert all(r["little_accuracy"] == pytest.approx(0.7) for r in out["rows"])
    # val 0.2: no input changes its answer, so every resample gains exactly 0: interval [0, 0], share 0 / 0.2
    r = by["msp", "val", 0.2]
    assert (r["gain"], r["gain_low"], r["gain_high"]) == (0.0, 0.0, 0.0)
    assert r["oracle_gain"] == pytest.approx(0.2) and r["share"] == 0.0 and r["share_low"] == r["share_high"] == 0.0
    assert r["appeal_rate"] == pytest.approx(0.2)  # test inputs 8 and 9 reach the big network
    # 0.5: gain 0.2 of the oracle's 0.3
    for source in ("val", "test"):
        r = by["msp", source, 0.5]
        assert r["gain"] == pytest.approx(0.2) and r["share"] == pytest.approx(2 / 3)
        assert r["gain_low"] <= r["gain"] <= r["gain_high"] and r["share_low"] <= r["share"] <= r["share_high"]
        assert r["appeal_rate"] == pytest.approx(0.5) and r["system_accuracy"] == pytest.approx(0.9)
    assert by["oracle", "test", 0.5]["share"] == 1.0
    # the recommendation at val thresholds: the one method
    assert [(c["appeal_budget"], c["method"], c["tied"]) for c in out["choices"]] == [(0.2, "msp", ["msp"]),
                                                                                     (0.5, "msp", ["msp"])]
    assert {c["threshold_source"] for c in out["choices"]} == {"val"}
    # the oracle router's row once per budget: msp val, msp test, oracle at each of 2 budgets
    assert len(out["rows"]) == 6
    assert {k: out[k] for k in ("definition", "interval", "rule", "versus", "resamples", "bootstrap_seed", "level")} \
        == {"definition": DEFINITION, "interval": INTERVAL, "rule": RULE, "versus": VERSUS, "resamples": RESAMPLES,
            "bootstrap_seed": BOOTSTRAP_SEED, "level": LEVEL}


def test_summary_of_two_methods_compares_them_and_not_the_oracle():
    """msp and a score that ranks the other way round ("rev"): each choice weighs the two
    methods only (never the oracle router), with the parameters of its own mode."""
    samples = _samples()
    samples["stage0_score_rev"] = 1 - samples["stage0_score_msp"]
    rev = Variant("rev", "white_box", "", ("stage0_score_rev",), ("stage0_correct", "big_correct"), (1.0, 10.0))
    rows = operating_points(samples, [MSP, rev], {"white_box": []}, oracles=[ORACLE_WB], appeal_budgets=[0.2, 0.5])
    kinds = {"msp": "post_hoc", "rev": "post_hoc"}
    out = appeal_budget_summary(samples, [MSP, rev], rows, [ORACLE_WB], kinds,
                                {("white_box", "rev"): 0, ("white_box", "msp"): 9, ("black_box", "msp"): 0},
                                confidence={"msp"})
    assert len(out["rows"]) == 10  # 2 methods x 2 sources + the oracle, at 2 budgets
    oracle = {r["appeal_budget"]: r["gain"] for r in out["rows"] if r["method"] == "oracle"}
    assert oracle == {0.2: pytest.approx(0.2), 0.5: pytest.approx(0.3)}
    for r in out["rows"]:  # every share is of the oracle router's gain, not of the other method's
        assert r["oracle_gain"] == oracle[r["appeal_budget"]]
        assert r["share"] == pytest.approx(r["gain"] / oracle[r["appeal_budget"]])
        if r["method"] == "oracle":  # its own share, in every resample
            assert r["share_low"] == r["share_high"] == 1.0
    for c in out["choices"]:
        assert set(c["gain_minus_best"]) == {"msp", "rev"} and c["threshold_source"] == "val"
        v = c["learned_vs_confidence"]
        assert (v["learned"], v["confidence"]) == ("rev", "msp")
        # on 10 test inputs the two are tied (msp has the larger gain): the white-box parameters
        # decide, rev's 0 before msp's 9 (black-box's msp 0 is not this mode's)
        assert (c["best"], c["tied"], c["method"]) == ("msp", ["msp", "rev"], "rev")


def test_summary_without_oracles_is_empty():
    rows = operating_points(_samples(), [MSP], {"white_box": []}, appeal_budgets=[0.2])
    assert all(r["gain"] is None for r in rows if r["selection"] == Selection.APPEAL_BUDGET)
    assert appeal_budget_summary(_samples(), [MSP], rows, [])["rows"] == []


def test_gain_cell_and_table_by_hand():
    row = {"gain": 0.0085, "gain_low": 0.004, "gain_high": 0.013, "share": 0.32, "share_low": 0.15,
           "share_high": 0.5}
    assert gain_cell(row) == "+0.85 [+0.40, +1.30] · 32 % [15, 50]"
    assert gain_cell({**row, "share": None}) == "+0.85 [+0.40, +1.30] · —"
    rows = operating_points(_samples(), [MSP], {"white_box": []}, oracles=[ORACLE_WB], appeal_budgets=[0.2, 0.5])
    metrics = {"modes": ["white_box"], "methods": {"msp": {"kind": "post_hoc"}},
               "appeal_budgets": appeal_budget_summary(_samples(), [MSP], rows, [ORACLE_WB])}
    lines = budget_tables(metrics)
    assert "| method | kind | thresholds | 20 % | 50 % |" in lines
    (val,) = [x for x in lines if x.startswith("| msp | post-hoc | val |")]
    assert val.startswith("| msp | post-hoc | val | +0.00 [+0.00, +0.00] · 0 % [0, 0] | +20.00 [")
    (oracle,) = [x for x in lines if x.startswith("| oracle | limit | test |")]
    assert "+20.00 [" in oracle and "+30.00 [" in oracle and "100 %" in oracle
    assert "plain little network alone (70.00 %)" in "\n".join(lines)
    assert budget_tables({"modes": ["white_box"]}) == []


# -- the best learned method against the best confidence score


def test_learned_vs_confidence_by_hand():
    methods = ["gain_head", "appealnet", "msp", "gap"]
    conf = {"msp", "gap"}
    # four draws; the best learned (gain_head, 0.03) is exactly twice the best score (gap, 0.015) in each
    boot = np.array([[0.02, 0.01, 0.005, 0.01], [0.03, 0.01, 0.01, 0.015], [0.04, 0.0, 0.0, 0.02],
                     [0.03, 0.02, 0.01, 0.015]])
    v = learned_vs_confidence(methods, np.array([0.03, 0.01, 0.006, 0.015]), boot, conf)
    assert (v["learned"], v["confidence"], v["verdict"]) == ("gain_head", "gap", "ahead")
    assert v["ratio"] == pytest.approx(2.0) and v["low"] == pytest.approx(2.0) and v["high"] == pytest.approx(2.0)
    assert v["difference"]["low"] == pytest.approx(0.01) and v["difference"]["high"] == pytest.approx(0.02)
    assert versus_text(v) == "; learned gain_head / confidence gap: 2.00x [2.00, 2.00], ahead"
    # two identical methods: ratio 1 in every draw, tied
    same = learned_vs_confidence(["a", "b"], np.array([0.01, 0.01]), boot[:, [0, 0]], {"b"})
    assert (same["ratio"], same["low"], same["high"], same["verdict"]) == (1.0, 1.0, 1.0, "tied")
    # the learned one clearly worse: behind
    worse = learned_vs_confidence(["a", "b"], np.array([0.01, 0.03]), boot[:, [3, 0]], {"b"})
    assert worse["verdict"] == "behind" and worse["high"] < 1
    # a confidence score that gains nothing: no ratio, the verdict from the difference alone
    zero = learned_vs_confidence(["a", "b"], np.array([0.03, 0.0]), np.c_[boot[:, 0], np.zeros(4)], {"b"})
    assert zero["ratio"] is None and zero["low"] is None and zero["verdict"] == "ahead"
    assert versus_text(zero) == "; learned a / confidence b: n/a (b gains nothing), ahead"
    # equal gains: the first of each group in the run's order
    first = learned_vs_confidence(["a", "b", "c", "d"], np.array([0.02, 0.02, 0.01, 0.01]), boot, {"c", "d"})
    assert (first["learned"], first["confidence"]) == ("a", "c")
    # one group only: no comparison
    assert learned_vs_confidence(["msp"], np.array([0.01]), boot[:, :1], {"msp"}) is None
    assert learned_vs_confidence(["a"], np.array([0.01]), boot[:, :1], set()) is None
    assert versus_text(None) == ""


def test_choice_ties_and_the_simplest_method_by_hand():
    """Four methods at one budget, four draws (so an interval is the draws' [min, max]):
    appealnet has the largest gain; msp and gain_head are tied with it (their difference's
    interval contains 0), gap is not; of the tied, post-hoc before trained, then fewer
    parameters: msp."""
    methods = ["appealnet", "msp", "gap", "gain_head"]
    boot = np.array([[0.03, 0.031, 0.01, 0.035], [0.02, 0.018, 0.0, 0.01], [0.04, 0.038, 0.02, 0.03],
                     [0.03, 0.029, 0.01, 0.025]])
    rows = [{"mode": "white_box", "threshold_source": "val", "appeal_budget": 0.2, "method": m, "gain": g,
             "gain_low": g - 0.01, "gain_high": g + 0.01, "share": g / 0.05}
            for m, g in zip(methods, (0.03, 0.029, 0.01, 0.025))]
    kinds = {"appealnet": "trained", "msp": "post_hoc", "gap": "post_hoc", "gain_head": "post_hoc"}
    params = {"appealnet": 241, "msp": 0, "gap": 0, "gain_head": 500}
    c = _choice(rows, boot, kinds, params, {"msp", "gap"})
    assert (c["mode"], c["threshold_source"], c["appeal_budget"]) == ("white_box", "val", 0.2)
    assert (c["method"], c["kind"], c["best"], c["tied"]) == ("msp", "post_hoc", "appealnet",
                                                              ["appealnet", "msp", "gain_head"])
    assert (c["gain"], c["gain_low"], c["gain_high"], c["share"]) == (0.029, 0.029 - 0.01, 0.029 + 0.01, 0.029 / 0.05)
    expected = {"appealnet": (0.0, 0.0), "msp": (-0.002, 0.001), "gap": (-0.02, -0.02), "gain_head": (-0.01, 0.005)}
    assert set(c["gain_minus_best"]) == set(methods)
    for m, (lo, hi) in expected.items():
        assert (c["gain_minus_best"][m]["low"], c["gain_minus_best"][m]["high"]) == (pytest.approx(lo), pytest.approx(hi))
    v = c["learned_vs_confidence"]  # appealnet (0.03) over msp (0.029): ratios 30/31, 20/18, 40/38, 30/29
    assert (v["learned"], v["confidence"], v["verdict"]) == ("appealnet", "msp", "tied")
    assert v["ratio"] == pytest.approx(0.03 / 0.029)
    assert (v["low"], v["high"]) == (pytest.approx(0.03 / 0.031), pytest.approx(0.02 / 0.018))
    assert (v["difference"]["low"], v["difference"]["high"]) == (pytest.approx(-0.001), pytest.approx(0.002))
    # unknown parameters sort after known ones: gain_head (unknown) loses to gap once both are tied
    wide = boot.copy()
    wide[:, 2] = [0.05, 0.0, 0.04, 0.03]  # gap's difference to appealnet now spans 0
    c = _choice(rows, wide, kinds, {"appealnet": 241, "msp": 5, "gap": 1}, set())
    assert c["tied"] == ["appealnet", "msp", "gap", "gain_head"] and c["method"] == "gap"
    assert c["learned_vs_confidence"] is None
    # equal gains: the first in the run's order is the best; a trained method alone is chosen
    two = [dict(rows[0]), dict(rows[0], method="b")]
    c = _choice(two, boot[:, [0, 0]], {"appealnet": "trained", "b": "trained"}, {}, set())
    assert (c["best"], c["method"], c["tied"]) == ("appealnet", "appealnet", ["appealnet", "b"])


def test_export_refuses_both_a_target_and_a_budget(tmp_path, capsys):
    """Two operating points asked for at once: one line, exit 2, nothing written (the run
    folder is not even read)."""
    from cascade.cli import main

    with pytest.raises(SystemExit) as e:
        main(["export", str(tmp_path), "--out", str(tmp_path / "b"), "--appeal-budget", "0.2", "--target-ad", "0.01"])
    assert e.value.code == 2 and not (tmp_path / "b").exists()
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        "cascade export: error: argument --target-ad: not allowed with argument --appeal-budget"


# -- the config


@pytest.mark.parametrize("value, message", [
    ("[0, 0.2]", "evaluation.appeal_budgets.0: Input should be greater than 0"),
    ("[0.2, 1.5]", "evaluation.appeal_budgets.1: Input should be less than or equal to 1"),
    ("[0.2, 0.2]", "evaluation.appeal_budgets: appeal budgets must be distinct"),
])
def test_bad_appeal_budget_is_a_one_line_error(value, message, capsys, monkeypatch):
    from cascade.cli import main

    monkeypatch.chdir(REPO)
    assert main(["validate", "configs/digits.yaml", "--set", f"evaluation.appeal_budgets={value}"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines


def test_default_appeal_budgets():
    from cascade.config.schema import EvaluationConfig

    assert EvaluationConfig().appeal_budgets == [0.05, 0.1, 0.2, 0.3]
    assert EvaluationConfig(appeal_budgets=[]).appeal_budgets == []  # none: no appeal-budget points


# -- runs: every appeal-budget point recomputed from samples.csv with plain numpy

BUDGETS = [0.05, 0.1, 0.2, 0.3]  # evaluation.appeal_budgets' default


def _key(sel: tuple[np.ndarray, np.ndarray], costs: list, t: float) -> tuple[int, int, float]:
    """What the rule ranks a threshold by on the selection split, smallest first: fewer
    right answers, more inputs reaching the last stage, more cost."""
    scores, correct = sel
    n, k = correct.shape
    cum = np.cumsum([1.0 if c is None else c for c in costs])
    tau = _exits(scores, t)
    return -int(correct[np.arange(n), tau].sum()), int((tau == k - 1).sum()), round(float(cum[tau].sum()), 9)


def _brute_force(sels: list, costs: list, budget: float) -> tuple[tuple, int, float]:
    """Try every distinct score (and one above them all) of every variant as the threshold
    on the selection split: the most accurate with at most ``budget * n`` inputs reaching
    the last stage, ties to fewer such inputs, then the cheaper, then the first variant and
    the highest threshold. No cascade code. Returns its key, variant and threshold."""
    best = None
    for i, sel in enumerate(sels):
        scores = sel[0]
        for t in np.append(np.unique(scores), np.nextafter(scores.max(), np.inf))[::-1]:
            key = _key(sel, costs[i], t)
            if key[1] <= budget * len(scores) + 1e-9 and (best is None or key < best[0]):
                best = (key, i, t)
    return best


def _exits(scores: np.ndarray, t: float) -> np.ndarray:
    stop = scores >= t
    return np.where(stop.any(axis=1), stop.argmax(axis=1), scores.shape[1])


def _arrays(frame: pd.DataFrame, v: dict) -> tuple[np.ndarray, np.ndarray]:
    scores = np.stack([frame[c].to_numpy(np.float64) for c in v["score_columns"]], axis=1)
    correct = np.stack([np.ones(len(frame), bool) if c is None else frame[c].to_numpy(bool)
                        for c in v["correct_columns"]], axis=1)
    return scores, correct


def _check_run(out, modes, methods, stages):
    """Every appeal-budget row of points.csv against the brute force; the oracle router's
    gain against its count; metrics.json's summary against the rows."""
    m = json.loads((out / "metrics.json").read_text())
    s = pd.read_csv(out / "samples.csv")
    rows = pd.read_csv(out / "points.csv", keep_default_na=False, na_values=[""])
    rows = rows[rows["selection"] == "appeal_budget"]
    expected = {(mo, me, src, b) for mo in modes for me in methods for src in ("val", "test") for b in BUDGETS}
    expected |= {(mo, "oracle", "test", b) for mo in modes for b in BUDGETS}
    seeds = sorted(s["seed"].unique())
    assert sorted(rows[["mode", "method", "threshold_source", "appeal_budget"]].itertuples(index=False, name=None)) \
        == sorted(k for k in expected for _ in seeds)
    variants: dict[tuple, list] = {}
    for v in m["variants"]:
        variants.setdefault((v["mode"], v["method"]), []).append(v)
    for r in rows.itertuples():
        part = {sp: s[(s["seed"] == r.seed) & (s["split"] == sp)] for sp in ("cal", "test")}
        little = part["test"]["stage0_correct"].to_numpy(bool)
        last = part["test"]["big_correct"].to_numpy(bool) if r.mode == "white_box" else np.ones(len(little), bool)
        assert r.gain == pytest.approx(r.system_accuracy - little.mean(), abs=1e-12)
        if r.method == "oracle":  # only inputs that no plain stage gets right and the last does, as many as fit
            plain = np.stack([part["test"][f"stage{k}_correct"].to_numpy(bool) for k in range(stages - 1)], axis=1)
            only_last = (~plain.any(axis=1) & last).sum()
            n = len(little)
            assert r.appeal_rate * n == pytest.approx(min(only_last, np.floor(r.appeal_budget * n + 1e-9)))
            assert r.system_accuracy == pytest.approx((plain.any(axis=1).sum() + r.appeal_rate * n) / n)
            continue
        vs = variants[r.mode, r.method]
        split = part["cal" if r.threshold_source == "val" else "test"]
        sels = [_arrays(split, v) for v in vs]
        key, i, t = _brute_force(sels, [v["stage_mflops"] for v in vs], r.appeal_budget)
        (mine,) = [j for j, v in enumerate(vs) if v["variant"] == (r.variant if isinstance(r.variant, str) else "")]
        # the run's threshold is as good as the best on the selection split, and within the
        # budget there: it bounds the inputs that reach the last stage
        assert _key(sels[mine], vs[mine]["stage_mflops"], r.threshold) == key, r
        if stages == 2:
            assert (mine, r.threshold) == (i, t), r
        scores, correct = _arrays(part["test"], vs[mine])
        tau = _exits(scores, r.threshold)
        assert r.system_accuracy == pytest.approx(correct[np.arange(len(correct)), tau].mean(), abs=1e-12), r
        assert r.appeal_rate == pytest.approx((tau == stages - 1).mean(), abs=1e-12), r
    summary = {(x["mode"], x["method"], x["threshold_source"], x["appeal_budget"]): x
               for x in m["appeal_budgets"]["rows"]}
    assert set(summary) == expected
    for key, x in summary.items():
        mine = rows[(rows["mode"] == key[0]) & (rows["method"] == key[1]) & (rows["threshold_source"] == key[2])
                    & np.isclose(rows["appeal_budget"], key[3])]
        assert x["gain"] == pytest.approx(mine["gain"].mean(), abs=1e-12)
        assert x["system_accuracy"] == pytest.approx(mine["system_accuracy"].mean(), abs=1e-12)
        assert x["little_accuracy"] == pytest.approx(m["accuracy"]["stage0"], abs=1e-12)
        oracle = summary[key[0], "oracle", "test", key[3]]
        assert x["share"] == pytest.approx(x["gain"] / oracle["gain"]) and x["oracle_gain"] == oracle["gain"]
        assert x["gain_low"] <= x["gain"] + 1e-12 and x["gain"] <= x["gain_high"] + 1e-12
    return m, rows


def test_quick_digits_run_appeal_budget_points(quick_digits_run):
    methods = ["appealnet", "msp", "gap", "entropy", "msp_ts", "doctor", "energy", "deferral_head"]
    m, rows = _check_run(quick_digits_run, ["white_box", "black_box"], methods, 2)
    assert m["operating_points"] and all("appeal_budget" in p and "gain" in p for p in m["operating_points"])
    # black-box: the oracle is always right, so the oracle router gains the little network's
    # errors up to the budget
    for x in m["appeal_budgets"]["rows"]:
        if x["mode"] == "black_box" and x["method"] == "oracle":
            assert x["gain"] == pytest.approx(min(1 - x["little_accuracy"], x["appeal_rate"]), abs=1e-12)
    # export's check recomputes an appeal-budget row as it does a target-AD one, and refuses an edited one
    row = {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in
           rows[(rows["method"] == "msp") & (rows["threshold_source"] == "val")].iloc[0].to_dict().items()}
    assert recompute_point(quick_digits_run, m, row)["threshold"] == row["threshold"]
    from cascade.core.errors import CascadeError

    with pytest.raises(CascadeError, match="appeal budget 0.05"):
        recompute_point(quick_digits_run, m, {**row, "appeal_rate": row["appeal_rate"] + 0.01})
    assert "accuracy gained at fixed appeal budgets" in "\n".join(budget_tables(m))
    # each val budget compares the best learned method with the best confidence score, from the rows
    gains = {(x["mode"], x["method"], x["appeal_budget"]): x["gain"] for x in m["appeal_budgets"]["rows"]
             if x["threshold_source"] == "val"}
    scores = {k for k, v in m["methods"].items() if v["confidence_score"]}
    assert scores == {"msp", "gap", "entropy", "msp_ts", "doctor", "energy"}
    for c in m["appeal_budgets"]["choices"]:
        v = c["learned_vs_confidence"]
        mine = {meth: g for (md, meth, b), g in gains.items() if md == c["mode"] and b == c["appeal_budget"]}
        assert v["learned"] in {"appealnet", "deferral_head"} and v["confidence"] in scores
        assert mine[v["learned"]] == max(g for meth, g in mine.items() if meth not in scores)
        assert mine[v["confidence"]] == max(g for meth, g in mine.items() if meth in scores)
        if v["ratio"] is not None:
            assert v["ratio"] == pytest.approx(mine[v["learned"]] / mine[v["confidence"]])


def test_three_stage_run_bounds_the_inputs_reaching_the_last_stage(quick_cascade_run):
    """K = 3: the budget bounds the fraction of inputs that reach the big network (last
    stage), not those leaving stage 0: the middle stage takes the rest."""
    m, rows = _check_run(quick_cascade_run, ["white_box"],
                         sorted({v["method"] for v in json.loads((quick_cascade_run / "metrics.json").read_text())
                                 ["variants"]}), 3)
    exits = np.array([[float(f) for f in e.split(";")] for e in rows["exit_fractions"]])
    assert exits.shape[1] == 3 and np.allclose(rows["appeal_rate"], exits[:, 2], atol=1e-5)
    # the budget leaves the middle stage free: at some point more inputs leave stage 0 than the budget
    assert (exits[:, 1] + exits[:, 2] > rows["appeal_budget"] + 1e-6).any()
