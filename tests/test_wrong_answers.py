"""Known answers that a plausible wrong line would miss: the tie-break of
``select_by_accuracy``, ``threshold_violations`` worked by hand on fixed re-splits, the
AppealNet objective's ``full`` mode and ``error`` target, its gradients by autograd, and a
bundle routing each stage with its own threshold.

Each test here was checked by making the wrong change in the source and seeing it fail
(issue 21); the comment above each test names the change it catches.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import cascade.evaluation.violations as violations
from cascade import AppealNetObjective, BlackBoxOracle, Bundle, CrossEntropyTaskLoss, StageOutput, WhiteBoxOracle
from cascade.evaluation import Variant, cascade_sweep, select_by_accuracy, threshold_violations

# ---------------------------------------------------------------- select_by_accuracy


# catches: the tie on cost broken towards the LESS accurate variant, or towards the first one
def test_select_by_accuracy_breaks_a_cost_tie_towards_more_correct_answers():
    # Two variants, two inputs, costs (1, 10). Both keep both inputs at threshold 0.8
    # (cost 1 each): variant 0 is then right on 1 input, variant 1 on 2.
    scores = np.array([[0.9], [0.8]])
    one_right = np.array([[1, 1], [0, 1]], bool)
    two_right = np.array([[1, 1], [1, 1]], bool)
    sweeps = [cascade_sweep(scores, one_right, (1.0, 10.0)), cascade_sweep(scores, two_right, (1.0, 10.0))]
    sel = select_by_accuracy(sweeps, min_correct=1)  # both points at cost 1 qualify
    assert (sel.variant, sel.threshold, sel.feasible) == (1, 0.8, True)
    # the order of the variants does not matter
    sel = select_by_accuracy(sweeps[::-1], min_correct=1)
    assert (sel.variant, sel.threshold, sel.feasible) == (0, 0.8, True)


# ---------------------------------------------------------------- threshold_violations by hand

#: 2 seeds x 4 rows: (score, little right, big right). Pooled order = cal rows, then test rows.
#: seed 0: A .9 ok, B .8 little wrong (a degradation when kept), C .7 ok, D .6 ok
#: seed 1: E .9 a rescue (little right, big wrong), F .8 degradation, G .85 degradation, H .6 ok
ROWS = {0: [(0.9, 1, 1), (0.8, 0, 1), (0.7, 1, 1), (0.6, 1, 1)],
        1: [(0.9, 1, 0), (0.8, 0, 1), (0.85, 0, 1), (0.6, 1, 1)]}
#: the three fixed re-splits (columns): calibration rows {0, 1}, {2, 3}, {1, 3}
CAL = np.array([[1, 0, 0], [1, 0, 1], [0, 1, 0], [0, 1, 1]], bool)


def _violations_table() -> pd.DataFrame:
    rows = [{"seed": seed, "split": "cal" if i < 2 else "test", "s": s, "c0": bool(c0), "c1": bool(c1)}
            for seed, table in ROWS.items() for i, (s, c0, c1) in enumerate(table)]
    return pd.DataFrame(rows)


# catches: violation_rate and pool_violation_rate swapped; the std, mean_ad or the split
# sizes computed another way
def test_threshold_violations_by_hand_on_fixed_resplits(monkeypatch):
    def fixed(rng, n, n_cal, resplits):
        assert (n, n_cal, resplits) == (4, 2, 3)
        return CAL.copy()

    monkeypatch.setattr(violations, "_resplit_masks", fixed)
    v = Variant("m", "white_box", "", ("s",), ("c0", "c1"), (1.0, 10.0))
    rows = threshold_violations(_violations_table(), [v], {"white_box": [0.0, 0.25]}, delta=0.6, resplits=3)
    got = {(r["target_ad"], r["threshold_source"]): r for r in rows}
    # Worked by hand. n_cal = 2. val: the cheapest calibration point with cal AD <= t. guaranteed:
    # t = 0.25, delta = 0.6: P(Binom(2, .25) <= 0) = .5625 <= .6 certifies 0 losses, 1 loss
    # (.9375) fails; t = 0 certifies nothing (threshold inf: AD 0 everywhere).
    # "above" is the point just above every calibration score (test scores above it stop).
    # seed 0 (val = guaranteed, both targets):
    #   cal {A,B}: .8 degrades -> thr .9; test {C,D} none kept: AD 0; pool (A kept) 0
    #   cal {C,D}: thr .6;  test {A,B} both kept, B wrong: AD .5; pool 1 of 4: .25
    #   cal {B,D}: above .8; test {A,C}: A kept, right: AD 0; pool 0
    # seed 1, val (both targets):
    #   cal {E,F}: E rescues F, cal correct at .8 = 1 = last's: thr .8; test {G,H}: G (.85) kept,
    #     wrong: AD .5; pool: E,F,G kept: 2 right vs last's 3: .25
    #   cal {G,H}: above .85; test {E,F}: E kept (rescue): AD -.5; pool -.25
    #   cal {F,H}: above .8; test {E,G}: both kept, 1 right vs 1: AD 0; pool 3 vs 3: 0
    # seed 1, guaranteed t = .25: F is a loss at .8 -> thr .9; test {G,H} none kept: 0; pool -.25
    #   then above .85: -.5 (pool -.25); above .8: 0 (pool 0)
    # rates (> t): val t=0:    test [1/3, 1/3]  pool [1/3, 1/3]  mean AD mean(1/6, 0) = 1/12
    #              val t=.25:  test [1/3, 1/3]  pool [0, 0]
    #              guar t=.25: test [1/3, 0]    pool [0, 0]      mean AD mean(1/6, -1/6) = 0
    expected = {
        (0.0, "val"): (1 / 3, 1 / 3, 1 / 12, 0.0),
        (0.25, "val"): (1 / 3, 0.0, 1 / 12, 0.0),
        (0.0, "guaranteed"): (0.0, 0.0, 0.0, 0.0),
        (0.25, "guaranteed"): (1 / 6, 0.0, 0.0, math.sqrt(2 * (1 / 6) ** 2)),  # std([1/3, 0], ddof=1)
    }
    assert set(got) == set(expected)
    for key, (rate, pool_rate, mean_ad, std) in expected.items():
        r = got[key]
        assert r["violation_rate"] == pytest.approx(rate, abs=1e-12), key
        assert r["pool_violation_rate"] == pytest.approx(pool_rate, abs=1e-12), key
        assert r["mean_ad"] == pytest.approx(mean_ad, abs=1e-12), key
        assert r["violation_rate_std"] == pytest.approx(std, abs=1e-12), key
        assert (r["seeds"], r["resplits"], r["delta"], r["mode"], r["method"]) == (2, 3, 0.6, "white_box", "m")


# catches: a p-value exactly at the level not certified (p < level for p <= level), one count too many
def test_the_certified_count_includes_a_p_value_exactly_at_the_level():
    from cascade.evaluation.guarantee import _certified_losses

    # Binom(2, .5): P(<= 0) = .25, P(<= 1) = .75 exactly; Binom(4, .5): P(<= 0) = .0625
    assert [_certified_losses(2, 0.5, lv) for lv in (0.2, 0.25, 0.5, 0.75)] == [-1, 0, 0, 1]
    assert _certified_losses(4, 0.5, 0.0625) == 0


# ---------------------------------------------------------------- AppealNet objective


class _Leaf(nn.Module):
    """Returns the given logits and q (leaf tensors, so autograd gives their gradients)."""

    def __init__(self, logits: torch.Tensor, q: torch.Tensor | None = None):
        super().__init__()
        self.logits, self.q = logits, q

    def forward(self, x):
        return StageOutput(output=self.logits, q=self.q)


def _errors_differ():
    # y = [0, 0]. little: [0, 1] wrong (CE ln(1 + e) = 1.3132617), [ln 3, 0] right (CE .2876821)
    # big: [ln 9, 0] right, [0, 1] wrong. So the 0-1 errors are little [1, 0], big [0, 1].
    little = torch.tensor([[0.0, 1.0], [math.log(3.0), 0.0]])
    big = torch.tensor([[math.log(9.0), 0.0], [0.0, 1.0]])
    return _Leaf(little, torch.tensor([0.5, 0.8])), _Leaf(big), (torch.zeros(2, 1), torch.tensor([0, 0]))


# catches: the oracle's correctness read from the little network's output (either path)
def test_appealnet_error_target_weighs_each_sides_own_errors():
    # L_A = mean(.5 * 1 + .5 * 0, .8 * 0 + .2 * 1) = mean(.5, .2) = .35
    #   (with the little's errors on both sides: mean(1, 0) = .5)
    # L_P = mean(-ln .5, -ln .8) = .4581454; loss = .35 + .1 * .4581454 + mean CE of the little
    #   = .35 + .0458145 + mean(1.3132617, .2876821) = .35 + .0458145 + .8004719 = 1.1962864
    model, big, batch = _errors_differ()
    obj = AppealNetObjective(CrossEntropyTaskLoss(), WhiteBoxOracle(big), lam=0.1, predictor_target="error")
    for b in (batch, (*batch, big.logits)):  # the oracle asked, or its outputs carried in the batch
        out = obj(model, b)
        assert out["L_A"].item() == pytest.approx(0.35, abs=1e-6)
        assert out["loss"].item() == pytest.approx(1.1962864, abs=1e-6)


# catches: approximator_loss "full" without its plain loss0.mean() term
def test_appealnet_full_mode_adds_the_plain_mean_loss():
    # the white-box example of test_known_answers: literal objective .4298290 (L_A .3840145);
    # full adds mean CE of the little = mean(ln 2, -ln .75) = mean(.693147, .287682) = .4904146
    little = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    big = _Leaf(torch.tensor([[math.log(9.0), 0.0], [0.0, 0.0]]))
    model, batch = _Leaf(little, torch.tensor([0.5, 0.8])), (torch.zeros(2, 1), torch.tensor([0, 0]))
    out = AppealNetObjective(CrossEntropyTaskLoss(), WhiteBoxOracle(big), lam=0.1, approximator_loss="full")(
        model, batch)
    assert out["L_A"].item() == pytest.approx(0.3840145, abs=1e-6)
    assert out["loss"].item() == pytest.approx(0.4298290 + 0.4904146, abs=1e-6)


def _gradients(approximator_loss: str, predictor_target: str, black_box: bool):
    """Autograd's gradients of the objective wrt the little's logits and q, on 3 inputs,
    and the hand-written ones (METHOD.md Eq. 11/12, N = 3)."""
    torch.manual_seed(0)
    z = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    q = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64, requires_grad=True)
    big_logits = torch.randn(3, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    lam, n = 0.3, 3
    oracle = BlackBoxOracle() if black_box else WhiteBoxOracle(_Leaf(big_logits))
    obj = AppealNetObjective(CrossEntropyTaskLoss(), oracle, lam=lam, approximator_loss=approximator_loss,
                             predictor_target=predictor_target)
    obj(_Leaf(z, q), (torch.zeros(3, 1), y))["loss"].backward()
    with torch.no_grad():
        d_ce = torch.softmax(z, dim=1) - nn.functional.one_hot(y, 4).double()  # dL0/dz per row
        if predictor_target == "error":
            l0 = (z.argmax(1) != y).double()
            l1 = torch.zeros(3, dtype=torch.float64) if black_box else (big_logits.argmax(1) != y).double()
        else:
            l0 = nn.functional.cross_entropy(z, y, reduction="none")
            l1 = (torch.zeros(3, dtype=torch.float64) if black_box
                  else nn.functional.cross_entropy(big_logits, y, reduction="none"))
        plain = approximator_loss == "full" or predictor_target == "error"
        want_z = d_ce / n if plain else q[:, None] * d_ce / n
        want_q = (l0 - l1 - lam / q) / n
    return z.grad, want_z, q.grad, want_q


# catches: "full" leaving l0 attached (the approximator also learns through q * L0), the
# predictor's gradient of the wrong sign or scale, L1 left out of the predictor's gradient
@pytest.mark.parametrize("approximator_loss, predictor_target, black_box", [
    ("weighted", "loss", False), ("weighted", "loss", True), ("full", "loss", False), ("full", "loss", True),
    ("weighted", "error", False)])
def test_appealnet_gradients_match_autograd(approximator_loss, predictor_target, black_box):
    # weighted: dloss/dz_i = q_i dL0_i/dz / N; full (and error): dL0_i/dz / N, the plain mean
    # loss only; always dloss/dq_i = (L0_i - L1_i - lambda / q_i) / N (L1 = 0 black-box)
    gz, want_z, gq, want_q = _gradients(approximator_loss, predictor_target, black_box)
    torch.testing.assert_close(gz, want_z, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gq, want_q, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(want_q, torch.zeros(3, dtype=torch.float64))


# ---------------------------------------------------------------- per-stage bundle thresholds


class _Stage(nn.Module):
    """Stage ``k`` of a toy cascade: its score is input column ``k``, its answer the class ``k``."""

    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def forward(self, x):
        return nn.functional.one_hot(torch.full((len(x),), self.k), 4).float(), x[:, min(self.k, 2)]


def _manifest(thresholds: list[float]) -> dict:
    def stage(k, role, mflops):
        return {"index": k, "role": role, "file": f"stage_{k}.pt2", "sha256": "0" * 64, "mflops": mflops}

    return {
        "format_version": 2, "task": "toy", "kind": "classification",
        "input": {"shape": [3], "dtype": "float32"}, "preprocessing": None,
        "output_names": ["s0", "s1", "s2", "big"],
        "stages": [stage(0, "routed", 1.0), stage(1, "routed", 2.0), stage(2, "routed", 4.0), stage(3, "big", 8.0)],
        "thresholds": thresholds,
        "operating_point": {"method": "msp", "mode": "white_box", "variant": None, "seed": 0, "target_ad": 0.01,
                            "threshold_source": "val", "delta": None, "feasible": True, "expected": {}},
        "run": {"path": "run", "config": None, "config_sha256": "0" * 64},
        "versions": {"cascade": None, "torch": torch.__version__},
    }


# catches: every stage routed with stage 0's threshold (or any stage with another's), and
# "score > threshold" for ">="
def test_a_bundle_routes_each_stage_with_its_own_threshold(tmp_path):
    # thresholds 0.75, 0.5, 0.875 (exact in float32); columns = the scores of stages 0, 1, 2
    x = torch.tensor([[0.75, 0.0, 0.0],    # exactly at stage 0's threshold: stage 0
                      [0.7, 0.5, 0.0],     # exactly at stage 1's (under stage 0's): stage 1
                      [0.6, 0.6, 0.0],     # stage 1 (0.6 < stage 0's 0.75)
                      [0.1, 0.3, 0.8],     # 0.8 < 0.875: the big one (0.8 >= stage 0's 0.75)
                      [0.1, 0.1, 0.875],   # exactly at stage 2's: stage 2
                      [0.1, 0.49, 0.1]])   # big
    b = Bundle(tmp_path, _manifest([0.75, 0.5, 0.875]), [_Stage(0), _Stage(1), _Stage(2)], _Stage(3))
    assert b.thresholds == [0.75, 0.5, 0.875]
    r = b.route(x, preprocessed=True)
    assert r.stage.tolist() == [0, 1, 1, 3, 2, 3]
    assert r.output.argmax(1).tolist() == [0, 1, 1, 3, 2, 3]  # each row answered by its exit stage
    assert r.mflops.tolist() == [1.0, 3.0, 3.0, 15.0, 7.0, 15.0]
    assert r.score.tolist() == pytest.approx([0.75, 0.5, 0.6, 0.8, 0.875, 0.1])  # the last routed score seen
    assert not r.pending.any()


# ---------------------------------------------------------------- MNIST in CI


@pytest.mark.parametrize("ci, outcome", [("true", pytest.fail.Exception), ("", pytest.skip.Exception)])
def test_missing_mnist_fails_in_ci_and_skips_elsewhere(monkeypatch, ci, outcome):
    import tests.conftest as conftest

    monkeypatch.setattr(conftest, "mnist_root", lambda: None)
    monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match="real MNIST not found"):
        conftest.require_mnist()


# ---------------------------------------------------------------- the routing kernels at a threshold


# catches (Bundle.route, run_last=False): pending rows not marked, their answer not the last
# routed stage's, the big network's cost counted where it did not run
def test_a_bundle_without_its_last_stage_leaves_appealed_rows_pending(tmp_path):
    x = torch.tensor([[0.75, 0.0, 0.0], [0.1, 0.3, 0.8], [0.1, 0.1, 0.875]])
    b = Bundle(tmp_path, _manifest([0.75, 0.5, 0.875]), [_Stage(0), _Stage(1), _Stage(2)], _Stage(3))
    r = b.route(x, preprocessed=True, run_last=False)
    assert r.pending.tolist() == [False, True, False] and r.stage.tolist() == [0, 3, 2]
    assert r.output.argmax(1).tolist() == [0, 2, 2]  # the pending row holds stage 2's answer
    assert r.mflops.tolist() == [1.0, 7.0, 7.0]


class _Scored(nn.Module):
    """A routed stage for :class:`cascade.Router`: ``q`` is input column ``k``, the answer the class ``k``."""

    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def forward(self, x):
        return StageOutput(output=nn.functional.one_hot(torch.full((len(x),), self.k), 3).float(), q=x[:, min(self.k, 1)])


# catches (Router.forward): "q > threshold" for ">=", rows that stopped sent on, the big
# network not run on the rows left
def test_router_stops_at_the_first_stage_at_or_over_the_threshold():
    from cascade import Router

    x = torch.tensor([[0.75, 0.0], [0.5, 0.75], [0.5, 0.5], [0.9, 0.9]])
    router = Router([_Scored(0), _Scored(1)], threshold=0.75, big=_Scored(2))
    r = router(x)
    assert r.exit_stage.tolist() == [0, 1, 2, 0]
    assert r.output.argmax(1).tolist() == [0, 1, 2, 0]
    assert r.appeal_rate == pytest.approx(0.25)
    black_box = Router([_Scored(0), _Scored(1)], threshold=0.75)(x)
    assert black_box.exit_stage.tolist() == [0, 1, 2, 0] and torch.isnan(black_box.output[2]).all()
