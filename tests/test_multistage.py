"""K-stage cascades and the REINFORCE stopping policy: known answers worked out by hand,
the policy learning the known-right rule on a toy, sweeps against brute force, routing
through cascade.Router, and the reinforce method's config."""

import math
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from cascade import (
    Approximator,
    BlackBoxOracle,
    CascadeContext,
    CascadeError,
    ConfigError,
    CrossEntropyTaskLoss,
    FeatureNet,
    MaskedL2TaskLoss,
    MethodKind,
    Mode,
    Router,
    StageOutput,
    Trainer,
    WhiteBoxOracle,
    load_config,
)
from cascade.training.data import make_loader
from cascade.config import OptimConfig
from cascade.evaluation import (
    cascade_point,
    cascade_sweep,
    cumulative_costs,
    exit_stages,
    select_by_accuracy,
    select_by_cost,
)
from cascade.methods import method_class, method_kind
from cascade.methods.reinforce import (
    CascadeOutput,
    MultiStageCascade,
    PolicyStage,
    Reinforce,
    ReinforceObjective,
    StoppingPolicy,
    stage_costs,
    trajectory,
)
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


class _Fixed(Approximator):
    """A stage that answers the same logits whatever the input."""

    feature_dim = 0

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, x):
        return StageOutput(output=self.logits)


class _FixedCascade(nn.Module):
    """Stands in for a MultiStageCascade: fixed routed-stage logits and stop probabilities,
    and an oracle last (the frozen big network answering fixed logits, or a black box)."""

    def __init__(self, logits: list[torch.Tensor], p_stop: torch.Tensor, oracle):
        super().__init__()
        self.logits, self.p, self.oracle = logits, p_stop, oracle

    def forward(self, x):
        return CascadeOutput(stages=[StageOutput(output=l) for l in self.logits], p_stop=self.p)


LN3 = math.log(3.0)
#: per routed stage, two inputs with labels (0, 1)
ROUTED_LOGITS = [
    torch.tensor([[0.0, 0.0], [0.0, 0.0]]),  # CE: ln 2, ln 2
    torch.tensor([[LN3, 0.0], [0.0, 0.0]]),  # p(y=0) = 3/4 -> CE ln(4/3); ln 2
]
BIG_LOGITS = torch.tensor([[LN3, 0.0], [0.0, LN3]])  # ln(4/3), ln(4/3)
# row 0 stops at stage 0 surely; row 1 continues twice (P(stop) 0 -> clamped to 1e-6)
P_STOP = torch.tensor([[1.0, 0.5], [0.0, 0.0]])


def _hand_cascade(white_box: bool = True) -> _FixedCascade:
    oracle = WhiteBoxOracle(_Fixed(BIG_LOGITS)) if white_box else BlackBoxOracle(16.0)
    return _FixedCascade(ROUTED_LOGITS, P_STOP, oracle)


def test_reinforce_objective_known_answer():
    torch.manual_seed(0)
    y = torch.tensor([0, 1])
    obj = ReinforceObjective(CrossEntropyTaskLoss(), [1.0, 4.0, 16.0], alpha=0.5, reward="loss", baseline="batch_mean")
    out = obj(_hand_cascade(), (torch.zeros(2, 1), y))
    # cumulative costs 1, 5, 21; over c_K = 16: 0.0625, 0.3125, 1.3125
    # R0 = -ln 2 - 0.5 * 0.0625 = -0.724397 (stops at stage 0)
    # R1 = -ln(4/3) - 0.5 * 1.3125 = -0.943932 (stops at stage 2, the white-box oracle)
    assert out["reward"].item() == pytest.approx((-LN2 - 0.03125 - LN43 - 0.65625) / 2, abs=1e-5)
    # the stage where each input stopped: (ln 2 + ln 4/3) / 2 = 0.490415
    assert out["stop_loss"].item() == pytest.approx((LN2 + LN43) / 2, abs=1e-5)
    # every *routed* stage on every input (the frozen oracle is not trained): ln 2 + (ln 4/3 + ln 2) / 2
    assert out["aux_loss"].item() == pytest.approx(LN2 + (LN43 + LN2) / 2, abs=1e-5)
    assert [out[f"exit_{k}"].item() for k in range(3)] == [0.5, 0.0, 0.5]
    # the actions are (almost surely) certain: log pi ~ -1e-6, so the surrogate is ~0
    assert abs(out["policy_loss"].item()) < 1e-4
    assert out["loss"].item() == pytest.approx(out["stop_loss"].item() + out["aux_loss"].item(), abs=1e-4)


