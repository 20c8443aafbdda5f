"""K-stage cascades and the REINFORCE stopping policy: known answers worked out by hand,
the policy learning the known-right rule on a toy, sweeps against brute force."""

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from cascade import CascadeError, ConfigError, CrossEntropyTaskLoss, FeatureNet, StageOutput, Trainer, load_config
from cascade.experiment import make_loader
from cascade.multistage import (
    CascadeOutput,
    MultiStageCascade,
    ReinforceObjective,
    StoppingPolicy,
    stage_costs,
    trajectory,
)
from cascade.multistage_eval import (
    cascade_point,
    cascade_sweep,
    cumulative_costs,
    exit_stages,
    select_by_accuracy,
    select_by_cost,
)
from cascade.registry import METHODS
from cascade.roles import BlackBoxOracle
from tests.conftest import REPO

LN2, LN43 = math.log(2.0), math.log(4.0 / 3.0)


# ----------------------------------------------------------------------------- REINFORCE


def test_trajectory_known_answer():
    p = torch.tensor([[0.2, 0.5], [0.9, 0.3], [0.4, 0.7]])
    a = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 0.0]])
    tau, logp = trajectory(p, a)
    # row 0: continue (1 - 0.2), then stop (0.5): tau 1, log 0.8 + log 0.5
    # row 1: stop at once (0.9); the second decision is never taken: tau 0, log 0.9
    # row 2: continue twice: tau 2 (the last stage), log 0.6 + log 0.3
    assert tau.tolist() == [1, 0, 2]
    expected = [math.log(0.8) + math.log(0.5), math.log(0.9), math.log(0.6) + math.log(0.3)]
    assert logp.tolist() == pytest.approx(expected, abs=1e-6)


class _FixedCascade(nn.Module):
    """Stands in for a MultiStageCascade: fixed stage logits and stop probabilities."""

    oracle = None

    def __init__(self, logits: list[torch.Tensor], p_stop: torch.Tensor):
        super().__init__()
        self.logits, self.p = logits, p_stop

    def forward(self, x):
        return CascadeOutput(stages=[StageOutput(output=l) for l in self.logits], p_stop=self.p)


def _hand_cascade() -> _FixedCascade:
    ln3 = math.log(3.0)
    logits = [
        torch.tensor([[0.0, 0.0], [0.0, 0.0]]),  # CE: ln 2, ln 2
        torch.tensor([[ln3, 0.0], [0.0, 0.0]]),  # p(y=0) = 3/4 -> CE ln(4/3); ln 2
        torch.tensor([[ln3, 0.0], [0.0, ln3]]),  # ln(4/3), ln(4/3)
    ]
    # row 0 stops at stage 0 surely; row 1 continues twice (P(stop) 0 -> clamped to 1e-6)
    return _FixedCascade(logits, torch.tensor([[1.0, 0.5], [0.0, 0.0]]))


def test_reinforce_objective_known_answer():
    torch.manual_seed(0)
    y = torch.tensor([0, 1])
    obj = ReinforceObjective(CrossEntropyTaskLoss(), [1.0, 4.0, 16.0], alpha=0.5, reward="loss", baseline="batch_mean")
    out = obj(_hand_cascade(), (torch.zeros(2, 1), y))
    # cumulative costs 1, 5, 21; over c_K = 16: 0.0625, 0.3125, 1.3125
    # R0 = -ln 2 - 0.5 * 0.0625 = -0.724397 (stops at stage 0)
    # R1 = -ln(4/3) - 0.5 * 1.3125 = -0.943932 (stops at stage 2)
    assert out["reward"].item() == pytest.approx((-LN2 - 0.03125 - LN43 - 0.65625) / 2, abs=1e-5)
    # the stage where each input stopped: (ln 2 + ln 4/3) / 2 = 0.490415
    assert out["stop_loss"].item() == pytest.approx((LN2 + LN43) / 2, abs=1e-5)
    # every stage on every input: ln 2 + (ln 4/3 + ln 2) / 2 + ln 4/3 = 1.471244
    assert out["aux_loss"].item() == pytest.approx(LN2 + (LN43 + LN2) / 2 + LN43, abs=1e-5)
    assert [out[f"exit_{k}"].item() for k in range(3)] == [0.5, 0.0, 0.5]
    # the actions are (almost surely) certain: log pi ~ -1e-6, so the surrogate is ~0
    assert abs(out["policy_loss"].item()) < 1e-4
    assert out["loss"].item() == pytest.approx(out["stop_loss"].item() + out["aux_loss"].item(), abs=1e-4)


