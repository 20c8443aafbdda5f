"""gain_head (baselines/gain.py): it learns where appealing gains on a constructed specialist
case where MSP cannot, it is cross-fitted, it reduces to the little network's error in
black-box mode, it exports; and the shift option that corrupts the calibration split."""

import json

import numpy as np
import pandas as pd
import pytest
import sklearn.neural_network
import torch
from torch import nn
from torch.utils.data import TensorDataset

from baselines.confidence import MaxSoftmaxScore
from baselines.gain import GainHeadOptions, GainHeadScore, keep_score
from cascade import (
    Bundle,
    CascadeError,
    ConfigError,
    CrossEntropyTaskLoss,
    MethodContext,
    StageOutput,
    load_config,
)
from cascade.cli import main
from cascade.contracts.task import Preprocessing, Splits
from cascade.deploy.export import _GraphStage
from cascade.deploy.router import ScoredStage
from cascade.evaluation import exit_stages
from cascade.nn.perturb import PerturbConfig, ShiftConfig, perturb_splits
from tasks.digits import DigitsTask
from tests.conftest import REPO, run_quick


class _Task:
    criterion = CrossEntropyTaskLoss()


class _Little(nn.Module):
    """Its logits are the input's first 4 columns; no features."""

    def forward(self, x):
        return StageOutput(output=x[:, :4])


class _Big(nn.Module):
    """Answers the class in the input's 5th column (one-hot logits)."""

    def forward(self, x):
        return StageOutput(output=10.0 * nn.functional.one_hot(x[:, 4].long(), 4).to(x.dtype))