def test_reinforce_objective_with_a_black_box_oracle_known_answer():
    """The black-box oracle answers the truth: its loss is 0, only its cost counts."""
    torch.manual_seed(0)
    y = torch.tensor([0, 1])
    obj = ReinforceObjective(CrossEntropyTaskLoss(), [1.0, 4.0, 16.0], alpha=0.5, reward="loss", baseline="batch_mean")
    out = obj(_hand_cascade(white_box=False), (torch.zeros(2, 1), y))
    # R0 = -ln 2 - 0.03125 as before; R1 = -0 - 0.5 * 1.3125 = -0.65625
    assert out["reward"].item() == pytest.approx((-LN2 - 0.03125 - 0.65625) / 2, abs=1e-5)
    assert out["stop_loss"].item() == pytest.approx(LN2 / 2, abs=1e-5)
    assert out["aux_loss"].item() == pytest.approx(LN2 + (LN43 + LN2) / 2, abs=1e-5)
    # the 0-1 error in the reward: row 0's stage 0 answers argmax(0, 0) = class 0, its label:
    # R0 = -0 - 0.03125; row 1 reaches the oracle, right by definition: R1 = -0 - 0.65625
    err = ReinforceObjective(CrossEntropyTaskLoss(), [1.0, 4.0, 16.0], alpha=0.5, reward="error")
    assert err(_hand_cascade(white_box=False), (torch.zeros(2, 1), y))["reward"].item() == pytest.approx(
        (-0.03125 - 0.65625) / 2, abs=1e-5)


def test_objective_and_cascade_must_agree_on_the_stages():
    y = torch.tensor([0, 1])
    two_costs = ReinforceObjective(CrossEntropyTaskLoss(), [1.0, 4.0], alpha=0.5)
    with pytest.raises(CascadeError, match="2 stage costs, the cascade 3 stages"):
        two_costs(_hand_cascade(), (torch.zeros(2, 1), y))
    with pytest.raises(CascadeError, match="positive last one"):
        ReinforceObjective(CrossEntropyTaskLoss(), [1.0, 0.0], alpha=0.5)
    with pytest.raises(CascadeError, match="positive last one"):
        ReinforceObjective(CrossEntropyTaskLoss(), [1.0], alpha=0.5)


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
    # moving_average: the first batch's mean, then 0.9 * b + 0.1 * the new mean
    moving = ReinforceObjective(crit, costs, 0.1, baseline="moving_average", momentum=0.9)
    assert moving._baseline(r.T, None, None).flatten().tolist() == [-2.0] * 3
    assert moving._baseline(r.T + 1, None, None).flatten().tolist() == pytest.approx([-2.0] * 3)
    assert moving.running_baseline == pytest.approx(0.9 * -2.0 + 0.1 * -1.0)  # -1.9, the next batch's b
    with pytest.raises(CascadeError, match="samples >= 2"):
        ReinforceObjective(crit, costs, 0.1, baseline="sample_mean", samples=1)


class _RightWhenEasy(Approximator):
    """A fixed classifier over x = (easy, label): confident and right on easy inputs,
    unsure and wrong on hard ones (what a real first stage looks like)."""

    feature_dim = 2

    def __init__(self, easy_margin: float, hard_margin: float):
        super().__init__()
        self.easy_margin, self.hard_margin = easy_margin, hard_margin

    def forward(self, x):
        easy, y = x[:, 0:1] > 0.5, x[:, 1].long()
        sign = nn.functional.one_hot(y, 2).float() * 2 - 1  # +1 on the label, -1 elsewhere
        logits = torch.where(easy, self.easy_margin * sign, -self.hard_margin * sign)
        return StageOutput(output=logits, features=x)


@pytest.mark.parametrize("baseline,samples", [("batch_mean", 1), ("self_critical", 1), ("moving_average", 1),
                                              ("sample_mean", 4)])