def test_self_critical_baseline_is_the_greedy_reward():
    torch.manual_seed(0)
    obj = ReinforceObjective(CrossEntropyTaskLoss(), [1.0, 4.0, 16.0], alpha=0.5, reward="error",
                             baseline="self_critical")
    task = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])  # 0-1 errors per stage
    tau = torch.tensor([0, 2])
    p = torch.tensor([[0.9, 0.5], [0.2, 0.7]])
    # greedy (P >= 0.5): row 0 stops at 0 -> -1 - 0.5 * 0.0625 = -1.03125;
    # row 1 continues, then stops at 1 -> -1 - 0.5 * 0.3125 = -1.15625
    assert obj._baseline(obj._reward(task, tau), p, task).tolist() == pytest.approx([-1.03125, -1.15625])


def test_leave_one_out_baselines_known_answer():
    crit, costs = CrossEntropyTaskLoss(), [1.0, 2.0]
    r = torch.tensor([[-1.0], [-2.0], [-3.0]])  # [M = 3 trajectories, B = 1 input]
    # sample_mean: the mean of the input's other trajectories: (-2 - 3) / 2, (-1 - 3) / 2, (-1 - 2) / 2
    per_input = ReinforceObjective(crit, costs, 0.1, baseline="sample_mean", samples=3)
    assert per_input._baseline(r, None, None).flatten().tolist() == [-2.5, -2.0, -1.5]
    # batch_mean: the same over every (trajectory, input) pair of the batch
    per_batch = ReinforceObjective(crit, costs, 0.1, baseline="batch_mean")
    assert per_batch._baseline(r.T, None, None).flatten().tolist() == [-2.5, -2.0, -1.5]
    with pytest.raises(CascadeError, match="samples >= 2"):
        ReinforceObjective(crit, costs, 0.1, baseline="sample_mean", samples=1)


class _RightWhenEasy(nn.Module):
    """A fixed classifier over x = (easy, label): confident and right on easy inputs,
    unsure and wrong on hard ones (what a real first stage looks like)."""

    def __init__(self, easy_margin: float, hard_margin: float):
        super().__init__()
        self.easy_margin, self.hard_margin = easy_margin, hard_margin
        self.feature_dim = 2

    def forward(self, x):
        easy, y = x[:, 0:1] > 0.5, x[:, 1].long()
        sign = nn.functional.one_hot(y, 2).float() * 2 - 1  # +1 on the label, -1 elsewhere
        logits = torch.where(easy, self.easy_margin * sign, -self.hard_margin * sign)
        return StageOutput(output=logits, features=x)


@pytest.mark.parametrize("baseline,samples", [("batch_mean", 1), ("self_critical", 1), ("moving_average", 1),
                                              ("sample_mean", 4)])
def test_reinforce_learns_to_stop_where_the_first_stage_is_right(baseline, samples):
    """Two stages: stage 0 (cost 0.1) is right exactly on the easy half, stage 1 (cost 1) always.

    With alpha = 0.5 the right policy is known: on easy inputs stopping earns about
    -0.0003 - 0.5 * 0.1 = -0.05 against -0.5 * 1.1 = -0.55 for going on; on hard ones
    stopping earns -CE(margin 0.4) - 0.05 = -0.96 against -0.55. Only the policy trains.
    """
    torch.manual_seed(0)
    n = 512
    easy = (torch.rand(n) < 0.5).float()
    y = torch.randint(0, 2, (n,))
    x = torch.stack([easy, y.float()], dim=1)
    model = MultiStageCascade([_RightWhenEasy(4.0, 0.2), _RightWhenEasy(5.0, -5.0)], StoppingPolicy([2], 2, hidden=[8]))
    obj = ReinforceObjective(CrossEntropyTaskLoss(), [0.1, 1.0], alpha=0.5, baseline=baseline, samples=samples)
    opt = torch.optim.Adam(model.policy.parameters(), lr=0.02)
    Trainer(model, obj, opt, make_loader(TensorDataset(x, y), 64, True, 0), epochs=8).train()
    with torch.no_grad():
        p = model(x).p_stop[:, 0]
        right = model.stages[0](x).output.argmax(-1) == y
    assert bool((right == (easy > 0.5)).all())  # the toy is what it claims
    assert p[right].mean() > 0.95 and p[~right].mean() < 0.05
    _, exits = model.route(x)
    assert bool((exits == torch.where(right, 0, 1)).all())


