"""Known answers written to kill mutants that ``make mutate`` (mutmut) found alive in the
numeric core: ``cascade/evaluation/{sweep,selection,guarantee,violations,columns,points,
summaries}.py``, ``cascade/methods/appealnet/objective.py`` and the pre-training
objective's label smoothing. The comment in each test names the changes it catches (by
what they change: mutmut's numbers change with the code). The mutants left alive are
equivalent, each listed with its reason in the mutation-testing notes (issue 21)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
import torch

from cascade import BlackBoxOracle, CrossEntropyTaskLoss, StageOutput
from cascade.evaluation import (
    ORACLE,
    Variant,
    aggregate,
    cascade_sweep,
    comparisons,
    gap_closed,
    gap_table,
    operating_points,
    oracle_scores,
)
from cascade.nn.objectives import SupervisedObjective

# ---------------------------------------------------------------- oracle_scores


def test_oracle_scores_three_stages_by_hand():
    # catches (points.oracle_scores): correctness taken as 0/1 integers, not bools; the stage
    # slices off by one for K = 3; the seed ignored
    correct = np.array([[0, 1, 1],    # stage 0 wrong, the last right: unsafe at 0; stage 1 safe
                        [0, 0, 0],    # the last wrong too: safe everywhere
                        [1, 0, 1],    # safe at 0, unsafe at 1
                        [0, 0, 1]])   # unsafe at both
    s = oracle_scores(correct, seed=3)
    assert s.shape == (4, 2)
    assert (s == 1.0).tolist() == [[False, True], [True, True], [True, False], [False, False]]
    unsafe = s[s < 1]
    assert ((0 <= unsafe) & (unsafe < 0.5)).all()
    assert s[3, 0] == s[3, 1]  # one random value per input, the same at every stage
    np.testing.assert_array_equal(oracle_scores(correct, seed=3), s)  # the seed fixes the order
    assert not np.array_equal(oracle_scores(correct, seed=4), s)
    # the same as bools
    np.testing.assert_array_equal(oracle_scores(correct.astype(bool), seed=3), s)


# ---------------------------------------------------------------- gap_closed


def test_gap_closed_edge_cases():
    # catches (summaries.gap_closed): no oracle, no gap (exactly 1e-12 counts as none), a method
    # worse than the baseline (negative), each handled another way
    assert gap_closed(0.18, 0.16, 0.08) == pytest.approx(0.2)
    assert gap_closed(0.18, 0.16, None) is None
    assert gap_closed(0.5, 0.4, 0.5) is None  # baseline = oracle: nothing to close
    assert gap_closed(1e-12, 0.0, 0.0) is None  # a gap of exactly the 1e-12 slack is none
    assert gap_closed(3.0, 4.0, 1.0) == pytest.approx(-0.5)


# ---------------------------------------------------------------- comparisons and gap tables


def _p(method, source, target, cost, ad=0.0):
    return {"mode": "white_box", "method": method, "selection": "target_ad", "threshold_source": source,
            "target_ad": target, "cost_mflops": cost, "appeal_rate": None, "ad": ad}


def test_comparisons_with_an_oracle_point_by_hand():
    # catches (summaries.comparisons): break for continue on a point not trained, "<" for
    # "<=" on the AD target, the oracle looked up under another key or gap_closed fed other
    # values, a row key renamed. Post-hoc points listed first.
    # An AD of exactly target + the 1e-9 slack still meets it. A trained point without a rival
    # (target 0.02) comes before the others: skipped, not the end.
    points = [_p("msp", "test", 0.01, 0.18, ad=0.005), _p(ORACLE, "test", 0.01, 0.08),
              _p("an", "test", 0.02, 0.1), _p("an", "test", 0.01, 0.16, ad=0.01 + 1e-9),
              _p("msp", "val", 0.01, 0.19, ad=0.02), _p("an", "val", 0.01, 0.17, ad=0.0)]
    rows = {r["threshold_source"]: r for r in comparisons(points, ["an"], ["msp"])}
    assert set(rows) == {"test", "val"} and all(r["target_ad"] == 0.01 for r in rows.values())
    test, val = rows["test"], rows["val"]
    assert (test["method"], test["best_post_hoc"], test["field"]) == ("an", "msp", "cost_mflops")
    assert test["ratio"] == pytest.approx(0.18 / 0.16) and test["targets_met"] is True  # AD .01 <= .01
    assert test["gap_closed"] == pytest.approx(0.02 / 0.10)
    # val: msp missed its target (AD .02 > .01); the gap is measured against the oracle's test point
    assert val["ratio"] == pytest.approx(0.19 / 0.17) and val["targets_met"] is False
    assert val["gap_closed"] == pytest.approx(0.02 / 0.11)


def test_gap_table_skips_what_it_cannot_compare_by_hand():
    # catches (summaries.gap_table): each skip condition dropped or joined another way, break
    # for continue, a row key renamed
    points = [
        _p("an", "test", 0.02, 0.5),                                # no oracle point at 0.02: skipped (listed first)
        _p(ORACLE, "test", 0.01, 0.08), _p("msp", "test", 0.01, 0.18), _p("gap", "test", 0.01, 0.20),
        _p("an", "test", 0.01, 0.16), _p("msp", "val", 0.01, 0.19), _p("an", "val", 0.01, 0.17),
        _p(ORACLE, "test", 0.03, 0.1), _p("an", "test", 0.03, 0.2),  # no post-hoc rival at 0.03: skipped
        _p(ORACLE, "test", 0.05, None), _p("msp", "test", 0.05, 0.3), _p("an", "test", 0.05, 0.2),  # no oracle cost
    ]
    rows = gap_table(points, ["msp", "gap"])
    keys = {"mode", "threshold_source", "target_ad", "method", "field", "value", "best_post_hoc",
            "best_post_hoc_value", "oracle_value", "gap_closed"}
    assert all(set(r) == keys for r in rows)
    got = [(r["threshold_source"], r["target_ad"], r["method"], r["value"], r["best_post_hoc"],
            r["best_post_hoc_value"], r["oracle_value"], r["gap_closed"]) for r in rows]
    want = [("test", 0.01, "msp", 0.18, "msp", 0.18, 0.08, 0.0),
            ("test", 0.01, "gap", 0.20, "msp", 0.18, 0.08, -0.2),
            ("test", 0.01, "an", 0.16, "msp", 0.18, 0.08, 0.2),
            ("val", 0.01, "msp", 0.19, "msp", 0.19, 0.08, 0.0),
            ("val", 0.01, "an", 0.17, "msp", 0.19, 0.08, 0.02 / 0.11)]
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g[:3] == w[:3] and g[4] == w[4] and g[3:4] + g[5:] == pytest.approx(w[3:4] + w[5:])
    assert all((r["mode"], r["field"]) == ("white_box", "cost_mflops") for r in rows)


# ---------------------------------------------------------------- label smoothing


def test_label_smoothing_bounds_and_a_batch_of_three():
    # catches (SupervisedObjective): 1.0 let through as a smoothing (outside [0, 1)) or the
    # message changed; the uniform term averaged over the wrong axis (3 rows, 2 classes: it
    # cannot broadcast)
    with pytest.raises(ValueError, match=r"label_smoothing must lie in \[0, 1\), got 1.0"):
        SupervisedObjective(CrossEntropyTaskLoss(), label_smoothing=1.0)
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0], [math.log(3.0), 0.0]])  # p_1 = .75, .5, .25
    y = torch.tensor([1, 1, 0])
    loss = SupervisedObjective(CrossEntropyTaskLoss(), label_smoothing=0.2)(lambda x: StageOutput(output=x),
                                                                            (logits, y))["loss"]
    # rows: CE [-ln .75, ln 2, -ln .75]; uniform term [-(ln .25 + ln .75) / 2, ln 2, same as row 0]
    ce = [-math.log(0.75), math.log(2.0), -math.log(0.75)]
    uniform = [-(math.log(0.25) + math.log(0.75)) / 2, math.log(2.0), -(math.log(0.25) + math.log(0.75)) / 2]
    assert float(loss) == pytest.approx(np.mean([0.8 * c + 0.2 * u for c, u in zip(ce, uniform)]), abs=1e-6)


# ---------------------------------------------------------------- aggregate


def _row(seed, **values):
    base = {"seed": seed, "mode": "white_box", "method": "m", "selection": "target_ad", "threshold_source": "val",
            "target_ad": 0.01, "budget_fraction": None, "anchor": None, "delta": None, "variant": f"v{seed}",
            "feasible": True, "exit_fractions": [0.5, 0.5], "threshold": 0.5, "target_mflops": None,
            "system_accuracy": 0.9, "cost_mflops": 2.0, "relative_cost": 0.2, "ad": 0.0, "skipping_rate": 0.5,
            "appeal_rate": 0.5}
    return base | values


def test_aggregate_with_missing_and_infinite_values_by_hand():
    # catches (summaries.aggregate): no value at all not None, a mean of other values; one
    # value among two seeds not std 0.0; an inf not std None; the std key added when unknown
    (row,) = aggregate([_row(0, threshold=np.inf, cost_mflops=2.0, ad=0.01),
                        _row(1, threshold=0.5, cost_mflops=None, ad=0.03)])
    assert row["threshold"] == np.inf and row["threshold_std"] is None  # a guaranteed fallback on seed 0
    assert row["cost_mflops"] == 2.0 and row["cost_mflops_std"] == 0.0  # known on one seed only
    assert row["target_mflops"] is None and "target_mflops_std" not in row
    assert row["ad"] == pytest.approx(0.02) and row["ad_std"] == pytest.approx(0.02 / math.sqrt(2))
    assert row["variants"] == ["v0", "v1"] and row["feasible"] and row["exit_fractions"] == [0.5, 0.5]


# ---------------------------------------------------------------- operating_points, three stages


def _three_stage_table() -> pd.DataFrame:
    """2 seeds (seed 1's rows first) x cal/test x 20 rows, 3 stages; stage 1's correctness
    differs from the big one's, so a point read against the wrong stage would show."""
    rng = np.random.default_rng(5)
    frames = []
    for seed in (1, 0):
        for split in ("cal", "test"):
            n = 20
            frames.append(pd.DataFrame({
                "seed": seed, "split": split, "index": np.arange(n),
                "s0": rng.random(n).round(2), "s1": rng.random(n).round(2),
                "c0": rng.random(n) < 0.6, "c1": rng.random(n) < 0.3, "big": rng.random(n) < 0.9}))
    return pd.concat(frames, ignore_index=True)


def test_operating_points_of_a_three_stage_cascade_read_the_last_stage():
    # catches (points.operating_points and its helpers): seeds out of order; the oracle's seed
    # not the run seed; another stage than the LAST read for the reference accuracy, whether
    # its cost is known, the relative cost, the skipping and appeal rates; the budget not a
    # fraction of the last stage's cost; the oracle's rows selected another way; break for
    # continue on a fixed threshold without a cost (it is skipped, not the end of the
    # matched-cost rows)
    samples = _three_stage_table()
    wb = Variant("m", "white_box", "", ("s0", "s1"), ("c0", "c1", "big"), (1.0, 2.0, 10.0))
    bb = Variant("m", "black_box", "", ("s0", "s1"), ("c0", "c1", None), (1.0, 2.0, None))
    fixed_bb = Variant("r", "black_box", "", ("s1", "s0"), ("c0", "c1", None), (1.0, 2.0, None), fixed_threshold=0.5)
    fixed_wb = Variant("r", "white_box", "", ("s1", "s0"), ("c0", "c1", "big"), (1.0, 2.0, 10.0), fixed_threshold=0.5)
    oracle = Variant(ORACLE, "white_box", "", (), ("c0", "c1", "big"), (1.0, 2.0, 10.0))
    targets = {"white_box": [0.0, 0.1], "black_box": [0.3]}
    variants = [fixed_bb, wb, fixed_wb, bb]
    rows = operating_points(samples, variants, targets, budgets=[0.5], oracles=[oracle])
    seeds = [r["seed"] for r in rows]
    assert seeds == sorted(seeds) and set(seeds) == {0, 1}
    budget = [r for r in rows if r["selection"] == "budget"]
    assert len(budget) == 2 * 2 * 2  # seeds x white-box methods x sources (no budget without a cost)
    assert all(r["feasible"] and r["target_mflops"] == 5.0 for r in budget)
    assert all(r["cost_mflops"] <= 5.0 for r in budget if r["threshold_source"] == "test")
    assert {r["selection"] for r in rows if r["method"] == ORACLE} == {"target_ad"}
    matched = [r for r in rows if r["selection"] == "matched_cost"]
    assert {(r["mode"], r["method"], r["anchor"]) for r in matched} == {("white_box", "m", "r")}
    assert len(matched) == 2 * 2  # seeds x sources
    for r in rows:
        test = samples[(samples["seed"] == r["seed"]) & (samples["split"] == "test")]
        last = test["big"].mean() if r["mode"] == "white_box" else 1.0
        assert r["ad"] == pytest.approx(last - r["system_accuracy"], abs=1e-12), r
        assert r["appeal_rate"] == r["exit_fractions"][2] and r["skipping_rate"] == pytest.approx(
            1 - r["exit_fractions"][2])
        if r["selection"] == "target_ad" and r["threshold_source"] == "test":  # chosen on test: meets it there
            assert r["ad"] <= r["target_ad"] + 1e-12, r
        if r["mode"] == "white_box":
            assert r["relative_cost"] == pytest.approx(r["cost_mflops"] / 10.0)
        else:
            assert r["cost_mflops"] is None and r["relative_cost"] is None
    again = operating_points(samples, variants, targets, budgets=[0.5], oracles=[oracle])
    assert [r["threshold"] for r in again] == [r["threshold"] for r in rows]  # the oracle's order is seeded


# ---------------------------------------------------------------- AppealNet's direct targets, oracle asked


def test_direct_targets_ask_a_white_box_oracle_when_its_outputs_are_not_carried():
    # catches (AppealNetObjective._direct, safe and loss_gap): the oracle asked with another
    # argument than x or the criterion; a logged key renamed
    from cascade import AppealNetObjective, WhiteBoxOracle

    little = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    q = torch.tensor([0.2, 0.9])
    y = torch.tensor([0, 0])
    x = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # the big network here: its input, as logits

    def model(_):
        return StageOutput(output=little, q=q)

    class Echo(torch.nn.Module):
        def forward(self, inputs):
            return StageOutput(output=inputs)

    big = WhiteBoxOracle(Echo())
    ce = torch.nn.functional.cross_entropy
    # safe: big wrong on row 0 (appealing cannot help: safe), little right on row 1: safe = [1, 1]
    out = AppealNetObjective(CrossEntropyTaskLoss(), big, lam=0.3, predictor_target="safe")(model, (x, y))
    assert out["L_P"].item() == pytest.approx(-(math.log(0.2) + math.log(0.9)) / 2, abs=1e-6)
    assert out["L_A"].item() == pytest.approx(ce(little, y).item(), abs=1e-6)
    assert out["lambda"].item() == pytest.approx(0.3) and out["q_mean"].item() == pytest.approx(0.55)
    # loss_gap: the logit of q regresses L(big) - L(little), the big's loss on x
    out = AppealNetObjective(CrossEntropyTaskLoss(), big, lam=0.3, predictor_target="loss_gap")(model, (x, y))
    gap = ce(x, y, reduction="none") - ce(little, y, reduction="none")
    want = ((torch.logit(q) - gap) ** 2).mean()
    assert out["L_P"].item() == pytest.approx(want.item(), abs=1e-5)
    assert out["L_A"].item() == pytest.approx(ce(little, y).item(), abs=1e-6) and "q_mean" in out


# ---------------------------------------------------------------- select_guaranteed


def test_select_guaranteed_arguments_ties_and_a_p_value_at_the_level():
    # catches (guarantee.select_guaranteed): an argument error let through or its message
    # changed; ">=" for ">" on the p-value (p = level certifies); nothing failing not giving
    # the lowest threshold; cost ties not broken towards the more accurate, then the first
    # variant; the fallback read at another point than its own cost and correct count
    from cascade.evaluation import degradation_scores, select_guaranteed

    scores = np.array([[0.9], [0.8]])
    right = np.ones((2, 2), bool)
    sw = cascade_sweep(scores, right, (1.0, 10.0))
    s = degradation_scores(scores, right)  # no degradation anywhere
    for delta in (0.0, 1.0):
        with pytest.raises(ValueError, match=rf"delta must lie in \(0, 1\), got {delta}"):
            select_guaranteed([sw], [s], 0.1, delta)
    with pytest.raises(ValueError, match="1 sweeps for 2 degradation arrays"):
        select_guaranteed([sw], [s, s], 0.1, 0.1)
    with pytest.raises(ValueError, match="0 sweeps for 0 degradation arrays"):
        select_guaranteed([], [], 0.1, 0.1)
    with pytest.raises(ValueError, match="variant 0: 3 degradation scores for a sweep of 2 inputs"):
        select_guaranteed([sw], [np.zeros(3)], 0.1, 0.1)
    # no loss anywhere, Binom(2, .5): P(0 losses) = .25 <= delta = .25: every threshold certified
    sel = select_guaranteed([sw], [s], 0.5, 0.25)
    assert (sel.variant, sel.threshold) == (0, 0.8)
    # one loss (row 1 wrong at stage 0) at threshold .8: P(<= 1) = .75 > .25 stops there
    wrong = np.array([[1, 1], [0, 1]], bool)
    sel = select_guaranteed([cascade_sweep(scores, wrong, (1.0, 10.0))], [degradation_scores(scores, wrong)], 0.5,
                            0.25)
    assert sel.threshold == 0.9
    # two variants at equal cost: the one with more correct answers wins, whichever comes first
    # (delta .5 over 2 variants: level .25 again)
    a = (cascade_sweep(scores, wrong, (1.0, 10.0)), np.array([-np.inf, -np.inf]))  # its loss not counted
    b = (cascade_sweep(scores, right, (1.0, 10.0)), s)
    for order, winner in (((a, b), 1), ((b, a), 0)):
        sel = select_guaranteed([o[0] for o in order], [o[1] for o in order], 0.5, 0.5)
        assert (sel.variant, sel.threshold) == (winner, 0.8)
    # all alike: the first
    assert select_guaranteed([b[0], b[0]], [s, s], 0.5, 0.5).variant == 0
    # nothing certified (target 0): threshold inf; of two variants the one whose all-last cost
    # is lower: 2 x (9 + 10) = 38 < 2 x (1 + 20) = 42 (though its next point costs more: 28 > 22)
    y, x = cascade_sweep(scores, right, (1.0, 20.0)), cascade_sweep(scores, right, (9.0, 10.0))
    sel = select_guaranteed([y, x], [s, s], 0.0, 0.5)
    assert (sel.variant, sel.threshold, sel.feasible) == (1, np.inf, True)


def test_small_rules_at_their_boundaries():
    # catches: _resplit_masks marking n_cal + 1 rows ("<=" for "<"), threshold_violations
    # defaulting to another number of re-splits than 200, select_by_cost's budget slack
    # dropped (a mean cost exactly at the budget fits)
    from cascade.evaluation import select_by_cost, threshold_violations
    from cascade.evaluation.violations import _resplit_masks
    from tests.test_wrong_answers import _violations_table

    # mean costs 11 (2 right), 6 (2 right), 1 (1 right)
    sw = cascade_sweep(np.array([[0.9], [0.8]]), np.array([[1, 1], [0, 1]], bool), (1.0, 10.0))
    sel = select_by_cost([sw], 6.0)
    assert (sel.threshold, sel.feasible) == (0.9, True)
    cal = _resplit_masks(np.random.default_rng(0), 10, 3, 5)
    assert cal.shape == (10, 5) and cal.sum(axis=0).tolist() == [3] * 5
    v = Variant("m", "white_box", "", ("s",), ("c0", "c1"), (1.0, 10.0))
    rows = threshold_violations(_violations_table(), [v], {"white_box": [0.25]}, delta=0.6)
    assert {r["resplits"] for r in rows} == {200}


def test_appealnet_objective_clamps_q_reads_x_and_logs_its_keys():
    # catches (AppealNetObjective.__call__): the model fed another input than x; q clamped on
    # one side only, or to [eps, 1 + eps] / [eps, 2 - eps]; a logged key renamed
    from cascade import AppealNetObjective

    class FromX(torch.nn.Module):  # logits are x itself, q its first column
        def forward(self, x):
            return StageOutput(output=x, q=x[:, 0])

    x = torch.tensor([[0.0, 0.5], [1.0, 0.5]])  # q = [0, 1]: clamped to 1e-6 and 1 - 1e-6
    y = torch.tensor([1, 0])
    out = AppealNetObjective(CrossEntropyTaskLoss(), BlackBoxOracle(), lam=0.1)(FromX(), (x, y))
    ce = torch.nn.functional.cross_entropy(x, y, reduction="none")
    assert out["L_P"].item() == pytest.approx((-math.log(1e-6) - math.log(1 - 1e-6)) / 2, rel=1e-6)
    assert out["L_A"].item() == pytest.approx(((1e-6 * ce[0] + (1 - 1e-6) * ce[1]) / 2).item(), rel=1e-5)
    assert out["lambda"].item() == pytest.approx(0.1) and out["q_mean"].item() == pytest.approx(0.5)
    # a wide eps shows the upper clamp (q = 1 kept at 1 - eps, not 1): q = [.1, .9]
    out = AppealNetObjective(CrossEntropyTaskLoss(), BlackBoxOracle(), lam=0.1, eps=0.1)(FromX(), (x, y))
    assert out["q_mean"].item() == pytest.approx(0.5) and out["L_P"].item() == pytest.approx(
        -(math.log(0.1) + math.log(0.9)) / 2, rel=1e-6)


def test_error_target_reads_the_carried_oracle_output_and_asks_with_x():
    # catches: the error target's oracle correctness asked although its outputs come with
    # the batch, or asked without x
    from cascade import AppealNetObjective, WhiteBoxOracle

    class Echo(torch.nn.Module):  # the big network: its input, as logits
        def forward(self, inputs):
            return StageOutput(output=inputs)

    little = torch.tensor([[0.0, 1.0], [math.log(3.0), 0.0]])  # y = [0, 0]: errors [1, 0]
    q = torch.tensor([0.5, 0.8])

    def model(_):
        return StageOutput(output=little, q=q)

    x = torch.tensor([[math.log(9.0), 0.0], [0.0, 1.0]])  # asked: big errors [0, 1]
    carried = torch.tensor([[0.0, 1.0], [math.log(9.0), 0.0]])  # carried: big errors [1, 0]
    y = torch.tensor([0, 0])
    obj = AppealNetObjective(CrossEntropyTaskLoss(), WhiteBoxOracle(Echo()), lam=0.1, predictor_target="error")
    # L_A = mean(q l0 + (1 - q) l1): asked mean(.5, .2) = .35; carried mean(.5 + .5, 0) = .5
    assert obj(model, (x, y))["L_A"].item() == pytest.approx(0.35, abs=1e-6)
    assert obj(model, (x, y, carried))["L_A"].item() == pytest.approx(0.5, abs=1e-6)


def test_infeasible_selection_one_resplit_one_seed_and_sweep_errors():
    # catches: select_by_accuracy's infeasible fallback with another variant or flag (or a
    # numpy integer for the variant); threshold_violations refusing one re-split ("<=" for
    # "<"), or adding a std for one seed; cascade_sweep's error messages changed
    from cascade.evaluation import select_by_accuracy, threshold_violations
    from tests.test_wrong_answers import _violations_table

    scores = np.array([[0.9], [0.8]])
    sw = cascade_sweep(scores, np.array([[1, 1], [0, 1]], bool), (1.0, 10.0))
    sel = select_by_accuracy([sw, sw], min_correct=3)  # 2 inputs: unreachable
    assert (sel.variant, sel.feasible) == (0, False) and isinstance(sel.variant, int)
    table = _violations_table()
    v = Variant("m", "white_box", "", ("s",), ("c0", "c1"), (1.0, 10.0))
    rows = threshold_violations(table[table["seed"] == 0], [v], {"white_box": [0.25]}, delta=0.6, resplits=1)
    assert [(r["resplits"], r["seeds"]) for r in rows] == [(1, 1)] * 2
    assert all("violation_rate_std" not in r for r in rows)
    with pytest.raises(ValueError, match="^cannot sweep an empty split$"):
        cascade_sweep(np.zeros((0, 1)), np.zeros((0, 2), bool), (1.0, 10.0))
    with pytest.raises(ValueError, match=r"scores must be \[N, K-1\] = \[2, 1\], got \[2, 2\]"):
        cascade_sweep(np.zeros((2, 2)), np.zeros((2, 2), bool), (1.0, 10.0))
    with pytest.raises(ValueError, match="3 stage costs for 2 stages"):
        cascade_sweep(scores, np.zeros((2, 2), bool), (1.0, 2.0, 3.0))


# ---------------------------------------------------------------- small contracts of the point table


def test_a_variant_converts_its_mode_and_a_point_reads_as_its_csv_row():
    # catches: Variant.__post_init__ setting another attribute than "mode" (the plain string
    # then stays, equal to the enum but not one); OperatingPoint.__getitem__ raising KeyError
    # without the key; as_row / __iter__ / points_frame: the columns in order, the exit
    # fractions joined with ";" at 6 significant digits
    from cascade.core.enums import Mode, Selection, ThresholdSource
    from cascade.evaluation.points import OperatingPoint, points_frame

    v = Variant("m", "white_box", "", ("s",), ("c0", "c1"), (1.0, 10.0))
    assert type(v.mode) is Mode and v.mode is Mode.WHITE_BOX
    p = OperatingPoint(seed=1, mode=Mode.WHITE_BOX, method="m", target_ad=0.01, selection=Selection.TARGET_AD,
                       threshold_source=ThresholdSource.VAL, variant="", feasible=True, threshold=0.5,
                       system_accuracy=0.9, cost_mflops=4.0, relative_cost=0.4, ad=0.0, skipping_rate=2 / 3,
                       appeal_rate=1 / 3, exit_fractions=[2 / 3, 1 / 3])
    columns = [f.name for f in dataclasses.fields(OperatingPoint)]  # the points.csv columns, in order
    assert columns[:3] == ["seed", "mode", "method"] and "exit_fractions" in columns
    assert list(p) == columns and len(p) == len(columns) and list(p.as_row()) == columns
    assert p["cost_mflops"] == 4.0 and p.as_row()["exit_fractions"] == [2 / 3, 1 / 3]
    with pytest.raises(KeyError) as error:
        p["nope"]
    assert error.value.args == ("nope",)
    frame = points_frame([p, p])
    assert list(frame.columns) == columns and len(frame) == 2
    assert frame["exit_fractions"].tolist() == ["0.666667;0.333333"] * 2
    assert frame["seed"].tolist() == [1, 1] and frame["target_mflops"].isna().all()


# ---------------------------------------------------------------- AppealNet's loss_gap, oracle carried


def test_loss_gap_target_reads_the_carried_oracle_output():
    # catches: _direct's loss_gap asking the oracle although its outputs come with the batch,
    # or the carried outputs read with another argument (None, y missing)
    from cascade import AppealNetObjective, WhiteBoxOracle

    little = torch.tensor([[0.0, math.log(3.0)], [math.log(3.0), 0.0]])  # p(y) = .75 on both rows: CE -ln .75
    y = torch.tensor([1, 0])
    carried = torch.tensor([[0.0, 0.0], [0.0, math.log(3.0)]])  # CE ln 2, ln 4
    x = torch.tensor([[math.log(9.0), 0.0], [0.0, 0.0]])  # the oracle asked: CE ln 10, ln 2 (not these)
    q = torch.tensor([0.5, 0.8])  # logits 0, ln 4

    def model(_):
        return StageOutput(output=little, q=q)

    class Echo(torch.nn.Module):
        def forward(self, inputs):
            return StageOutput(output=inputs)

    obj = AppealNetObjective(CrossEntropyTaskLoss(), WhiteBoxOracle(Echo()), lam=0.3, predictor_target="loss_gap")
    # gaps L(big) - L(little): ln 2 + ln .75 = ln 1.5, ln 4 + ln .75 = ln 3; logit - gap: -ln 1.5, ln 4/3
    out = obj(model, (x, y, carried))
    assert out["L_P"].item() == pytest.approx((math.log(1.5) ** 2 + math.log(4 / 3) ** 2) / 2, abs=1e-6)
    # asked (no third element): gaps ln 10 + ln .75 = ln 7.5, ln 2 + ln .75 = ln 1.5
    out = obj(model, (x, y))
    assert out["L_P"].item() == pytest.approx((math.log(7.5) ** 2 + (math.log(4) - math.log(1.5)) ** 2) / 2, abs=1e-6)


# ---------------------------------------------------------------- the re-split pool, by hand


def test_a_pool_split_three_ways_counts_and_costs_by_hand():
    # catches (violations._Pool / _Split): the calibration part's correct count, the test
    # part's, and its cost at a grid point computed another way (e.g. the running costs not
    # starting at 0, which shifts split 0's cost)
    from cascade.evaluation.violations import _Pool

    # 4 rows, scores .9 .8 .7 .6, costs (1, 10): grid point g keeps the g highest rows at stage 0
    # correct (little, big): row 0 both, row 1 little wrong, row 2 both, row 3 big wrong (a rescue)
    pool = _Pool(np.array([[0.9], [0.8], [0.7], [0.6]]), np.array([[1, 1], [0, 1], [1, 1], [1, 0]], bool), (1.0, 10.0))
    assert pool.threshold[1:].tolist() == [0.9, 0.8, 0.7, 0.6] and pool.threshold[0] > 0.9
    s = pool.split(np.array([[1, 0, 0], [1, 0, 1], [0, 1, 0], [0, 1, 1]], bool))  # cal {0,1}, {2,3}, {1,3}
    g = np.array([0, 0, 0])  # all to the big one: cal right 2, 1, 1; test right {2,3} 1, {0,1} 2, {0,2} 2
    assert s.cal_correct(g).tolist() == [2, 1, 1] and s.test_correct(g).tolist() == [1, 2, 2]
    assert s.cal_cost(g).tolist() == [22.0, 22.0, 22.0]
    # split 0 at .8 (rows 0, 1 kept: 1 + 0 right, cost 2), split 1 at .6 (all kept: cal 2, 3 right,
    # cost 2; test 0, 1: 1 right), split 2 at .9 (row 0 kept; cal 1, 3 to the big: 1 + 0, cost 22;
    # test 0 kept right, 2 big right: 2)
    g = np.array([2, 4, 1])
    assert s.cal_correct(g).tolist() == [1, 2, 1] and s.test_correct(g).tolist() == [1, 1, 2]
    assert s.cal_cost(g).tolist() == [2.0, 2.0, 22.0]
    # split 2 at .8: row 1 kept (wrong, cost 1) and row 3 to the big (wrong, 11)
    g = np.array([4, 0, 2])
    assert s.cal_correct(g).tolist() == [1, 1, 0] and s.cal_cost(g).tolist() == [2.0, 22.0, 12.0]
    assert s.test_correct(g).tolist() == [2, 2, 2]
    # sweep_point: the grid point routing as the calibration sweep's point holding point j.
    # Split 1 (cal rows 2, 3) at j = 0 or 1: no calibration event yet, so just above .7:
    # point 2 (threshold .8); split 2 (rows 1, 3): just above .8, point 1. At j = 3 split 1
    # has passed exactly its first event (row 2, .7): point 3; split 2 its row 1: point 2.
    assert s.sweep_point(np.array([0, 0, 0])).tolist() == [0, 2, 1]
    assert s.sweep_point(np.array([1, 1, 1])).tolist() == [1, 2, 1]
    assert s.sweep_point(np.array([3, 3, 3])).tolist() == [2, 3, 2]


# ---------------------------------------------------------------- threshold_violations' seeding


def test_threshold_violations_are_seeded_with_seed_0_by_default():
    # catches: another default seed; the splits drawn from an unseeded generator
    from cascade.evaluation import threshold_violations
    from tests.test_wrong_answers import _violations_table

    v = Variant("m", "white_box", "", ("s",), ("c0", "c1"), (1.0, 10.0))

    def run(**kw):
        return threshold_violations(_violations_table(), [v], {"white_box": [0.0, 0.25]}, delta=0.6, resplits=40, **kw)

    default = run()
    assert default == run() == run(seed=0)
    assert default != run(seed=1)


def test_resplits_with_an_empty_calibration_part_route_everything_to_the_last_stage():
    # catches (violations._Split.sweep_point): a calibration part without events (every
    # score -inf) mapped to any grid point but 0 (its sweep has one point, threshold inf:
    # the code mapped it to the LAST grid point, keeping every test row: fixed, issue 21),
    # or the emptiness ignored; the last split's single event read at another position;
    # the last event before a point counted only after the split's first one
    from cascade.core.enums import ThresholdSource
    from cascade.evaluation import (
        cascade_point,
        degradation_scores,
        select_by_accuracy,
        select_guaranteed,
    )
    from cascade.evaluation.violations import _Pool, _resplit_ads

    inf = -np.inf
    scores = np.array([[inf], [inf], [0.7], [0.6], [0.9]])
    correct = np.array([[0, 1], [1, 1], [0, 1], [0, 1], [1, 1]], bool)  # rows 0, 2, 3: the little one wrong
    costs = (1.0, 10.0)

    def col(*rows):
        return np.isin(np.arange(5), rows)

    # A: {2, 3}, {0, 4}, {0, 1} (empty, last); B: {3, 4}, {1, 2} (one event, last). By hand
    # (guaranteed, delta .5: 0 losses certified at t = .5, nothing at t = 0), every AD is 0
    # (A's {0, 1}: threshold inf, nothing kept; B's {1, 2} at t = 0: keeping row 2 (.7)
    # degrades, so just above .7: row 4 kept, right; row 3 (.6, wrong) not) but val at t = .5:
    #   A {2, 3}: thr .7 (cal 1 right of 2): test {0, 1, 4}: 0; pool rows 2 (wrong), 4 kept: 1/5
    #   B {3, 4}: thr .6 (1 right): test {0, 1, 2}: row 2 kept, wrong: 1/3; pool 2, 3 wrong: 2/5
    #   B {1, 2}: thr .7 (1 right): test {0, 3, 4}: row 4 kept, right: 0; pool row 2: 1/5
    cases = ((np.stack([col(2, 3), col(0, 4), col(0, 1)], axis=1), [0.0, 0.0, 0.0], [0.2, 0.0, 0.0]),
             (np.stack([col(3, 4), col(1, 2)], axis=1), [1 / 3, 0.0], [0.4, 0.2]))
    empty = _Pool(scores, correct, costs).split(cases[0][0])
    assert empty.empty.tolist() == [False, False, True]
    assert empty.sweep_point(np.array([3, 3, 3]))[2] == 0  # above every score: nothing kept
    for cal, test_half, pool_half in cases:
        ads = _resplit_ads([_Pool(scores, correct, costs)], cal, [0.0, 0.5], 0.5)
        for (source, t), (test_ad, pool_ad) in ads.items():
            half = (source, t) == (ThresholdSource.VAL, 0.5)
            assert test_ad.tolist() == pytest.approx(test_half if half else [0.0] * cal.shape[1], abs=1e-12)
            assert pool_ad.tolist() == pytest.approx(pool_half if half else [0.0] * cal.shape[1], abs=1e-12)
        for r in range(cal.shape[1]):  # and what the selection functions pick on each calibration part
            m = cal[:, r]
            sw = cascade_sweep(scores[m], correct[m], costs)
            for t in (0.0, 0.5):
                for source, pick in ((ThresholdSource.VAL, select_by_accuracy([sw], 2 * (1 - t))),
                                     (ThresholdSource.GUARANTEED, select_guaranteed(
                                         [sw], [degradation_scores(scores[m], correct[m])], t, 0.5))):
                    test = cascade_point(pick.threshold, scores[~m], correct[~m], costs)
                    assert ads[(source, t)][0][r] == pytest.approx(1.0 - test.system_accuracy, abs=1e-12)



def test_resplit_variants_tie_on_cost_to_the_more_accurate_then_the_first():
    # catches (violations._resplit_ads): an equal calibration cost broken towards the later
    # variant, or by another field than the calibration correct count (the cost, the test
    # count)
    from cascade.core.enums import ThresholdSource
    from cascade.evaluation.violations import _Pool, _resplit_ads

    # rows 0, 1 calibration (.8, .7), rows 2, 3 test (.9, .75); the big one always right,
    # costs (1, 10) for both variants. At t = .5 (1 right of 2 needed) each variant's
    # cheapest calibration point keeps both calibration rows (threshold .7, cost 2), which
    # keeps both test rows too.
    scores = np.array([[0.8], [0.7], [0.9], [0.75]])
    cal = np.array([[1], [1], [0], [0]], bool)

    def pool(*little):
        return _Pool(scores, np.stack([np.array(little, bool), np.ones(4, bool)], axis=1), (1.0, 10.0))

    worse, better, same = pool(0, 1, 0, 1), pool(1, 1, 1, 1), pool(1, 1, 0, 1)
    val = (ThresholdSource.VAL, 0.5)
    # equal cost, 1 vs 2 right on calibration: the second (better) variant, all right on test
    test_ad, pool_ad = _resplit_ads([worse, better], cal, [0.5], 0.6)[val]
    assert (test_ad.tolist(), pool_ad.tolist()) == ([0.0], [0.0])
    # equal cost, 2 vs 2 right: the first (same: row 2 wrong on test, AD 1/2; pool 1/4)
    test_ad, pool_ad = _resplit_ads([same, better], cal, [0.5], 0.6)[val]
    assert (test_ad.tolist(), pool_ad.tolist()) == ([0.5], [0.25])
    # guaranteed, one variant, t = .5, delta .25: P(Binom(2, .5) <= 0) = .25 certifies 0 losses;
    # row 0 (.8, wrong) is the first calibration loss: just above .8, row 2 (.9, wrong) kept: 1/2, 1/4
    test_ad, pool_ad = _resplit_ads([worse], cal, [0.5], 0.25)[(ThresholdSource.GUARANTEED, 0.5)]
    assert (test_ad.tolist(), pool_ad.tolist()) == ([0.5], [0.25])


def test_a_variants_arrays_are_float64_scores_and_bool_correctness():
    # catches (columns.correct_array, variant_arrays): the black-box oracle's column of ones
    # not bool, the 0/1 correctness or the float32 scores of a table left in their own dtype
    from cascade.evaluation.columns import correct_array, variant_arrays

    frame = pd.DataFrame({"s": np.array([0.5, 0.25], np.float32), "c0": [1, 0]})
    v = Variant("m", "black_box", "", ("s",), ("c0", None), (1.0, None))
    scores, correct = variant_arrays(frame, v)
    assert scores.dtype == np.float64 and scores.tolist() == [[0.5], [0.25]]
    assert correct.dtype == bool and correct.tolist() == [[True, True], [False, True]]
    assert correct_array(frame, v).dtype == bool


def test_select_by_cost_takes_the_most_accurate_fit_or_flags_the_cheapest():
    # catches (selection.select_by_cost): the LEAST accurate point within the budget; the
    # infeasible fallback flagged None instead of False
    from cascade.evaluation import select_by_cost

    # mean costs 11 (2 right), 6 (2 right), 1 (1 right): within 11, the most accurate, then
    # the cheaper: threshold .9
    sw = cascade_sweep(np.array([[0.9], [0.8]]), np.array([[1, 1], [0, 1]], bool), (1.0, 10.0))
    assert select_by_cost([sw], 11.0) == select_by_cost([sw], 100.0)
    sel = select_by_cost([sw], 11.0)
    assert (sel.variant, sel.threshold, sel.feasible) == (0, 0.9, True)
    sel = select_by_cost([sw], 0.5)  # nothing fits: the cheapest point, not feasible
    assert (sel.variant, sel.threshold) == (0, 0.8) and sel.feasible is False


def test_select_guaranteed_falls_back_to_the_first_of_equally_costly_variants():
    # catches (guarantee.select_guaranteed): the fallback (nothing certified) ranked by the
    # correct count at another point than its own (point 0, all to the last stage)
    from cascade.evaluation import degradation_scores, select_guaranteed

    scores = np.array([[0.9], [0.8]])
    # same costs, same last stage; at threshold .9 variant 0 has 1 right, variant 1 has 2
    v0 = np.array([[0, 1], [1, 1]], bool)
    v1 = np.array([[1, 1], [1, 1]], bool)
    sweeps = [cascade_sweep(scores, c, (1.0, 10.0)) for c in (v0, v1)]
    sel = select_guaranteed(sweeps, [degradation_scores(scores, c) for c in (v0, v1)], 0.0, 0.5)  # target 0
    assert (sel.variant, sel.threshold, sel.feasible) == (0, np.inf, True)


def test_loss_target_reads_the_carried_oracle_output_and_the_defaults():
    # catches (AppealNetObjective): the loss target's oracle loss asked although its outputs
    # come with the batch, or asked without x; another default lambda (0.1), eps, mode or target
    from cascade import AppealNetObjective, WhiteBoxOracle

    class Echo(torch.nn.Module):
        def forward(self, inputs):
            return StageOutput(output=inputs)

    little = torch.tensor([[0.0, 1.0], [math.log(3.0), 0.0]])  # y = [0, 0]: CE ln(1 + e), -ln .75
    q = torch.tensor([0.5, 0.8])

    def model(_):
        return StageOutput(output=little, q=q)

    x = torch.tensor([[math.log(9.0), 0.0], [0.0, 1.0]])  # asked: CE -ln .9, ln(1 + e)
    carried = torch.tensor([[0.0, 1.0], [math.log(9.0), 0.0]])  # carried: CE ln(1 + e), -ln .9
    y = torch.tensor([0, 0])
    obj = AppealNetObjective(CrossEntropyTaskLoss(), WhiteBoxOracle(Echo()))
    assert (obj.lam, obj.eps, obj.approximator_loss, obj.predictor_target) == (0.1, 1e-6, "weighted", "loss")
    a, b = math.log(1 + math.e), -math.log(0.75)  # the little's CE
    c = -math.log(0.9)
    # L_A = mean(q L0 + (1 - q) L1)
    assert obj(model, (x, y))["L_A"].item() == pytest.approx((0.5 * a + 0.5 * c + 0.8 * b + 0.2 * a) / 2, abs=1e-6)
    assert obj(model, (x, y, carried))["L_A"].item() == pytest.approx((0.5 * a + 0.5 * a + 0.8 * b + 0.2 * c) / 2,
                                                                       abs=1e-6)


# ---------------------------------------------------------------- input dtypes and the kernel's lengths


def test_float32_scores_and_float_correctness_are_read_as_float64_and_bool():
    # catches (sweep.cascade_sweep, guarantee.degradation_scores): float32 scores swept in
    # their own precision (point 0's threshold, just above the top score, is then a float32
    # step up, not a float64 one); float 0/1 correctness not read as bool (~ of a float fails)
    from cascade.evaluation import degradation_scores

    scores = np.array([[0.1], [0.3]], np.float32)
    top = np.float64(np.float32(0.3))
    sw = cascade_sweep(scores, np.array([[1, 1], [0, 1]], bool), (1.0, 10.0))
    assert sw.threshold.dtype == np.float64
    assert sw.threshold.tolist() == [np.nextafter(top, np.inf), top, np.float64(np.float32(0.1))]
    s = degradation_scores(scores, np.array([[1.0, 1.0], [0.0, 1.0]]))  # row 1 degrades from its score
    assert s.dtype == np.float64 and s.tolist() == [-np.inf, top]


def test_the_kernel_refuses_thresholds_that_do_not_match_its_stages():
    # catches (deploy.kernel.route_rows): zip without strict=True (a missing threshold would
    # silently drop the stage)
    from cascade.deploy.kernel import route_rows

    def stage(x):
        return x, x[:, 0]

    x = torch.tensor([[0.2], [0.9]])
    assert route_rows(x, [stage, stage], [0.5, 0.1]).exit_stage.tolist() == [1, 0]
    with pytest.raises(ValueError, match="zip"):
        route_rows(x, [stage, stage], [0.5])


def test_a_minus_inf_score_never_stops_and_a_sweep_of_such_scores_has_one_point():
    # catches (sweep.sorted_events, sweep_grid): a score equal to the running maximum (here
    # -inf, the start) counted as a record, which adds a point at threshold -inf; a sweep
    # without events (every score -inf) built another way (no point, two points, an index error)
    inf = np.inf
    sw = cascade_sweep(np.array([[-inf], [0.5]]), np.array([[1, 1], [0, 1]], bool), (1.0, 10.0))
    assert sw.threshold.tolist() == [np.nextafter(0.5, inf), 0.5]  # the lowest threshold: the lowest finite score
    assert sw.exit_counts.tolist() == [[0, 2], [1, 1]] and sw.system_correct.tolist() == [2, 1]
    sw = cascade_sweep(np.array([[-inf], [-inf]]), np.array([[1, 1], [0, 1]], bool), (1.0, 10.0))
    assert sw.threshold.tolist() == [inf] and sw.exit_counts.tolist() == [[0, 2]]
    assert sw.system_correct.tolist() == [2] and sw.total_mflops.tolist() == [22.0]
