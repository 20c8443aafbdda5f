"""Known answers worked out by hand: baseline scores, AppealNet losses, lambda updates,
operating-point selection with tied scores, and network cost."""

import math

import numpy as np
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
    apply_threshold,
    measure_cost,
    select_threshold,
    sweep,
)

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


def test_sweep_respects_ties():
    sw = sweep(SCORE, LITTLE, BIG)
    assert sw.kept.tolist() == [0, 2, 3, 6, 7, 8, 9, 10]
    assert sw.system_correct.tolist() == [9, 9, 9, 8, 7, 7, 6, 6]
    assert sw.threshold[1:].tolist() == [0.9, 0.8, 0.7, 0.5, 0.4, 0.3, 0.2]
    assert sw.threshold[0] > 0.9  # keeps nothing


@pytest.mark.parametrize(
    "target, threshold, sr, acc, cost",
    [
        # AD <= 0: most kept is k = 3 (threshold 0.8); cost = c0 + AR c1 = 1 + 0.7 * 10 = 8
        (0.0, 0.8, 0.3, 0.9, 8.0),
        # AD <= 0.1: k = 6 at 0.7; cost 1 + 0.4 * 10 = 5
        (0.1, 0.7, 0.6, 0.8, 5.0),
        # AD <= 0.25: k = 8 at 0.4 (k = 9 has AD 0.3); cost 1 + 0.2 * 10 = 3
        (0.25, 0.4, 0.8, 0.7, 3.0),
        # AD <= 0.3: everything kept; cost 1
        (0.3, 0.2, 1.0, 0.6, 1.0),
    ],
)
def test_select_and_apply_threshold(target, threshold, sr, acc, cost):
    sw = sweep(SCORE, LITTLE, BIG)
    thr = select_threshold(sw, target)
    assert thr == pytest.approx(threshold)
    op = apply_threshold(thr, SCORE, LITTLE, BIG, little_mflops=1.0, big_mflops=10.0)
    assert op.skipping_rate == pytest.approx(sr)
    assert op.appeal_rate == pytest.approx(1 - sr)
    assert op.system_accuracy == pytest.approx(acc)
    assert op.ad == pytest.approx(0.9 - acc)
    assert op.ad <= target + 1e-12
    assert op.cost_mflops == pytest.approx(cost)


def test_black_box_ad_is_one_minus_accuracy():
    # oracle always right: keeping the top 3 (all little-correct) gives AD 0;
    # at 0.7 six are kept, one wrong -> accuracy 0.9, AD 0.1
    ones = np.ones(10, bool)
    sw = sweep(SCORE, LITTLE, ones)
    assert select_threshold(sw, 0.0) == pytest.approx(0.8)
    op = apply_threshold(0.7, SCORE, LITTLE, ones, 1.0, None)
    assert op.ad == pytest.approx(0.1) and op.cost_mflops is None


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
    from cascade.confidence import logit_stats

    out = logit_stats(torch.tensor([[0.0, 2.0, 0.0]]))
    assert out.tolist()[0] == pytest.approx([2.0, 1.306853], abs=1e-6)
    # a float32 softmax saturates (both MSPs round to 1.0) but the log-odds still differ
    z = torch.tensor([[40.0, 0.0, 0.0], [30.0, 0.0, 0.0]])
    assert z.softmax(-1)[:, 0].tolist() == [1.0, 1.0]
    lo = logit_stats(z)[:, 1]
    assert lo[0] > lo[1] and lo[1].item() == pytest.approx(30 - math.log(2), abs=1e-4)