def test_gradients_reach_every_parameter_and_a_detached_state_stops_them():
    torch.manual_seed(0)
    model = MultiStageCascade([_mlp(4, 8), _mlp(4, 16)], StoppingPolicy([8], 3, hidden=[4], detach=True))
    obj = ReinforceObjective(CrossEntropyTaskLoss(), [1.0, 2.0], alpha=0.1)
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    obj(model, (x, y))["loss"].backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, name
    # the policy's own gradient does not reach the stage through a detached state, and does without
    for detach in (True, False):
        policy = StoppingPolicy([8], 3, hidden=[4], detach=detach)
        logits = torch.randn(5, 3, requires_grad=True)
        policy(0, StageOutput(output=logits, features=torch.randn(5, 8))).sum().backward()
        assert (logits.grad is None) == detach


# ----------------------------------------------------------------------------- model and costs


def _mlp(in_dim: int, width: int, classes: int = 3) -> FeatureNet:
    features = nn.Sequential(nn.Flatten(), nn.Linear(in_dim, width), nn.ReLU())
    return FeatureNet(features, nn.Linear(width, classes), width)


def test_stage_costs_by_hand():
    stages = [_mlp(4, 3, 2), _mlp(4, 8, 2), _mlp(4, 16, 2)]
    policy = StoppingPolicy([3, 8], 2, inputs=("sorted_log_probs", "confidence"), hidden=[4])
    # stage k: Linear(4, w) + Linear(w, 2) = 4w + 2w MACs -> 18, 48, 96
    # policy head: state = 2 sorted log-probs + 3 confidence stats = 5 -> Linear(5, 4) + Linear(4, 1) = 24
    # (softmax, sort and the sigmoid are not multiply-accumulates and are not counted)
    assert stage_costs(MultiStageCascade(stages, policy), (4,)) == pytest.approx([42e-6, 72e-6, 96e-6])
    policy3 = StoppingPolicy([3, 8, 16], 2, hidden=[4])
    oracle = BlackBoxOracle(cost_mflops=1.0)
    assert stage_costs(MultiStageCascade(stages, policy3, oracle), (4,)) == pytest.approx([42e-6, 72e-6, 120e-6, 1.0])


def test_cost_accounting_three_stages_by_hand():
    costs = [1.0, 4.0, 16.0]
    assert cumulative_costs(costs).tolist() == [1.0, 5.0, 21.0]  # every stage run is paid
    scores = np.array([[0.9, 0.1], [0.2, 0.8], [0.1, 0.3], [0.5, 0.9]])
    correct = np.array([[1, 0, 1], [0, 1, 1], [0, 0, 0], [0, 1, 1]], dtype=bool)
    # at t = 0.5: x0 stops at 0 (0.9), x1 at 1 (0.8), x2 runs to 2, x3 stops at 0 (0.5 >= 0.5)
    assert exit_stages(scores, 0.5).tolist() == [0, 1, 2, 0]
    p = cascade_point(0.5, scores, correct, costs)
    assert p.cost_mflops == pytest.approx((1 + 5 + 21 + 1) / 4)  # 7.0
    assert p.system_accuracy == pytest.approx(0.5)  # x0 right at 0, x1 right at 1, x2 and x3 wrong
    assert p.exit_fractions == pytest.approx([0.5, 0.25, 0.25])


