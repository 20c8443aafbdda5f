"""Issue 10: the stronger baselines, the oracle router, the gap closed, AppealNet's direct
targets and the perturbed settings, against values worked by hand."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from baselines.confidence import (
    DoctorScore,
    EnergyScore,
    TemperatureScaledScore,
    squash,
)
from baselines.deferral import DeferralHeadScore
from cascade import (
    AppealNetObjective,
    BlackBoxOracle,
    CrossEntropyTaskLoss,
    MethodContext,
    StageOutput,
    WhiteBoxOracle,
)
from cascade.evaluation import (
    ORACLE,
    Variant,
    gap_closed,
    gap_table,
    operating_points,
    oracle_scores,
)
from cascade.nn.perturb import (
    PerturbConfig,
    ShiftConfig,
    corrupt,
    noisy_labels,
    perturb_splits,
    specialist_rows,
)
from cascade.contracts.task import Preprocessing, Splits
from tests.conftest import REPO, run_quick


def _stage(logits):
    return StageOutput(output=torch.tensor(logits, dtype=torch.float64))


def test_doctor_and_energy_by_hand():
    # logits [ln 3, 0]: p = [.75, .25], sum p^2 = .625; logsumexp = ln 4 = 1.386294
    out = _stage([[math.log(3.0), 0.0]])
    assert DoctorScore().score(out).item() == pytest.approx(0.625)
    e = math.log(4.0)
    assert EnergyScore().score(out).item() == pytest.approx(0.5 * (1 + e / (1 + e)))
    # squash is strictly increasing and does not saturate where a sigmoid would
    x = torch.tensor([-1e6, -1.0, 0.0, 1.0, 40.0, 1e6], dtype=torch.float64)
    s = squash(x)
    assert (s.diff() > 0).all() and s[2] == 0.5 and s[-1] < 1.0


class _Logits(nn.Module):
    """A 'network' that returns its input as logits."""

    def forward(self, x):
        return StageOutput(output=x)


def test_temperature_is_fitted_on_the_calibration_split():
    # labels drawn from softmax(z / 2): the NLL-optimal temperature is near 2
    g = torch.Generator().manual_seed(0)
    z = 3 * torch.randn(8000, 5, generator=g, dtype=torch.float64)
    y = torch.multinomial((z / 2).softmax(-1), 1, generator=g).squeeze(1)
    scorer = TemperatureScaledScore()
    scorer.prepare(_Logits(), MethodContext(task=None, train=None, seed=0, device=torch.device("cpu"), fit=None,
                                            cal=TensorDataset(z, y)))
    assert scorer.temperature == pytest.approx(2.0, rel=0.08)
    # the score is the MSP of the tempered softmax: [ln 3, 0] / 2 -> p = [sqrt3, 1] / (sqrt3 + 1)
    scorer.temperature = 2.0
    assert scorer.score(_stage([[math.log(3.0), 0.0]])).item() == pytest.approx(3**0.5 / (3**0.5 + 1))


class _Task:
    criterion = CrossEntropyTaskLoss()


def test_deferral_head_learns_where_keeping_is_safe_and_cross_fits():
    # two classes; the little network says class 0 always, so it is right on y = 0. The
    # feature x0 tells the classes apart; the big network is right everywhere.
    g = torch.Generator().manual_seed(1)
    n = 400
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.stack([y.float() * 2 - 1 + 0.3 * torch.randn(n, generator=g), torch.randn(n, generator=g)], 1)
    little = _Const()
    big = _Oracle()
    for mode_next in (big, None):  # white-box (big right everywhere) and black-box: same target here
        scorer = DeferralHeadScore()
        scorer.prepare(little, MethodContext(task=_Task(), train=None, seed=0, device=torch.device("cpu"), fit=None,
                                             cal=TensorDataset(x, y), next_stage=mode_next))
        assert scorer.cal_scores.shape == (n,)
        safe = (y == 0).numpy()
        oof = scorer.cal_scores.numpy()
        assert oof[safe].min() > oof[~safe].max() - 0.5  # out-of-fold scores still separate the two
        assert np.mean(oof[safe] > 0.5) > 0.95 and np.mean(oof[~safe] < 0.5) > 0.95
        fresh = scorer.score(little(x[:8]))
        assert ((fresh > 0.5).numpy() == safe[:8]).all()


class _Const(nn.Module):
    """Always class 0, features = x."""

    def forward(self, x):
        logits = torch.zeros(len(x), 2, dtype=x.dtype)
        logits[:, 0] = 1.0
        return StageOutput(output=logits, features=x)


class _Oracle(nn.Module):
    """Right wherever x[:, 0] has the sign of the class (all of this test's inputs, nearly)."""

    def forward(self, x):
        return StageOutput(output=torch.stack([-x[:, 0], x[:, 0]], 1))


def test_deferral_head_with_nothing_to_learn_scores_alike(caplog):
    x = torch.randn(20, 2)
    scorer = DeferralHeadScore()
    scorer.prepare(_Const(), MethodContext(task=_Task(), train=None, seed=0, device=torch.device("cpu"), fit=None,
                                           cal=TensorDataset(x, torch.zeros(20, dtype=torch.long))))
    assert "0 unsafe and 20 safe" in caplog.text
    assert (scorer.cal_scores == 0.5).all() and (scorer.score(_Const()(x)) == 0.5).all()


def test_oracle_scores_by_hand():
    # stage0 right, wrong (big right), wrong (big wrong): safe, unsafe, safe
    correct = np.array([[1, 1], [0, 1], [0, 0]], bool)
    s = oracle_scores(correct, seed=0)
    assert s[0, 0] == 1.0 and s[2, 0] == 1.0 and 0 <= s[1, 0] < 0.5


def test_oracle_router_points_and_gap_closed_by_hand():
    # 10 test inputs; little (cost 1) right on 7, big (cost 10) right on 9. Unsafe (little wrong,
    # big right): 2 inputs. Oracle at AD 0: appeals the 2 -> cost 1 + 0.2 * 10 = 3.0;
    # at AD 0.1 it may keep one of them -> 1 + 0.1 * 10 = 2.0. Black-box: AD is 1 - acc, the
    # oracle appeals the 3 wrong ones at AD 0 (appeal 0.3) and 2 of them at AD 0.1.
    little = np.array([1, 1, 1, 1, 1, 1, 1, 0, 0, 0], bool)
    big = np.array([1, 1, 1, 1, 1, 1, 1, 1, 1, 0], bool)
    frame = pd.DataFrame({"seed": 0, "split": ["cal"] * 10 + ["test"] * 10, "stage0_correct": np.r_[little, little],
                          "big_correct": np.r_[big, big], "stage0_score_msp": np.linspace(0, 1, 20)})
    oracles = [Variant(ORACLE, "white_box", "", (), ("stage0_correct", "big_correct"), (1.0, 10.0)),
               Variant(ORACLE, "black_box", "", (), ("stage0_correct", None), (1.0, None))]
    rows = operating_points(frame, [], {"white_box": [0.0, 0.1], "black_box": [0.0, 0.1]}, oracles=oracles)
    got = {(r["mode"], r["target_ad"]): r for r in rows}
    assert {r["threshold_source"] for r in rows} == {"test"} and {r["method"] for r in rows} == {ORACLE}
    assert got[("white_box", 0.0)]["cost_mflops"] == pytest.approx(3.0)
    assert got[("white_box", 0.1)]["cost_mflops"] == pytest.approx(2.0)
    assert got[("black_box", 0.0)]["appeal_rate"] == pytest.approx(0.3)
    assert got[("black_box", 0.1)]["appeal_rate"] == pytest.approx(0.2)
    # gap closed: baseline 0.18, method 0.16, oracle 0.08 -> 0.02 / 0.10
    assert gap_closed(0.18, 0.16, 0.08) == pytest.approx(0.2)
    assert gap_closed(0.18, 0.20, 0.08) == pytest.approx(-0.2)
    assert gap_closed(0.08, 0.08, 0.08) is None and gap_closed(0.18, 0.1, None) is None


def test_gap_table_against_the_best_post_hoc():
    def p(method, source, cost):
        return {"mode": "white_box", "method": method, "selection": "target_ad", "threshold_source": source,
                "target_ad": 0.01, "cost_mflops": cost}

    points = [p("an", "val", 2.0), p("msp", "val", 3.0), p("doctor", "val", 2.5), p(ORACLE, "test", 1.5)]
    rows = {r["method"]: r for r in gap_table(points, ["msp", "doctor"])}
    assert rows["an"]["best_post_hoc"] == "doctor" and rows["an"]["gap_closed"] == pytest.approx(0.5)  # .5 / 1
    assert rows["doctor"]["gap_closed"] == 0.0 and rows["msp"]["gap_closed"] == pytest.approx(-0.5)
    assert ORACLE not in rows


def _two_samples():
    # little logits [0, 1] (wrong for y=0) and [1, 0] (right); q = [.2, .9]
    little = torch.tensor([[0.0, 1.0], [1.0, 0.0]])

    class M(nn.Module):
        def forward(self, x):
            return StageOutput(output=little, q=torch.tensor([0.2, 0.9]))

    return M(), (torch.zeros(2, 1), torch.tensor([0, 0]))


def test_safe_target_is_binary_cross_entropy():
    # white-box, big right on both: safe = [0 (little wrong, big right), 1]
    # BCE = mean(-ln(1 - .2), -ln .9) = mean(.223144, .105361) = .164252
    # CE of the little = mean(ln(1 + e), ln(1 + e^-1)) = mean(1.313262, .313262) = .813262
    model, batch = _two_samples()
    big = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    obj = AppealNetObjective(CrossEntropyTaskLoss(), WhiteBoxOracle(nn.Identity()), predictor_target="safe")
    out = obj(model, (*batch, big))
    assert out["L_P"].item() == pytest.approx(0.164252, abs=1e-6)
    assert out["loss"].item() == pytest.approx(0.164252 + 0.813262, abs=1e-6)
    # big wrong on the first input too: appealing cannot help, so keeping it is safe
    out = obj(model, (*batch, torch.tensor([[0.0, 1.0], [1.0, 0.0]])))
    assert out["L_P"].item() == pytest.approx(-(math.log(0.2) + math.log(0.9)) / 2, abs=1e-6)
    # black-box: the oracle is right everywhere: the target is the little's own correctness
    out = AppealNetObjective(CrossEntropyTaskLoss(), BlackBoxOracle(), predictor_target="safe")(model, batch)
    assert out["L_P"].item() == pytest.approx(0.164252, abs=1e-6)


def test_loss_gap_target_regresses_the_loss_difference():
    # black-box: L1 = 0, so the target is -L0 = [-1.313262, -.313262]; logits of q are
    # [ln(.2/.8), ln 9] = [-1.386294, 2.197225]; squared errors [.005334, 6.30817]
    model, batch = _two_samples()
    out = AppealNetObjective(CrossEntropyTaskLoss(), BlackBoxOracle(), predictor_target="loss_gap")(model, batch)
    expected = ((-1.386294 + 1.313262) ** 2 + (2.197225 + 0.313262) ** 2) / 2
    assert out["L_P"].item() == pytest.approx(expected, abs=1e-5)


def test_label_noise_and_specialist_rows_by_hand():
    y = torch.arange(10) % 5
    noisy = noisy_labels(y, 0.3, 5, seed=0)
    changed = noisy != y
    assert changed.sum() == 3 and ((noisy >= 0) & (noisy < 5)).all()
    rows = specialist_rows(y, [0, 1], 0.5, seed=0)  # 4 rows of classes 0, 1 and 3 of the other 6
    assert len(rows) == 7 and set(rows.tolist()) >= {0, 1, 5, 6} and (rows.diff() > 0).all()


def test_corruptions_in_pixel_space():
    prep = Preprocessing(raw_max=255.0, mean=(0.5,), std=(0.25,))
    pixels = torch.tensor([0.2, 0.4, 0.6, 0.8]).view(1, 1, 2, 2)
    x = (pixels - 0.5) / 0.25
    # contrast severity 1 (0.4) towards the image mean 0.5: [.38, .46, .54, .62]
    out = corrupt(x, ShiftConfig(corruption="contrast", severity=1), prep, seed=0) * 0.25 + 0.5
    assert torch.allclose(out.flatten(), torch.tensor([0.38, 0.46, 0.54, 0.62]), atol=1e-6)
    big = torch.rand(3, 1, 8, 8)
    for name in ("gaussian_noise", "blur", "jpeg"):
        c = corrupt(big, ShiftConfig(corruption=name, severity=5), Preprocessing(), seed=0)
        assert c.shape == big.shape and not torch.equal(c, big) and c.min() >= 0 and c.max() <= 1
    with pytest.raises(Exception, match=r"perturb.shift: corruptions need image inputs"):
        corrupt(torch.rand(3, 4), ShiftConfig(corruption="blur"), prep, seed=0)


def test_perturb_splits_touches_only_what_it_says():
    x, y = torch.rand(20, 1, 4, 4), torch.arange(20) % 4
    splits = Splits(TensorDataset(x, y), TensorDataset(x, y), TensorDataset(x, y))
    cfg = PerturbConfig(label_noise=0.5, big_classes=[0], big_other_fraction=0.0,
                        shift=ShiftConfig(corruption="contrast"))
    out, big = perturb_splits(splits, cfg, 4, Preprocessing(), seed=0)
    assert (out.train.tensors[1] != y).sum() == 10  # training labels only
    assert torch.equal(out.cal.tensors[1], y) and torch.equal(out.cal.tensors[0], x)
    assert not torch.equal(out.test.tensors[0], x) and torch.equal(out.test.tensors[1], y)
    assert (big.tensors[1] == 0).all()  # the specialist sees class 0 alone (noisy labels included)
    reg = Splits(*(TensorDataset(x, torch.rand(20, 2)) for _ in range(3)))
    for cfg in (PerturbConfig(label_noise=0.1), PerturbConfig(big_classes=[0])):
        with pytest.raises(Exception, match=r"perturb\.(label_noise|big_classes): needs class labels"):
            perturb_splits(reg, cfg, 2, None, seed=0)
    same, same_big = perturb_splits(splits, PerturbConfig(), 4, None, seed=0)
    assert same is splits and same_big is splits.train


def test_a_run_reports_the_oracle_the_gap_and_the_new_baselines(tmp_path):
    out = run_quick(tmp_path, REPO / "configs" / "digits.yaml",
                    "methods=[appealnet, msp, msp_ts, doctor, energy, deferral_head]",
                    "perturb={label_noise: 0.1}", "evaluation.violation_resplits=0")
    metrics = json.loads((out / "metrics.json").read_text())
    oracle = [p for p in metrics["operating_points"] if p["method"] == ORACLE]
    assert {p["mode"] for p in oracle} == {"white_box", "black_box"}
    # nothing routes more cheaply than the oracle router at the same AD target on test
    for p in metrics["operating_points"]:
        if p["selection"] == "target_ad" and p["threshold_source"] == "test" and p["mode"] == "white_box":
            limit = next(o for o in oracle if o["mode"] == "white_box" and o["target_ad"] == p["target_ad"])
            assert p["cost_mflops"] >= limit["cost_mflops"] - 1e-9
    assert all("gap_closed" in c for c in metrics["comparisons"])
    samples = pd.read_csv(out / "samples.csv")
    assert {"stage0_score_deferral_head_white_box", "stage0_score_deferral_head_black_box",
            "stage0_score_msp_ts", "stage0_score_doctor", "stage0_score_energy"} <= set(samples.columns)
    table = (out / "table_full.md").read_text()
    assert "| oracle | limit | test |" in table and "gap closed to the oracle router" in table
    assert "| oracle | limit |" in (out / "table.md").read_text()  # the limit, in the paper comparison
    assert (out / "figures" / "gap_closed.png").is_file() or not metrics["gap_closed"]