def _specialist(n: int, seed: int):
    """4 classes; the little network is right on 80 % of the inputs of every class, with the
    same confidence (MSP uniform in [0.4, 0.95], independent of being right); when wrong it
    says the other class of the pair (0<->1, 2<->3). The big network is right on classes 0-1
    and wrong (the pair's other class) on 2-3. So appealing gains 1 - 0.8 = +0.2 on classes
    0-1 and 0 - 0.8 = -0.8 on 2-3, and the predicted class tells the pairs apart."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    right = torch.rand(n, generator=g) < 0.8
    pred = torch.where(right, y, y ^ 1)
    msp = 0.4 + 0.55 * torch.rand(n, generator=g, dtype=torch.float64)
    probs = ((1 - msp) / 3)[:, None].expand(n, 4).clone()
    probs[torch.arange(n), pred] = msp
    big_pred = torch.where(y < 2, y, y ^ 1)
    x = torch.cat([probs.log(), big_pred[:, None].double()], dim=1)
    return x, y


def _context(x, y, next_stage, seed=0):
    return MethodContext(task=_Task(), train=None, seed=seed, device=torch.device("cpu"), fit=None,
                         cal=TensorDataset(x, y), next_stage=next_stage)


def _auc(low, high) -> float:
    """P(a score of ``high`` > one of ``low``), ties half."""
    low, high = np.asarray(low)[:, None], np.asarray(high)[None, :]
    return float((high > low).mean() + 0.5 * (high == low).mean())


def test_specialist_gain_head_appeals_where_the_big_network_is_right_and_msp_cannot_tell():
    x, y = _specialist(3000, seed=0)
    scorer = GainHeadScore()
    scorer.prepare(_Little(), _context(x, y, _Big()))
    # the targets: +1 where only the big network is right, -1 where only the little one is
    little_right = (x[:, :4].argmax(1) == y).numpy()
    big_right = (y < 2).numpy()
    assert np.array_equal(scorer.cal_gain, big_right.astype(float) - little_right)
    xt, yt = _specialist(2000, seed=1)
    strong = (yt < 2).numpy()  # where the big network is right
    gain = scorer.gain(_Little()(xt)).numpy()
    assert abs(gain[strong].mean() - 0.2) < 0.05 and abs(gain[~strong].mean() + 0.8) < 0.05
    keep = scorer.score(_Little()(xt)).numpy()
    assert keep[strong].max() < keep[~strong].min()  # every input of 0-1 appeals before any of 2-3
    oof = scorer.cal_scores.numpy()  # the out-of-fold calibration scores too
    assert oof[y.numpy() < 2].max() < oof[y.numpy() >= 2].min()
    msp = MaxSoftmaxScore().score(_Little()(xt)).numpy()
    assert abs(_auc(msp[strong], msp[~strong]) - 0.5) < 0.05  # MSP: the two groups look alike


def test_every_calibration_input_is_scored_by_a_regressor_that_did_not_see_it(monkeypatch):
    fitted, predicted = [], []

    class Spy(sklearn.neural_network.MLPRegressor):
        def fit(self, X, y):
            fitted.append({tuple(r) for r in X})
            self.seen = fitted[-1]
            return super().fit(X, y)

        def predict(self, X):
            predicted.append((self.seen, [tuple(r) for r in X]))
            return super().predict(X)

    monkeypatch.setattr(sklearn.neural_network, "MLPRegressor", Spy)
    x, y = _specialist(300, seed=2)
    scorer = GainHeadScore(GainHeadOptions(folds=4, max_iter=20))
    scorer.prepare(_Little(), _context(x, y, _Big()))
    assert len(fitted) == 4 and all(len(f) == 225 for f in fitted)
    rows = [r for seen, batch in predicted for r in batch]
    assert len(rows) == len(set(rows)) == 300  # each calibration input scored once...
    assert all(not (set(batch) & seen) for seen, batch in predicted)  # ...by a regressor that did not see it
    assert scorer.w1.shape[0] == 4  # a new input gets the mean of the 4 folds' regressors


def test_black_box_reduces_to_the_little_networks_error():
    # no next stage: the oracle is always right, so the target is 1 - little right. The
    # little network is right on 95 % of classes 0-1 and on 60 % of 2-3.
    g = torch.Generator().manual_seed(3)
    n = 3000
    y = torch.randint(0, 4, (n,), generator=g)
    right = torch.rand(n, generator=g) < torch.where(y < 2, 0.95, 0.6)
    pred = torch.where(right, y, y ^ 1)
    x = torch.cat([5.0 * nn.functional.one_hot(pred, 4).double(), torch.zeros(n, 1, dtype=torch.float64)], 1)
    scorer = GainHeadScore()
    scorer.prepare(_Little(), _context(x, y, None))
    assert np.array_equal(scorer.cal_gain, 1.0 - right.numpy())
    gain = scorer.gain(_Little()(x)).numpy()
    easy = (pred < 2).numpy()  # the predicted pair is the true one: error 5 % vs 40 %
    assert abs(gain[easy].mean() - 0.05) < 0.04 and abs(gain[~easy].mean() - 0.4) < 0.04


def test_nothing_to_learn_scores_alike_and_the_keep_score_by_hand(caplog):
    x, y = _specialist(50, seed=4)
    y = x[:, :4].argmax(1)  # the little network always right, black-box: gain 0 everywhere
    scorer = GainHeadScore()
    scorer.prepare(_Little(), _context(x, y, None))
    assert "nothing to learn" in caplog.text
    assert (scorer.cal_scores == 0.5).all() and (scorer.score(_Little()(x)) == 0.5).all()
    # (1 - gain) / 2, clipped: +1 -> 0 (appeal first), -1 -> 1, 0.2 -> 0.4, beyond: clipped
    got = keep_score(torch.tensor([1.0, -1.0, 0.2, 3.0, -3.0], dtype=torch.float64))
    assert torch.allclose(got, torch.tensor([0.0, 1.0, 0.4, 0.0, 1.0], dtype=torch.float64))


def test_it_exports_with_its_stage():
    x, y = _specialist(400, seed=5)
    scorer = GainHeadScore(GainHeadOptions(max_iter=50))
    scorer.prepare(_Little(), _context(x, y, _Big()))
    stage = _GraphStage(ScoredStage(_Little(), scorer))
    dim = torch.export.Dim("batch", min=1, max=1 << 20)
    program = torch.export.export(stage, (x[:8],), dynamic_shapes=({0: dim},))
    out, score = program.module()(x[8:40])
    assert torch.allclose(score, scorer.score(_Little()(x[8:40]))) and out.shape == (32, 4)


def _config(tmp_path, method: str):
    p = tmp_path / "c.yaml"
    p.write_text(f"task: {{name: digits}}\nmethods: [{method}]\n")
    return p


@pytest.mark.parametrize("method, error", [
    ("{name: gain_head, inputs: [logits]}", "methods.0.inputs.0: Input should be 'probs', 'features'"),
    ("{name: gain_head, inputs: [probs, probs]}", "methods.0.inputs: lists an input twice"),
    ("{name: gain_head, inputs: []}", "methods.0.inputs: List should have at least 1 item"),
    ("{name: gain_head, folds: 1}", "methods.0.folds: Input should be greater than or equal to 2"),
    ("{name: gain_head, hiden: 8}", "methods.0.hiden: unknown key (did you mean 'hidden'?)"),
])
def test_bad_options_are_one_line_errors(tmp_path, method, error):
    with pytest.raises(ConfigError) as info:
        load_config(_config(tmp_path, method))
    assert len(info.value.errors) == 1 and info.value.errors[0].startswith(error), info.value.errors
    assert "\n" not in info.value.errors[0]


def test_features_asked_of_a_stage_without_them_is_one_line():
    x, y = _specialist(40, seed=6)
    with pytest.raises(CascadeError, match=r"^gain_head: inputs lists 'features', but the stage exposes none"):
        GainHeadScore(GainHeadOptions(inputs=["probs", "features"])).prepare(_Little(), _context(x, y, _Big()))


def test_shift_corrupts_the_calibration_split_only_when_asked():
    x, y = torch.rand(20, 1, 4, 4), torch.arange(20) % 4
    splits = Splits(TensorDataset(x, y), TensorDataset(x, y), TensorDataset(x, y))
    default, _ = perturb_splits(splits, PerturbConfig(shift=ShiftConfig(corruption="gaussian_noise")), 4,
                                Preprocessing(), seed=0)
    assert ShiftConfig(corruption="blur").splits == ["test"]
    assert torch.equal(default.cal.tensors[0], x) and not torch.equal(default.test.tensors[0], x)
    asked = PerturbConfig(shift=ShiftConfig(corruption="gaussian_noise", splits=["cal", "test"]))
    both, _ = perturb_splits(splits, asked, 4, Preprocessing(), seed=0)
    assert not torch.equal(both.cal.tensors[0], x) and torch.equal(both.cal.tensors[1], y)
    assert torch.equal(both.test.tensors[0], default.test.tensors[0])  # the test split as before
    assert not torch.equal(both.cal.tensors[0], both.test.tensors[0])  # its own noise, not the test split's
    assert torch.equal(both.train.tensors[0], x)
    for bad in (["cal"], ["test", "test"]):
        with pytest.raises(ValueError, match=r"must be \[test\] or \[cal, test\]"):
            ShiftConfig(corruption="blur", splits=bad)


@pytest.mark.slow
def test_a_runs_gain_head_exports_to_a_bundle_that_reproduces_its_decisions(tmp_path):
    # a quick digits run, then `cascade export` refits gain_head on the seed's calibration
    # split, as the run did: the bundle's scores and exits are the run's
    run = run_quick(tmp_path, REPO / "configs" / "digits.yaml", "methods=[msp, gain_head]", "modes=[white_box]",
                    "evaluation.violation_resplits=0")
    assert main(["export", str(run), "--out", str(tmp_path / "b"), "--method", "gain_head", "--mode", "white_box",
                 "--target-ad", "0.01", "--source", "val", "--no-onnx"]) == 0
    bundle = Bundle.load(tmp_path / "b")
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    seed = manifest["operating_point"]["seed"]
    test = DigitsTask().build_splits(seed).test
    routed = bundle.route((test.tensors[0] * 16).round().to(torch.uint8).numpy())
    s = pd.read_csv(run / "samples.csv")
    rows = s[(s["seed"] == seed) & (s["split"] == "test")].reset_index(drop=True)
    score = rows["stage0_score_gain_head_white_box"].to_numpy()
    np.testing.assert_allclose(routed.score.numpy(), score, rtol=0, atol=1e-6)
    assert (routed.stage.numpy() == exit_stages(score[:, None], manifest["thresholds"][0])).all()