def test_cascade_sweep_known_answer_and_selection():
    costs = [1.0, 4.0, 16.0]
    scores = np.array([[0.9, 0.1], [0.2, 0.8], [0.1, 0.3], [0.5, 0.9]])
    correct = np.array([[1, 0, 1], [0, 1, 1], [0, 0, 0], [0, 1, 1]], dtype=bool)
    sw = cascade_sweep(scores, correct, costs)
    # t above 0.9: all run to stage 2 (21 each, 3 right); 0.9: x0 -> 0, x3 -> 1 (1, 21, 21, 5);
    # 0.8: x1 -> 1 (1, 5, 21, 5); 0.5: x3 -> 0 (1, 5, 21, 1), x3 now wrong;
    # 0.3: x2 -> 1 (1, 5, 5, 1); 0.2: x1 -> 0 (1, 1, 5, 1), x1 now wrong; 0.1: all at 0
    assert sw.threshold[1:].tolist() == [0.9, 0.8, 0.5, 0.3, 0.2, 0.1]
    assert sw.threshold[0] > 0.9
    assert sw.cost_mflops.tolist() == pytest.approx([21, 12, 8, 7, 3, 2, 1])
    assert sw.system_accuracy.tolist() == pytest.approx([0.75, 0.75, 0.75, 0.5, 0.5, 0.25, 0.25])
    assert sw.exit_counts[3].tolist() == [2, 1, 1]
    # budget 8: 75 % at cost 8 (t = 0.8); budget 7.9: 50 % ties at costs 7 and 3 -> the cheaper, t = 0.3
    assert select_by_cost([sw], 8.0).threshold == 0.8
    assert select_by_cost([sw], 7.9).threshold == 0.3
    assert not select_by_cost([sw], 0.5).feasible
    # at least 3 right: the cheapest is cost 8 (t = 0.8)
    assert select_by_accuracy([sw], 3).threshold == 0.8


def test_exit_fractions_sum_to_one_and_sweep_matches_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(60):
        n, k = int(rng.integers(1, 25)), int(rng.integers(2, 5))
        scores = rng.integers(0, 5, size=(n, k - 1)) / 4.0  # ties on purpose
        correct = rng.random((n, k)) < 0.6
        costs = rng.random(k) + 0.1
        sw = cascade_sweep(scores, correct, costs)
        assert (sw.exit_counts.sum(axis=1) == n).all()
        for t, acc, cost, counts in zip(sw.threshold, sw.system_accuracy, sw.cost_mflops, sw.exit_counts):
            p = cascade_point(t, scores, correct, costs)
            assert sum(p.exit_fractions) == pytest.approx(1.0)
            # brute force, independent of the event sweep: loop over inputs and stages
            exits = [next((j for j in range(k - 1) if scores[i, j] >= t), k - 1) for i in range(n)]
            assert acc == pytest.approx(np.mean([correct[i, e] for i, e in enumerate(exits)]))
            assert cost == pytest.approx(np.mean([costs[: e + 1].sum() for e in exits]))
            assert counts.tolist() == np.bincount(exits, minlength=k).tolist()


@pytest.mark.parametrize("with_oracle", [False, True])
def test_routed_inference_matches_the_full_forward(with_oracle):
    torch.manual_seed(0)
    stages = [_mlp(6, 4), _mlp(6, 8), _mlp(6, 12)]
    deciding = [4, 8, 12] if with_oracle else [4, 8]
    model = MultiStageCascade(stages, StoppingPolicy(deciding, 3, hidden=[4], shared=False),
                              BlackBoxOracle(1.0) if with_oracle else None)
    x = torch.randn(200, 6)
    with torch.no_grad():
        full = model(x)
    t = float(full.p_stop[:, 0].median())  # an untrained policy sits near 0.5: split the inputs at the median
    output, exits = model.route(x, threshold=t)
    expected = exit_stages(full.p_stop.numpy(), t)
    assert exits.tolist() == expected.tolist()
    assert len(set(expected.tolist())) > 1  # the check means something: inputs leave at different stages
    for i, e in enumerate(expected):
        if e < len(stages):
            assert torch.allclose(output[i], full.stages[e].output[i], atol=1e-6)
        else:  # the black-box oracle answers; not ours to compute
            assert torch.isnan(output[i]).all()