def test_reinforce_learns_to_stop_where_the_first_stage_is_right(baseline, samples):
    """Two stages: stage 0 (cost 0.1) is right exactly on the easy half, the white-box
    oracle (the frozen big network, cost 1) always.

    With alpha = 0.5 the right policy is known: on easy inputs stopping earns about
    -0.0003 - 0.5 * 0.1 = -0.05 against -0.5 * 1.1 = -0.55 for going on; on hard ones
    stopping earns -CE(margin 0.4) - 0.05 = -0.96 against -0.55. Only the policy trains.
    Deployed through cascade.Router at the greedy threshold 0.5, each input then leaves
    where it should.
    """
    torch.manual_seed(0)
    n = 512
    easy = (torch.rand(n) < 0.5).float()
    y = torch.randint(0, 2, (n,))
    x = torch.stack([easy, y.float()], dim=1)
    big = _RightWhenEasy(5.0, -5.0)  # right on every input
    model = MultiStageCascade([_RightWhenEasy(4.0, 0.2)], StoppingPolicy([2], 2, hidden=[8]), WhiteBoxOracle(big))
    assert model.num_stages == 2
    obj = ReinforceObjective(CrossEntropyTaskLoss(), [0.1, 1.0], alpha=0.5, baseline=baseline, samples=samples)
    opt = torch.optim.Adam(model.policy.parameters(), lr=0.02)
    Trainer(model, obj, opt, make_loader(TensorDataset(x, y), 64, True, 0), epochs=8).train()
    with torch.no_grad():
        p = model(x).p_stop[:, 0]
        right = model.stages[0](x).output.argmax(-1) == y
    assert bool((right == (easy > 0.5)).all())  # the toy is what it claims
    assert bool((big(x).output.argmax(-1) == y).all())
    assert p[right].mean() > 0.95 and p[~right].mean() < 0.05
    router = Router([PolicyStage(model.stages[0], model.policy, 0)], threshold=0.5, big=big)
    routed = router(x)
    assert routed.exit_stage.tolist() == torch.where(right, 0, 1).tolist()
    assert routed.kept.tolist() == right.tolist() and routed.appeal_rate == pytest.approx(1 - right.float().mean())
    assert bool((routed.output.argmax(-1) == y).all())  # every input answered right, by one stage or the other


def test_gradients_reach_every_parameter_and_a_detached_state_stops_them():
    torch.manual_seed(0)
    big = _mlp(4, 32)
    model = MultiStageCascade([_mlp(4, 8), _mlp(4, 16)], StoppingPolicy([8, 16], 3, hidden=[4], detach=True),
                              WhiteBoxOracle(big))
    obj = ReinforceObjective(CrossEntropyTaskLoss(), [1.0, 2.0, 4.0], alpha=0.1)
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    obj(model, (x, y))["loss"].backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, name
    # the oracle is frozen and not part of the trained model
    assert all(p.grad is None and not p.requires_grad for p in big.parameters())
    assert not any(p is q for p in model.parameters() for q in big.parameters())
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
    # the white-box oracle (the third network) has no head: its declared cost, 96 MACs
    oracle = WhiteBoxOracle(stages[2], cost_mflops=96e-6)
    assert stage_costs(MultiStageCascade(stages[:2], policy, oracle), (4,)) == pytest.approx([42e-6, 72e-6, 96e-6])
    # three routed stages and a black-box oracle of 1 MFLOP: the third gets a head too (96 + 24)
    policy3 = StoppingPolicy([3, 8, 16], 2, hidden=[4])
    model = MultiStageCascade(stages, policy3, BlackBoxOracle(cost_mflops=1.0))
    assert model.num_stages == 4
    assert stage_costs(model, (4,)) == pytest.approx([42e-6, 72e-6, 120e-6, 1.0])
    with pytest.raises(CascadeError, match="oracle_mflops"):
        stage_costs(MultiStageCascade(stages, policy3, BlackBoxOracle(None)), (4,))


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


