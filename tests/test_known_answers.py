"""Known answers worked out by hand: baseline scores, AppealNet losses, lambda updates,
operating-point selection with tied scores (the two-stage cascade, K = 2), the per-seed
operating points, their aggregate over seeds and the method comparisons read off a tiny
per-sample table, and network cost."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from baselines.confidence import EntropyScore, GapScore, MaxSoftmaxScore
from cascade import (
    AppealNetObjective,
    BlackBoxOracle,
    CrossEntropyTaskLoss,
    LambdaControllerHook,
    StageOutput,
    WhiteBoxOracle,
    cascade_point,
    cascade_sweep,
    measure_cost,
)
from cascade.evaluation import Variant, aggregate, comparisons, operating_points, select_by_accuracy

# ---------------------------------------------------------------- baseline scores


def test_baseline_scores_three_classes():
    # p = [0.5, 0.3, 0.2] (logits = log p):
    #   MSP = 0.5; gap = 0.5 - 0.3 = 0.2
    #   H = -(0.5 ln .5 + .3 ln .3 + .2 ln .2) = 0.346574 + 0.361192 + 0.321888 = 1.029653
    #   entropy score = 1 - H / ln 3 = 1 - 1.029653 / 1.098612 = 0.062769
    # p = [1, 0, 0] (one-hot, logit -inf): MSP 1, gap 1, entropy score 1 (H = 0)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2], [1.0, 0.0, 0.0]]))
    stage = StageOutput(output=logits)
    assert MaxSoftmaxScore().score(stage).tolist() == pytest.approx([0.5, 1.0])
    assert GapScore().score(stage).tolist() == pytest.approx([0.2, 1.0])
    assert EntropyScore().score(stage).tolist() == pytest.approx([0.062769, 1.0], abs=1e-6)


def test_uniform_softmax_scores_zero_gap_and_entropy():
    # p = [1/3, 1/3, 1/3]: MSP 1/3, gap 0, H = ln 3 so the entropy score is 0
    stage = StageOutput(output=torch.zeros(1, 3))
    assert MaxSoftmaxScore().score(stage).item() == pytest.approx(1 / 3)
    assert GapScore().score(stage).item() == pytest.approx(0.0)
    assert EntropyScore().score(stage).item() == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------- AppealNet loss


class _Fixed(nn.Module):
    """Returns fixed logits and q whatever the input."""

    def __init__(self, logits, q=None):
        super().__init__()
        self.logits, self.q = logits, q

    def forward(self, x):
        return StageOutput(output=self.logits, q=self.q)


def _two_samples():
    # little: sample 1 logits [0, 0] (p_y = 0.5), sample 2 [ln 3, 0] (p_y = 0.75); y = [0, 0]
    little = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    q = torch.tensor([0.5, 0.8])
    # big: sample 1 [ln 9, 0] (p_y = 0.9), sample 2 [0, 0] (p_y = 0.5)
    big = torch.tensor([[math.log(9.0), 0.0], [0.0, 0.0]])
    y = torch.tensor([0, 0])
    return _Fixed(little, q), _Fixed(big), (torch.zeros(2, 1), y)


def test_appealnet_loss_white_box_eq11():
    # L0 = [ln 2, -ln .75] = [0.693147, 0.287682]; L1 = [-ln .9, ln 2] = [0.105361, 0.693147]
    # L_A = mean(.5*.693147 + .5*.105361, .8*.287682 + .2*.693147) = mean(.399254, .368775) = .3840145
    # L_P = mean(-ln .5, -ln .8) = mean(.693147, .223144) = .4581454
    # loss = L_A + 0.1 * L_P = .3840145 + .0458145 = .4298290
    model, big, batch = _two_samples()
    obj = AppealNetObjective(CrossEntropyTaskLoss(), WhiteBoxOracle(big), lam=0.1)
    out = obj(model, batch)
    assert out["L_A"].item() == pytest.approx(0.3840145, abs=1e-6)
    assert out["L_P"].item() == pytest.approx(0.4581454, abs=1e-6)
    assert out["loss"].item() == pytest.approx(0.4298290, abs=1e-6)
    # the same with the big network's outputs precomputed and carried in the batch
    x, y = batch
    out = obj(model, (x, y, big.logits))
    assert out["loss"].item() == pytest.approx(0.4298290, abs=1e-6)


def test_appealnet_loss_black_box_eq12():
    # L(f1, y) = 0: L_A = mean(.5*.693147, .8*.287682) = mean(.3465736, .2301457) = .2883596
    # loss = .2883596 + 0.1 * .4581454 = .3341742
    model, _, batch = _two_samples()
    out = AppealNetObjective(CrossEntropyTaskLoss(), BlackBoxOracle(), lam=0.1)(model, batch)
    assert out["L_A"].item() == pytest.approx(0.2883596, abs=1e-6)
    assert out["loss"].item() == pytest.approx(0.3341742, abs=1e-6)


def test_appealnet_error_target():
    # predictor_target="error": little errors [0, 0] (argmax 0 both; logits [0,0] tie -> argmax 0),
    # big errors [0, 0]; the predictor term is 0, so loss = 0.1 * L_P + mean CE of little
    # = 0.0458145 + mean(.693147, .287682) = 0.0458145 + 0.4904146 = 0.5362291
    model, big, batch = _two_samples()
    obj = AppealNetObjective(CrossEntropyTaskLoss(), WhiteBoxOracle(big), lam=0.1, predictor_target="error")
    assert obj(model, batch)["loss"].item() == pytest.approx(0.5362291, abs=1e-6)


def test_lambda_controller_each_way():
    obj = AppealNetObjective(CrossEntropyTaskLoss(), BlackBoxOracle(), lam=0.1)
    hook = LambdaControllerHook(obj, budget=0.5)
    hook.after_step(None, {"L_P": 0.6})  # over budget: 0.1 / 0.99 = 0.10101010
    assert obj.lam == pytest.approx(0.1010101, abs=1e-7)
    obj.lam = 0.1
    hook.after_step(None, {"L_P": 0.4})  # under budget: 0.1 / 1.01 = 0.09900990
    assert obj.lam == pytest.approx(0.0990099, abs=1e-7)


# ---------------------------------------------------------------- operating points


# 10 inputs, sorted by score; ties at 0.9 (items 1-2) and 0.7 (items 4-6).
SCORE = np.array([0.9, 0.9, 0.8, 0.7, 0.7, 0.7, 0.5, 0.4, 0.3, 0.2])
LITTLE = np.array([1, 1, 1, 1, 1, 0, 0, 1, 0, 0], bool)
BIG = np.array([1, 1, 1, 1, 1, 1, 1, 1, 1, 0], bool)  # big alone: 9/10
# Keeping k inputs is valid for k in {0, 2, 3, 6, 7, 8, 9, 10} (never inside a tie).
# System correct at those k: 9, 9, 9, 8, 7, 7, 6, 6  ->  AD: 0, 0, 0, .1, .2, .2, .3, .3
# (A threshold-blind count would offer k = 5 with AD 0, but "score >= 0.7" keeps 6.)
# As a cascade with K = 2: scores [N, 1], correct [N, 2] = (little, big), costs (c0, c1) = (1, 10).
SCORES2 = SCORE[:, None]
CORRECT2 = np.stack([LITTLE, BIG], axis=1)
COSTS2 = (1.0, 10.0)


def test_sweep_respects_ties():
    sw = cascade_sweep(SCORES2, CORRECT2, COSTS2)
    assert sw.exit_counts[:, 0].tolist() == [0, 2, 3, 6, 7, 8, 9, 10]  # kept on the little network
    assert sw.exit_counts.sum(axis=1).tolist() == [10] * 8
    assert sw.system_correct.tolist() == [9, 9, 9, 8, 7, 7, 6, 6]
    assert sw.threshold[1:].tolist() == [0.9, 0.8, 0.7, 0.5, 0.4, 0.3, 0.2]
    assert sw.threshold[0] > 0.9  # keeps nothing
    # total cost = kept * c0 + (10 - kept) * (c0 + c1) = 110 - 10 kept
    assert sw.total_mflops.tolist() == pytest.approx([110, 90, 80, 50, 40, 30, 20, 10])


@pytest.mark.parametrize(
    "target, threshold, sr, acc, cost",
    [
        # AD <= 0: at least 9 correct; the cheapest such point keeps k = 3 (threshold 0.8);
        # cost = c0 + AR c1 = 1 + 0.7 * 10 = 8
        (0.0, 0.8, 0.3, 0.9, 8.0),
        # AD <= 0.1: at least 8 correct: k = 6 at 0.7; cost 1 + 0.4 * 10 = 5
        (0.1, 0.7, 0.6, 0.8, 5.0),
        # AD <= 0.25: at least 6.5 correct: k = 8 at 0.4 (k = 9 has 6); cost 1 + 0.2 * 10 = 3
        (0.25, 0.4, 0.8, 0.7, 3.0),
        # AD <= 0.3: at least 6 correct: everything kept; cost 1
        (0.3, 0.2, 1.0, 0.6, 1.0),
    ],
)
def test_select_and_apply_threshold(target, threshold, sr, acc, cost):
    sw = cascade_sweep(SCORES2, CORRECT2, COSTS2)
    sel = select_by_accuracy([sw], 10 * (0.9 - target))  # min_correct = N (acc(big) - target)
    assert sel.feasible and sel.variant == 0
    assert sel.threshold == pytest.approx(threshold)
    p = cascade_point(sel.threshold, SCORES2, CORRECT2, COSTS2)
    assert p.exit_fractions == pytest.approx([sr, 1 - sr])  # [skipping rate, appeal rate]
    assert p.system_accuracy == pytest.approx(acc)
    assert 0.9 - p.system_accuracy <= target + 1e-12  # AD within the target
    assert p.cost_mflops == pytest.approx(cost)


def test_black_box_ad_is_one_minus_accuracy():
    # oracle always right: keeping the top 3 (all little-correct) gives AD 0;
    # at 0.7 six are kept, one wrong -> accuracy 0.9, AD 0.1
    correct = np.stack([LITTLE, np.ones(10, bool)], axis=1)
    sw = cascade_sweep(SCORES2, correct, (1.0, 1.0))
    assert select_by_accuracy([sw], 10 * (1.0 - 0.0)).threshold == pytest.approx(0.8)
    p = cascade_point(0.7, SCORES2, correct, (1.0, 1.0))
    assert 1.0 - p.system_accuracy == pytest.approx(0.1)


def test_unreachable_target_is_flagged_infeasible():
    # a target below zero asks for more than the big network's 9 correct: nothing reaches
    # 9.5, so the most accurate point (9 correct) is returned, the cheapest of those (k = 3)
    sw = cascade_sweep(SCORES2, CORRECT2, COSTS2)
    sel = select_by_accuracy([sw], 10 * (0.9 + 0.05))
    assert not sel.feasible and sel.threshold == pytest.approx(0.8)


# ---------------------------------------------------------------- operating points from samples.csv

# A tiny per-sample table: 2 seeds x (cal, test) x 5 inputs, three white-box methods and one
# black-box one. Columns as the pipeline writes them.
#
# seed 0, test                idx:  0     1     2     3     4
#   msp score (stage0_score_msp)   .9    .8    .8    .6    .3
#   stage0_correct                  1     1     0     1     0
#   big_correct                     1     1     1     0     1      big alone 4/5 = .8
#   appealnet score                .95   .1    .6    .7    .2
#   appealnet stage0 correct        1     0     1     1     1
# seed 0, cal
#   msp score                      .7    .7    .5    .4    .2
#   stage0_correct                  1     0     1     1     0
#   big_correct                     1     1     1     1     0      big alone .8
#   appealnet score                .9    .3    .8    .5    .6
#   appealnet stage0 correct        1     1     1     1     0      (= big_correct)
# seed 1, test and cal identical
#   msp score                      .5    .4    .3    .2    .1
#   stage0_correct, big_correct    all 1
#   appealnet score                all .9 (one tie)
#   appealnet stage0 correct        0     1     1     1     1
# reinforce (variant a0.1, fixed threshold 0.5) reads copies of appealnet's columns.
S0_TEST = dict(msp=[.9, .8, .8, .6, .3], stage=[1, 1, 0, 1, 0], big=[1, 1, 1, 0, 1],
               app=[.95, .1, .6, .7, .2], app_correct=[1, 0, 1, 1, 1])
S0_CAL = dict(msp=[.7, .7, .5, .4, .2], stage=[1, 0, 1, 1, 0], big=[1, 1, 1, 1, 0],
              app=[.9, .3, .8, .5, .6], app_correct=[1, 1, 1, 1, 0])
S1 = dict(msp=[.5, .4, .3, .2, .1], stage=[1] * 5, big=[1] * 5, app=[.9] * 5, app_correct=[0, 1, 1, 1, 1])

APP = "appealnet_white_box_stage0"
RL = "reinforce_a0.1_white_box_stage0"
MSP_W = Variant("msp", "white_box", "", ("stage0_score_msp",), ("stage0_correct", "big_correct"), (1.0, 10.0))
MSP_B = Variant("msp", "black_box", "", ("stage0_score_msp",), ("stage0_correct", None), (1.0, None))
APPEAL = Variant("appealnet", "white_box", "", (f"{APP}_score",), (f"{APP}_correct", "big_correct"), (1.5, 10.0))
FIXED = Variant("reinforce", "white_box", "a0.1", (f"{RL}_score",), (f"{RL}_correct", "big_correct"), (1.5, 10.0),
                fixed_threshold=0.5)
TARGETS = {"white_box": [0.0, 0.2], "black_box": [0.2]}


def _samples() -> pd.DataFrame:
    frames = []
    for seed, split, d in ((0, "cal", S0_CAL), (0, "test", S0_TEST), (1, "cal", S1), (1, "test", S1)):
        frames.append(pd.DataFrame({
            "seed": seed, "split": split, "index": range(5), "target": range(5),
            "big_correct": np.array(d["big"], bool), "stage0_correct": np.array(d["stage"], bool),
            "stage0_score_msp": d["msp"], f"{APP}_score": d["app"], f"{APP}_correct": np.array(d["app_correct"], bool),
            f"{RL}_score": d["app"], f"{RL}_correct": np.array(d["app_correct"], bool),
        }))
    return pd.concat(frames, ignore_index=True)


def _one(rows, **key):
    hit = [r for r in rows if all(r[k] == v for k, v in key.items())]
    assert len(hit) == 1, (key, hit)
    return hit[0]


def _check(row, threshold, acc, cost, ad, skip):
    assert row["threshold"] == pytest.approx(threshold)
    assert row["system_accuracy"] == pytest.approx(acc)
    assert row["cost_mflops"] == pytest.approx(cost)
    assert row["relative_cost"] == pytest.approx(cost / 10.0)
    assert row["ad"] == pytest.approx(ad, abs=1e-12)
    assert row["skipping_rate"] == pytest.approx(skip) and row["appeal_rate"] == pytest.approx(1 - skip)
    assert row["exit_fractions"] == pytest.approx([skip, 1 - skip])


def test_operating_points_known_answers():
    rows = operating_points(_samples(), [MSP_W, MSP_B, APPEAL, FIXED], TARGETS)
    # per seed: 3 white-box methods x 3 sources x 2 targets + black-box msp x 3 sources x 1
    # target + 1 fixed + 2 other white-box methods x 2 sources at the fixed point's cost = 26
    assert len(rows) == 2 * 26
    seed0 = [r for r in rows if r["seed"] == 0]
    # guaranteed: five calibration inputs certify nothing (no loss in 5 at target .2 still has
    # p = .8^5 = .33 > delta .1): every input to the last stage, threshold inf, AD exactly 0
    for r in (r for r in rows if r["threshold_source"] == "guaranteed"):
        assert r["threshold"] == np.inf and r["delta"] == 0.1 and r["feasible"], r
        assert r["appeal_rate"] == 1 and r["ad"] == 0
        assert r["cost_mflops"] == (pytest.approx(11.5) if r["method"] in ("appealnet", "reinforce") else
                                    pytest.approx(11.0) if r["mode"] == "white_box" else None)

    # msp, seed 0, test split; costs cumulate to (1, 11); points (threshold: correct, cost):
    #   above .9: 4, 11 | .9 (keeps 1): 1 + 3 = 4, (1 + 44)/5 = 9 | .8 (keeps 3): 2 + 1 = 3, 25/5 = 5
    #   .6 (keeps 4): 3 + 1 = 4, 15/5 = 3 | .3 (keeps 5): 3, 1
    # AD <= 0 needs 5 * .8 = 4 correct: the cheapest is .6 -> acc .8, cost 3, skipping .8
    _check(_one(seed0, mode="white_box", method="msp", threshold_source="test", target_ad=0.0), .6, .8, 3, 0, .8)
    # AD <= .2 needs 3: everything kept at .3 -> acc .6, cost 1, AD .2
    _check(_one(seed0, mode="white_box", method="msp", threshold_source="test", target_ad=0.2), .3, .6, 1, .2, 1)
    # on cal (big .8): above .7: 4 | .7 (keeps 2): 1 + 2 = 3 | .5: 2 + 1 = 3 | .4: 3 + 0 = 3 | .2: 3
    # AD <= 0 needs 4: only "above .7" -> on test it keeps .9, .8, .8: 1 + 1 + 0 + big (0 + 1) = 3,
    # acc .6, cost (3 + 22)/5 = 5, AD .2: the val threshold misses the target on test
    val0 = _one(seed0, mode="white_box", method="msp", threshold_source="val", target_ad=0.0)
    assert val0["threshold"] > 0.7 and val0["threshold"] == pytest.approx(0.7)
    _check(val0, val0["threshold"], .6, 5, .2, .6)
    # AD <= .2 on cal needs 3: the cheapest is .2 -> keeps every test input (lowest .3)
    _check(_one(seed0, mode="white_box", method="msp", threshold_source="val", target_ad=0.2), .2, .6, 1, .2, 1)

    # appealnet, seed 0, test: sorted .95 (l1 b1), .7 (l1 b0), .6 (l1 b1), .2 (l1 b1), .1 (l0 b1)
    # correct by kept k = 0..5: 4, 4, 5, 5, 5, 4; cost (1.5 k + 11.5 (5 - k))/5 = 11.5 - 2k
    # AD <= 0 (4 correct) and AD <= .2: keep all at .1, acc .8, cost 1.5
    app0 = _one(seed0, mode="white_box", method="appealnet", threshold_source="test", target_ad=0.0)
    assert app0["cost_mflops"] == pytest.approx(1.5) and app0["relative_cost"] == pytest.approx(0.15)
    assert app0["threshold"] == pytest.approx(0.1) and app0["ad"] == pytest.approx(0, abs=1e-12)
    # on cal every point has 4 correct (little = big on each input): the cheapest keeps all, .3;
    # on test .3 keeps .95, .7, .6 (all right) and appeals the other two (big right): acc 1,
    # AD .8 - 1 = -.2, cost (3 * 1.5 + 2 * 11.5)/5 = 5.5
    appv = _one(seed0, mode="white_box", method="appealnet", threshold_source="val", target_ad=0.0)
    assert appv["threshold"] == pytest.approx(0.3) and appv["system_accuracy"] == pytest.approx(1.0)
    assert appv["cost_mflops"] == pytest.approx(5.5) and appv["ad"] == pytest.approx(-0.2)

    # black-box msp: the oracle is always right, its cost unknown. Seed 0 test, correct by kept
    # k = 0, 1, 3, 4, 5: 5, 5, 4, 4, 3; AD <= .2 needs 4: the cheapest keeps 4 (threshold .6),
    # acc .8, AD = 1 - .8 = .2, appeal rate .2, no cost
    bb = _one(seed0, mode="black_box", method="msp", threshold_source="test", target_ad=0.2)
    assert bb["threshold"] == pytest.approx(0.6) and bb["system_accuracy"] == pytest.approx(0.8)
    assert bb["ad"] == pytest.approx(0.2) and bb["appeal_rate"] == pytest.approx(0.2)
    assert bb["cost_mflops"] is None and bb["relative_cost"] is None
    # on cal: k = 0, 2, 3, 4, 5 -> 5, 4, 4, 4, 3; needs 4: .4, which keeps 4 test inputs as above
    bbv = _one(seed0, mode="black_box", method="msp", threshold_source="val", target_ad=0.2)
    assert bbv["threshold"] == pytest.approx(0.4) and bbv["appeal_rate"] == pytest.approx(0.2)

    # the fixed threshold .5, seed 0 test: keeps .95, .6, .7 as appealnet's .3 did: acc 1, cost 5.5
    fixed = _one(seed0, selection="fixed")
    assert fixed["method"] == "reinforce" and fixed["anchor"] == "a0.1" and fixed["threshold_source"] == "fixed"
    _check(fixed, .5, 1.0, 5.5, -.2, .6)
    # msp at most 5.5 MFLOPs on test: points of cost 5, 3, 1 have 3, 4, 3 correct -> .6, acc .8, cost 3
    m = _one(seed0, selection="matched_cost", method="msp", threshold_source="test")
    assert m["anchor"] == "reinforce a0.1" and m["target_mflops"] == pytest.approx(5.5)
    _check(m, .6, .8, 3, 0, .8)
    # appealnet at most 5.5: costs 5.5, 3.5, 1.5 with 5, 5, 4 correct -> the cheaper of the 5s: .2
    _check(_one(seed0, selection="matched_cost", method="appealnet", threshold_source="test"), .2, 1.0, 3.5, -.2, .8)
    # val: the fixed threshold costs (4 * 1.5 + 11.5)/5 = 3.5 on cal (keeps .9, .8, .5, .6);
    # msp on cal at most 3.5: .4 (3 correct, cost 3) and .2 (3 correct, cost 1) -> .2, all kept on test
    mv = _one(seed0, selection="matched_cost", method="msp", threshold_source="val")
    assert mv["target_mflops"] == pytest.approx(3.5)
    _check(mv, .2, .6, 1, .2, 1)

    # seed 1: msp right everywhere -> every target keeps all at .1; appealnet (one tie at .9):
    # above .9: 5 correct, cost 11.5 | .9: 4 correct, cost 1.5
    seed1 = [r for r in rows if r["seed"] == 1]
    for source in ("test", "val"):
        _check(_one(seed1, mode="white_box", method="msp", threshold_source=source, target_ad=0.0), .1, 1, 1, 0, 1)
        a = _one(seed1, mode="white_box", method="appealnet", threshold_source=source, target_ad=0.0)
        assert a["threshold"] > 0.9 and a["cost_mflops"] == pytest.approx(11.5) and a["skipping_rate"] == 0
        _check(_one(seed1, mode="white_box", method="appealnet", threshold_source=source, target_ad=0.2),
               .9, .8, 1.5, .2, 1)
    assert all(r["feasible"] for r in rows)


def test_budget_operating_points_known_answers():
    # seed 0 test, budget .25 of the big network's 10 MFLOPs = 2.5:
    #   msp: only "keep all" (cost 1, acc .6) fits; appealnet: 3.5 does not fit, 1.5 (acc .8) does
    # seed 0 cal, msp: costs 11, 7, 5, 3, 1 -> only .2 fits, on test: keep all, acc .6
    rows = operating_points(_samples(), [MSP_W, APPEAL], {"white_box": []}, budgets=[0.25])
    assert len(rows) == 2 * 2 * 2  # seeds x methods x sources
    seed0 = [r for r in rows if r["seed"] == 0]
    m = _one(seed0, method="msp", threshold_source="test")
    assert m["selection"] == "budget" and m["budget_fraction"] == 0.25 and m["target_mflops"] == pytest.approx(2.5)
    _check(m, .3, .6, 1, .2, 1)
    _check(_one(seed0, method="msp", threshold_source="val"), .2, .6, 1, .2, 1)
    a = _one(seed0, method="appealnet", threshold_source="test")
    assert a["threshold"] == pytest.approx(0.1) and a["cost_mflops"] == pytest.approx(1.5)
    # a budget below every point (0.01 * 10 = 0.1 < c0 = 1): the cheapest point, flagged
    tight = operating_points(_samples(), [MSP_W], {"white_box": []}, budgets=[0.01])
    assert all(not r["feasible"] and r["cost_mflops"] == pytest.approx(1.0) for r in tight)


def test_aggregate_known_answers():
    points = aggregate(operating_points(_samples(), [MSP_W, MSP_B, APPEAL, FIXED], TARGETS))
    msp = _one(points, mode="white_box", method="msp", selection="target_ad", threshold_source="test", target_ad=0.0)
    # seed 0: threshold .6, acc .8, cost 3, skipping .8, exits [.8, .2]
    # seed 1: threshold .1, acc 1,  cost 1, skipping 1,  exits [1, 0]
    # means .35, .9, 2, .9, [.9, .1]; std (ddof = 1) of two values = |a - b| / sqrt(2)
    assert msp["threshold"] == pytest.approx(0.35) and msp["threshold_std"] == pytest.approx(0.5 / math.sqrt(2))
    assert msp["system_accuracy"] == pytest.approx(0.9)
    assert msp["system_accuracy_std"] == pytest.approx(0.2 / math.sqrt(2))
    assert msp["cost_mflops"] == pytest.approx(2.0) and msp["cost_mflops_std"] == pytest.approx(2 / math.sqrt(2))
    assert msp["relative_cost"] == pytest.approx(0.2)
    assert msp["ad"] == pytest.approx(0.0, abs=1e-12) and msp["ad_std"] == pytest.approx(0.0, abs=1e-12)
    assert msp["skipping_rate"] == pytest.approx(0.9) and msp["appeal_rate"] == pytest.approx(0.1)
    assert msp["exit_fractions"] == pytest.approx([0.9, 0.1])
    assert msp["target_mflops"] is None and "target_mflops_std" not in msp  # no budget for a target point
    assert msp["variants"] == ["", ""] and msp["feasible"]
    # appealnet, target 0, test: costs 1.5 (seed 0) and 11.5 (seed 1): mean 6.5, std 10 / sqrt(2)
    app = _one(points, mode="white_box", method="appealnet", selection="target_ad", threshold_source="test",
               target_ad=0.0)
    assert app["cost_mflops"] == pytest.approx(6.5) and app["cost_mflops_std"] == pytest.approx(10 / math.sqrt(2))
    # black-box: no cost in either seed -> None, and no std
    bb = _one(points, mode="black_box", method="msp", selection="target_ad", threshold_source="test", target_ad=0.2)
    assert bb["cost_mflops"] is None and "cost_mflops_std" not in bb
    # seed 0 appeal .2, seed 1 0 (everything right, all kept): .1
    assert bb["appeal_rate"] == pytest.approx(0.1)
    # one seed: the same row back, no *_std
    single = aggregate([r for r in operating_points(_samples(), [MSP_W], TARGETS) if r["seed"] == 0])
    assert all(not any(k.endswith("_std") for k in r) for r in single)
    assert _one(single, threshold_source="test", target_ad=0.0)["cost_mflops"] == pytest.approx(3.0)


def test_comparisons_known_answers():
    points = aggregate(operating_points(_samples(), [MSP_W, MSP_B, APPEAL, FIXED], TARGETS))
    comp = comparisons(points, trained=["appealnet", "reinforce"], post_hoc=["msp"])
    # white-box only (no trained black-box method): 2 trained x 3 sources x 2 targets
    assert len(comp) == 12 and {c["mode"] for c in comp} == {"white_box"}

    def ratio(method, source, target):
        c = _one(comp, method=method, threshold_source=source, target_ad=target)
        assert c["best_post_hoc"] == "msp" and c["field"] == "cost_mflops"
        return c["ratio"], c["targets_met"]

    # test, AD 0: msp mean cost 2, appealnet 6.5 -> 2 / 6.5; both AD 0
    assert ratio("appealnet", "test", 0.0) == (pytest.approx(2 / 6.5), True)
    # test, AD .2: msp (1 + 1)/2 = 1; appealnet (1.5 + 1.5)/2 = 1.5 -> 1 / 1.5; mean AD .1 each
    assert ratio("appealnet", "test", 0.2) == (pytest.approx(1 / 1.5), True)
    # val, AD 0: msp (5 + 1)/2 = 3 with mean AD (.2 + 0)/2 = .1 > 0 (missed on test);
    # appealnet (5.5 + 11.5)/2 = 8.5 -> 3 / 8.5, target not met
    assert ratio("appealnet", "val", 0.0) == (pytest.approx(3 / 8.5), False)
    # val, AD .2: msp (1 + 1)/2 = 1; appealnet (5.5 + 1.5)/2 = 3.5 -> 1 / 3.5
    assert ratio("appealnet", "val", 0.2) == (pytest.approx(1 / 3.5), True)
    # reinforce reads appealnet's columns: the same numbers
    assert ratio("reinforce", "val", 0.0) == (pytest.approx(3 / 8.5), False)
    # guaranteed: both fall back to every input on the big network: msp 11, appealnet 11.5
    assert ratio("appealnet", "guaranteed", 0.2) == (pytest.approx(11 / 11.5), True)


def test_comparisons_edge_cases_by_hand():
    def p(mode, method, value, ad=0.0):
        field = "cost_mflops" if mode == "white_box" else "appeal_rate"
        other = "appeal_rate" if field == "cost_mflops" else "cost_mflops"
        return {"mode": mode, "method": method, "selection": "target_ad", "threshold_source": "test",
                "target_ad": 0.01, field: value, other: None, "ad": ad}

    comp = comparisons(
        [p("black_box", "rl", 0.2), p("black_box", "msp", 0.3), p("black_box", "gap", 0.25, ad=0.02),
         p("white_box", "rl", 0.0), p("white_box", "msp", 0.0),
         p("white_box", "rl2", 0.0), p("white_box", "gap", None)],
        trained=["rl", "rl2"], post_hoc=["msp", "gap"])
    by = {(c["mode"], c["method"]): c for c in comp}
    # black-box judged on the appeal rate: the best post-hoc is gap (.25 < .3) -> .25 / .2 = 1.25,
    # but gap's AD .02 misses the .01 target
    bb = by[("black_box", "rl")]
    assert bb["field"] == "appeal_rate" and bb["best_post_hoc"] == "gap"
    assert bb["ratio"] == pytest.approx(1.25) and bb["targets_met"] is False
    # both zero: ratio 1 (a tie); gap's cost unknown is skipped, msp is the rival
    assert by[("white_box", "rl")]["ratio"] == 1.0 and by[("white_box", "rl")]["best_post_hoc"] == "msp"
    assert by[("white_box", "rl2")]["ratio"] == 1.0
    # the trained method's value 0 against a positive rival: no finite ratio
    comp = comparisons([p("white_box", "rl", 0.0), p("white_box", "msp", 2.0)], ["rl"], ["msp"])
    assert comp[0]["ratio"] is None
    # no rival at all: no row
    assert comparisons([p("white_box", "rl", 1.0)], ["rl"], ["msp"]) == []


# ---------------------------------------------------------------- cost


def test_measure_cost_counts_macs():
    # Linear 10 -> 5: 50 MACs + Linear 5 -> 2: 10 MACs = 60 MACs; params 55 + 12 = 67
    net = nn.Sequential(nn.Linear(10, 5), nn.ReLU(), nn.Linear(5, 2))
    c = measure_cost(net, (10,))
    assert c.mflops == pytest.approx(60e-6)
    assert c.params == 67


def test_measure_cost_conv():
    # Conv 1 -> 2 channels, 3x3, padding 1 on 4x4: 4*4 outputs * 2 channels * 9 = 288 MACs
    c = measure_cost(nn.Conv2d(1, 2, 3, padding=1, bias=False), (1, 4, 4))
    assert c.mflops == pytest.approx(288e-6)


def test_logit_stats():
    # logits [2, 0, 0]: margin 2; log-odds of the MSP = -log(e^-2 + e^-2) = 2 - ln 2 = 1.306853
    from cascade.nn.confidence import logit_stats

    out = logit_stats(torch.tensor([[0.0, 2.0, 0.0]]))
    assert out.tolist()[0] == pytest.approx([2.0, 1.306853], abs=1e-6)
    # a float32 softmax saturates (both MSPs round to 1.0) but the log-odds still differ
    z = torch.tensor([[40.0, 0.0, 0.0], [30.0, 0.0, 0.0]])
    assert z.softmax(-1)[:, 0].tolist() == [1.0, 1.0]
    lo = logit_stats(z)[:, 1]
    assert lo[0] > lo[1] and lo[1].item() == pytest.approx(30 - math.log(2), abs=1e-4)