def test_shared_policy_reads_the_stage_index():
    torch.manual_seed(0)
    policy = StoppingPolicy([4, 8], 3, hidden=[4], shared=True)
    out = StageOutput(output=torch.randn(5, 3), features=None)
    assert len(policy.heads) == 1
    assert not torch.allclose(policy(0, out), policy(1, out))  # same output, different stage


def test_policy_and_cascade_reject_bad_shapes():
    with pytest.raises(CascadeError, match="features"):
        StoppingPolicy([4, 8], 3, inputs=("features",), shared=True)
    with pytest.raises(CascadeError, match="regression"):
        StoppingPolicy([4], 3, inputs=("sorted_probs",), classification=False)
    with pytest.raises(CascadeError, match="at least 2 stages"):
        MultiStageCascade([_mlp(4, 4)])
    with pytest.raises(CascadeError, match="decides after 2 stages"):
        MultiStageCascade([_mlp(4, 4), _mlp(4, 8)], StoppingPolicy([4, 8], 3))


def test_reinforce_is_a_registered_method():
    assert "reinforce" in METHODS.names()
    score = METHODS.get("reinforce")().score(StageOutput(output=torch.zeros(3, 2), q=torch.tensor([0.1, 0.5, 0.9])))
    assert score.tolist() == pytest.approx([0.1, 0.5, 0.9])
    with pytest.raises(CascadeError, match="cascade"):
        METHODS.get("reinforce")().score(StageOutput(output=torch.zeros(3, 2)))


# ----------------------------------------------------------------------------- config


def _config(tmp_path, extra: str):
    base = (REPO / "configs" / "digits_cascade.yaml").read_text()
    p = tmp_path / "c.yaml"
    p.write_text(base + extra)
    return p


def test_cascade_config_errors_are_reported_with_key_paths(tmp_path):
    text = (REPO / "configs" / "digits_cascade.yaml").read_text()
    text = text.replace("- {name: cnn, channels: [8, 16], hidden: 32}", "- {name: cnn, chanels: [8, 16]}")
    text = text.replace("    threshold: 0.5", "    threshold: 0.5\n    treshold: 0.4")
    text = text.replace("seeds: [0, 1, 2]", "seeds: [0]\nlittle: {name: mlp}")
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(p)
    msg = str(info.value)
    # pydantic errors come first and stop the registry checks, so check them in two passes
    assert "cascade.reinforce.treshold: unknown key (did you mean 'threshold'?)" in msg
    p.write_text(text.replace("\n    treshold: 0.4", ""))
    with pytest.raises(ConfigError) as info:
        load_config(p)
    msg = str(info.value)
    assert "cascade.stages.1.chanels: unknown key (did you mean 'channels'?)" in msg
    assert "little: not used with cascade:" in msg


def test_cascade_needs_two_stages(tmp_path):
    p = tmp_path / "one.yaml"
    p.write_text("task: {name: digits}\ncascade:\n  stages: [{name: mlp}]\n")
    with pytest.raises(ConfigError, match="at least 2 stages"):
        load_config(p)
    # one network and a black-box oracle is a 2-stage cascade (AppealNet's black-box case)
    p.write_text("task: {name: digits}\ncascade:\n  stages: [{name: mlp}]\n  oracle: black_box\n  oracle_mflops: 1.0\n")
    assert load_config(p).cascade.oracle == "black_box"
    p.write_text("task: {name: digits}\ncascade:\n  stages: [{name: mlp}]\n  oracle: black_box\n")
    with pytest.raises(ConfigError, match="oracle_mflops"):
        load_config(p)
    p.write_text("task: {name: digits}\nevaluation: {methods: [msp, reinforce]}\n"
                 "cascade:\n  stages: [{name: mlp}, {name: cnn}]\n")
    with pytest.raises(ConfigError, match="evaluation.methods.1: 'reinforce' is built into"):
        load_config(p)