@pytest.mark.parametrize("mode", ["white_box", "black_box"])
def test_router_matches_the_full_forward(mode):
    """cascade.Router over a cascade's PolicyStages, each stage seeing only the rows still
    travelling, gives the exits and answers of running every stage on every input."""
    torch.manual_seed(0)
    if mode == "white_box":  # two routed stages, then the big network
        stages, big = [_mlp(6, 4), _mlp(6, 8)], _mlp(6, 12)
        oracle = WhiteBoxOracle(big)
    else:  # three routed stages, then a black-box oracle
        stages, big = [_mlp(6, 4), _mlp(6, 8), _mlp(6, 12)], None
        oracle = BlackBoxOracle(1.0)
    model = MultiStageCascade(stages, StoppingPolicy([s.feature_dim for s in stages], 3, hidden=[4], shared=False),
                              oracle)
    x = torch.randn(200, 6)
    with torch.no_grad():
        # centre each untrained head on P(stop) = 0.5 (its last bias minus the midpoint of
        # its two middle logits, between two inputs): at t = 0.5 about half the inputs
        # that reach a stage stop there
        for k, head in enumerate(model.policy.heads):
            z = torch.logit(model.policy(k, model.stages[k](x)).double()).sort().values
            head.net[-1].bias -= float(z[len(z) // 2 - 1: len(z) // 2 + 1].mean())
        full = model(x)
    t = 0.5
    router = Router([PolicyStage(s, model.policy, k) for k, s in enumerate(model.stages)], threshold=t, big=big)
    routed = router(x)
    expected = exit_stages(full.p_stop.numpy(), t)
    assert routed.num_stages == model.num_stages == len(stages) + 1
    assert routed.exit_stage.tolist() == expected.tolist()
    # the check means something: inputs leave at every stage
    assert set(expected.tolist()) == set(range(len(stages) + 1))
    assert routed.appeal_rate == pytest.approx(np.mean(expected == len(stages)))
    for i, e in enumerate(expected):
        if e < len(stages):
            assert torch.allclose(routed.output[i], full.stages[e].output[i], atol=1e-6)
        elif big is not None:
            assert torch.allclose(routed.output[i], big(x[i:i + 1]).output[0], atol=1e-6)
        else:  # the black-box oracle answers; not ours to compute
            assert torch.isnan(routed.output[i]).all()


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
    with pytest.raises(CascadeError, match="at least one routed stage"):
        MultiStageCascade([], StoppingPolicy([], 3), BlackBoxOracle(1.0))
    with pytest.raises(CascadeError, match="decides after 2 stages, the cascade needs 1"):
        MultiStageCascade([_mlp(4, 4)], StoppingPolicy([4, 8], 3), BlackBoxOracle(1.0))


# ----------------------------------------------------------------------------- the method


def _context(pretrained, kind: str = "classification") -> CascadeContext:
    crit = CrossEntropyTaskLoss() if kind == "classification" else MaskedL2TaskLoss()
    task = SimpleNamespace(num_outputs=3, input_shape=(4,), criterion=crit)
    return CascadeContext(task=task, mode=Mode.BLACK_BOX, pretrained=pretrained, plain=pretrained,
                          oracle=BlackBoxOracle(1.0), stage_mflops=[], data=None, finetune=OptimConfig(),
                          device=torch.device("cpu"), fit=None, with_oracle_outputs=None)


def test_reinforce_is_a_registered_trained_method_with_one_cascade_per_alpha():
    cls = method_class("reinforce")
    assert cls is Reinforce and method_kind(cls) == MethodKind.TRAINED
    torch.manual_seed(0)
    pretrained = [_mlp(4, 8), _mlp(4, 16)]
    ctx = _context(pretrained)
    systems = cls(cls.Options.model_validate({"alphas": [0.02, 0.05], "policy": {"hidden": [4]}})).build(ctx)
    assert [s.variant for s in systems] == ["a0.02", "a0.05"]
    assert [s.info for s in systems] == [{"alpha": 0.02}, {"alpha": 0.05}]
    assert all(s.fixed_threshold == 0.5 for s in systems)  # the greedy policy
    x = torch.randn(5, 4)
    for s in systems:
        assert isinstance(s.model, MultiStageCascade) and s.model.oracle is ctx.oracle and len(s.stages) == 2
        # each routed stage answers with q = P(stop), the cascade's own decisions
        with torch.no_grad():
            q = torch.stack([stage(x).q for stage in s.stages], dim=1)
            assert torch.allclose(q, s.model(x).p_stop) and ((q > 0) & (q < 1)).all()
        # trained on copies: the pre-trained stages are left as they are
        assert not any(p is r for p in s.model.parameters() for net in pretrained for r in net.parameters())
        # stage k with its head, by hand: default policy inputs for classification are the
        # 3 sorted log-probs and 3 confidence stats -> Linear(6, 4) + Linear(4, 1) = 28 MACs;
        # stages 4*8 + 8*3 = 56 and 4*16 + 16*3 = 112 MACs; then the oracle's 1 MFLOP
        assert stage_costs(s.model, (4,)) == pytest.approx([84e-6, 140e-6, 1.0])
    assert not any(p is r for p in systems[0].model.parameters() for r in systems[1].model.parameters())


def test_reinforce_refuses_class_probabilities_on_a_regression_task():
    cls = method_class("reinforce")
    regression = SimpleNamespace(criterion=MaskedL2TaskLoss())
    wrong = cls(cls.Options.model_validate({"policy": {"inputs": ["sorted_probs", "output"]}}))
    (problem,) = wrong.problems(regression)
    assert problem.startswith("policy.inputs: ['sorted_probs'] need class probabilities") and "features" in problem
    assert cls(cls.Options()).problems(regression) == []  # the regression default: features and output
    assert wrong.problems(SimpleNamespace(criterion=CrossEntropyTaskLoss())) == []
    # the default policy of a regression cascade reads features and coordinates, and builds
    systems = cls(cls.Options.model_validate({"alphas": [0.1]})).build(_context([_mlp(4, 8)], "regression"))
    assert systems[0].model.policy.inputs == ("features", "output")


# ----------------------------------------------------------------------------- config


def test_cascade_config_errors_are_reported_with_key_paths(tmp_path):
    text = (REPO / "configs" / "digits_cascade.yaml").read_text()
    text = text.replace("- {name: cnn, channels: [8, 16], hidden: 32}", "- {name: cnn, chanels: [8, 16]}")
    text = text.replace("    threshold: 0.5", "    threshold: 0.5\n    treshold: 0.4")
    text = text.replace("seeds: [0, 1, 2]", "seeds: [0]\nlittle: {name: mlp}")
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(p)
    errors = str(info.value).splitlines()
    # every problem at once, one line each, with its key path
    assert len(errors) == 3
    assert any(e.endswith("methods.0.treshold: unknown key (did you mean 'threshold'?)") for e in errors)
    assert any("stages.1.chanels: unknown key (did you mean 'channels'?)" in e for e in errors)
    assert any("set little: (one stage) or stages: (several), not both" in e for e in errors)


def test_cascade_needs_a_routed_stage_and_a_known_oracle_cost_to_route_several(tmp_path):
    p = tmp_path / "c.yaml"

    def load(text: str):
        p.write_text(text)
        return load_config(p)

    with pytest.raises(ConfigError, match="stages: List should have at least 1 item"):
        load("task: {name: digits}\nstages: []\n")
    # one network and a black-box oracle is a 2-stage cascade (AppealNet's black-box case)
    cfg = load("task: {name: digits}\nmodes: [black_box]\nstages: [{name: mlp}]\noracle_mflops: 1.0\n")
    assert cfg.modes == ["black_box"] and len(cfg.stages) == 1 and cfg.oracle_mflops == 1.0
    # no big network and no oracle cost (the keypoints task): fine for two stages, which
    # rank their points by appeal rate alone; several stages, or budgets, need the cost
    assert load("task: {name: keypoints}\nmodes: [black_box]\nstages: [{name: keypoint_cnn}]\n").oracle_mflops is None
    with pytest.raises(ConfigError, match="oracle_mflops: the black-box oracle's cost is unknown, and routing "
                                          "several stages needs it"):
        load("task: {name: keypoints}\nmodes: [black_box]\nstages: [{name: keypoint_cnn}, {name: keypoint_cnn}]\n")
    assert load("task: {name: keypoints}\nmodes: [black_box]\noracle_mflops: 5.0\n"
                "stages: [{name: keypoint_cnn}, {name: keypoint_cnn}]\n").oracle_mflops == 5.0
    with pytest.raises(ConfigError, match="modes: white_box needs a big network"):
        load("task: {name: keypoints}\nmodes: [white_box]\n")


def test_old_cascade_sections_get_a_one_line_migration_error(tmp_path):
    p = tmp_path / "old.yaml"
    p.write_text("task: {name: digits}\ncascade:\n  stages: [{name: mlp}, {name: cnn}]\n  oracle: black_box\n")
    with pytest.raises(ConfigError) as info:
        load_config(p)
    (line,) = str(info.value).splitlines()
    assert "cascade: a K-stage cascade is stages: [...]" in line and "methods: [{name: reinforce" in line
    p.write_text("task: {name: digits}\nevaluation: {methods: [msp, reinforce]}\n")
    with pytest.raises(ConfigError, match="evaluation.methods: moved to the top-level methods: list"):
        load_config(p)


def test_reinforce_options_are_checked_with_their_key_paths(tmp_path):
    p = tmp_path / "c.yaml"
    cases = {
        "{name: reinforce, baseline: sample_mean}": "methods.0: baseline: sample_mean needs samples >= 2",
        "{name: reinforce, policy: {shared: true, inputs: [features]}}": "methods.0: policy: a shared policy cannot "
                                                                         "read features",
        "{name: reinforce, alphas: []}": "methods.0.alphas: List should have at least 1 item",
        "{name: reinforce, threshold: 1.0}": "methods.0.threshold: Input should be less than 1",
        "{name: reinforce, policy: {hiden: [4]}}": "methods.0.policy.hiden: unknown key (did you mean 'hidden'?)",
    }
    for method, message in cases.items():
        p.write_text(f"task: {{name: digits}}\nmethods: [{method}]\n")
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(p)
    # --set reaches a method's options by index
    cfg = load_config(REPO / "configs" / "digits_cascade.yaml", ["methods.0.alphas=[0.3]"])
    assert cfg.methods[0].options()["alphas"] == [0.3]
