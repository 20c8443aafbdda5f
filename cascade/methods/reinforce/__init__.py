"""K-stage cascades with a stopping policy trained by REINFORCE (Guan et al., IJCAI 2018).

METHOD.md section 2. An input enters stage 0; after stage ``k`` a stopping policy
``pi(stop | s_k)`` decides whether the cascade answers with stage ``k`` or pays for stage
``k + 1``; the last stage always answers. Stopping at ``tau`` costs
``c_0 + ... + c_tau``. The reward of one input is

    R = -L(f_tau(x), y) - alpha * (c_0 + ... + c_tau) / c_{K-1}

and the policy is trained by REINFORCE, ``grad = E[(R - b) * sum_{k <= tau} grad log
pi(a_k | s_k)]``, jointly with the stage networks (:class:`ReinforceObjective`, run by the
shared :class:`~cascade.training.trainer.Trainer` like every other objective). With K = 2 this is
AppealNet's setting with a policy in place of the predictor head: one code path serves
both.

The choices METHOD.md leaves *open*, and what this module does:

- **Policy shape**: one small head per stage (default) or one head shared by all stages
  that also reads a one-hot stage index (``shared=True``). Per stage is the default
  because the same softmax confidence means different things at a weak and a strong
  stage; the heads cost a few hundred MACs, nothing next to a stage. Each head is an
  AppealNet :class:`~cascade.nn.networks.PredictorHead` (MLP, sigmoid output) reading the
  stage's sorted log-probabilities and its confidence statistics (MSP, top-2 gap,
  normalized negative entropy) by default: whether stopping pays hinges on 0.99 against
  0.999, which log space separates and linear probabilities hardly do. For regression,
  its output (and optionally its features), since there are no label probabilities.
- **State gradient**: the policy's inputs are detached (``detach=True``) so the policy
  cannot reshape the stage networks' outputs to make routing easier at the expense of
  their answers; the full score-function gradient through the state is available with
  ``detach=False``.
- **Baseline** ``b``: ``batch_mean`` is the leave-one-out mean of the other inputs'
  rewards in the batch, ``b_i = (sum_j R_j - R_i) / (B - 1)``: unbiased (it does not
  depend on the input's own action) and it adapts at once when the policy or the networks
  change; ``moving_average`` is an exponential average of past batch means;
  ``self_critical`` (Rennie et al. 2017) is the reward the *greedy* policy
  (``P(stop) >= 0.5``) would get on the same input. Every stage runs on every training
  input anyway, so it costs nothing; it depends on the input but not on the sampled
  actions (unbiased), removes the input-to-input spread of the loss from the advantage,
  and pushes exactly the greedy decisions used at test time; ``sample_mean`` (REINFORCE
  leave-one-out, Kool et al. 2019) samples ``samples`` trajectories per input and uses
  the mean reward of the input's *other* trajectories: unbiased, per input, and free
  here because the stages have already run on the whole batch. Our configs use
  ``sample_mean`` with 8 trajectories.
- **Exploration**: an entropy bonus on the decisions taken (``entropy_weight``; our
  configs 0.02). Without it, on digits, each trained policy collapsed to one decision for
  every input (all stop at stage 1, say): the common case saturates ``P(stop)`` within a
  few hundred steps, and the rare inputs where continuing pays stop being sampled.
- **Reward loss**: the task loss (cross-entropy / squared L2), as METHOD.md writes it
  (the default), or the 0-1 error (``reward="error"``), the quantity accuracy is judged
  on. Our configs use the error: with cross-entropy, on digits, a few inputs with large
  losses dominate the cost term and the policy's shared bias drove ``P(stop)`` at stage
  0 to zero for every input, confident or not (measured with the stages frozen and no
  entropy bonus); the bounded 0-1 reward does not do that.
- **Keeping every stage trained**: each network stage gets the gradient of its loss on
  the inputs that stopped there (the method) plus ``aux_weight`` times its plain mean
  loss on every input, so a stage that the policy rarely reaches does not starve and
  its answers stay good when a different threshold sends more inputs to it.
- **Cost in the reward**: the measured MACs of each stage plus its policy head, and the
  black-box oracle's declared cost when the last stage is an oracle.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Annotated, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, model_validator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cascade.nn.cost import measure_cost
from cascade.core.errors import CascadeError
from cascade.methods import CascadeContext, RoutedSystem, TrainedMethod
from cascade.nn.networks import CLASSIFICATION_INPUTS, HEAD_INPUTS, HeadInput, PredictorHead, head_input, head_input_width
from cascade.nn.objectives import Batch, Objective
from cascade.core.registry import METHODS
from cascade.contracts.roles import MethodOptions, Oracle, StageOutput, Task, TaskKind, TaskLoss


@dataclass
class CascadeOutput:
    """Every network stage's output for a batch, and the policy's stop probabilities.

    Attributes:
        stages: one :class:`StageOutput` per network stage, cheapest first; ``q`` holds
            ``P(stop)`` at the stages followed by a decision (None at the last one).
        p_stop: ``[B, K - 1]``, ``P(stop | s_k)`` after each stage but the last (K counts
            the black-box oracle when there is one); None without a policy.
    """

    stages: list[StageOutput]
    p_stop: Tensor | None


#: what a stopping policy may read from its stage (the AppealNet head's inputs)
POLICY_INPUTS = HEAD_INPUTS
#: what the policy reads when the config does not say
DEFAULT_POLICY_INPUTS = {TaskKind.CLASSIFICATION: ["sorted_log_probs", "confidence"],
                         TaskKind.REGRESSION: ["features", "output"]}


class StoppingPolicy(nn.Module):
    """``pi(stop | s_k)`` for each decision point ``k = 0 .. K-2``, in (0, 1).

    Higher means stop (answer with this stage), the Predictor convention. The state
    ``s_k`` is built from the stage's output (and features) by :meth:`state`; each head
    is an AppealNet :class:`~cascade.nn.networks.PredictorHead` (an MLP ending in a sigmoid)
    over that vector. See the module docstring for the open choices.

    Args:
        feature_dims: the shared-feature width ``F_k`` of each stage followed by a decision.
        num_outputs: classes ``C`` or coordinates ``D`` of every stage's output.
        inputs: any of ``features`` (the stage's shared features), ``sorted_probs`` (its
            softmax, sorted descending), ``sorted_log_probs`` (the same in log space,
            floored at -20: it separates 0.99 from 0.999, where the loss differs tenfold),
            ``confidence`` (MSP, top-2 gap, normalized negative entropy), ``output`` (the
            raw output; for regression).
        hidden: hidden layer widths of each head.
        shared: one head for every stage, reading a one-hot stage index as well.
        detach: stop the policy's gradient at its inputs.
        classification: whether the stages' outputs are logits.

    Raises:
        CascadeError: an unknown input, ``shared`` with ``features``, or label
            probabilities asked of a regression task.
    """

    def __init__(
        self,
        feature_dims: Sequence[int],
        num_outputs: int,
        inputs: Sequence[str] = ("sorted_log_probs", "confidence"),
        hidden: Sequence[int] = (16,),
        shared: bool = False,
        detach: bool = True,
        classification: bool = True,
    ):
        super().__init__()
        unknown = [i for i in inputs if i not in POLICY_INPUTS]
        if unknown or not inputs:
            raise CascadeError(
                f"policy.inputs must be a non-empty subset of {POLICY_INPUTS}, got {list(inputs)}")
        if not classification and CLASSIFICATION_INPUTS & set(inputs):
            raise CascadeError("policy.inputs: a regression stage has no label probabilities; "
                               "use [output] or [features, output]")
        if shared and "features" in inputs:
            raise CascadeError("policy: a shared policy cannot read features (their width differs by stage)")
        self.num_decisions = len(feature_dims)
        self.inputs = tuple(inputs)
        self.shared = shared
        self.detach = detach
        def in_dim(feature_dim: int) -> int:
            return sum(head_input_width(i, feature_dim, num_outputs) for i in self.inputs)

        if shared:
            dims = [in_dim(0) + self.num_decisions]  # + the one-hot stage index
        else:
            dims = [in_dim(f) for f in feature_dims]
        # the head's "features" slot carries the state vector this class builds
        self.heads = nn.ModuleList([PredictorHead(d, num_outputs, ("features",), hidden, detach=False) for d in dims])

    def state(self, k: int, stage: StageOutput) -> Tensor:
        """The policy's input after stage ``k``, ``[B, S]``."""
        output, features = stage.output, stage.features
        if self.detach:
            output = output.detach()
            features = features.detach() if features is not None else None
        if "features" in self.inputs and features is None:
            raise CascadeError("the stopping policy reads features, but the stage does not expose them")
        parts = [head_input(self.inputs, features, output)]
        if self.shared:
            index = torch.full((len(output),), k, dtype=torch.long, device=output.device)
            parts.append(F.one_hot(index, self.num_decisions).to(output.dtype))
        return torch.cat(parts, dim=-1)

    def forward(self, k: int, stage: StageOutput) -> Tensor:
        """``P(stop)`` after stage ``k``, ``[B]``."""
        s = self.state(k, stage)
        head = self.heads[0] if self.shared else self.heads[k]
        return head(s, s)  # PredictorHead(features, output); it reads only "features"


class MultiStageCascade(nn.Module):
    """Routed network stages of rising cost, a stopping policy, and an oracle last.

    ``forward`` runs every routed stage on the whole batch (training); :meth:`route` is
    deployment: each stage only sees the inputs that reached it. The oracle (the frozen
    big network, white-box, or a black-box one) is the last stage, the same for every
    method of a run.

    Args:
        stages: the routed stages, cheapest first (:class:`~cascade.contracts.roles.Approximator`).
        policy: the stopping policy, deciding after each routed stage.
        oracle: the last stage.

    Raises:
        CascadeError: no routed stage, or a policy with the wrong number of decisions.
    """

    def __init__(self, stages: Sequence[nn.Module], policy: StoppingPolicy, oracle: Oracle):
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.policy = policy
        self.oracle = oracle
        if not self.stages:
            raise CascadeError("a cascade needs at least one routed stage before its oracle")
        if policy.num_decisions != len(self.stages):
            raise CascadeError(f"the policy decides after {policy.num_decisions} stages, the cascade needs "
                               f"{len(self.stages)}")

    @property
    def num_stages(self) -> int:
        """K: the routed stages plus the oracle."""
        return len(self.stages) + 1

    def forward(self, x: Tensor) -> CascadeOutput:
        outs: list[StageOutput] = []
        for k, stage in enumerate(self.stages):
            out = stage(x)
            out.q = self.policy(k, out)  # [B]
            outs.append(out)
        return CascadeOutput(stages=outs, p_stop=torch.stack([o.q for o in outs], dim=1))


class PolicyStage(nn.Module):
    """Routed stage ``k`` followed by its policy decision: ``forward`` gives the stage's
    :class:`StageOutput` with ``q = P(stop)`` (what the evaluator and ``measure_cost`` see)."""

    def __init__(self, stage: nn.Module, policy: StoppingPolicy, k: int):
        super().__init__()
        self.stage, self.policy, self.k = stage, policy, k

    def forward(self, x: Tensor) -> StageOutput:
        out = self.stage(x)
        out.q = self.policy(self.k, out)
        return out


def stage_costs(model: MultiStageCascade, input_shape: tuple[int, ...]) -> list[float]:
    """MFLOPs (MACs) of each stage, first to last, each routed one with its policy head.

    Raises:
        CascadeError: the oracle's cost is unknown.
    """
    costs = [measure_cost(PolicyStage(s, model.policy, k), input_shape).mflops for k, s in enumerate(model.stages)]
    if model.oracle.cost_mflops is None:
        raise CascadeError("the oracle's cost is unknown; set oracle_mflops")
    return costs + [float(model.oracle.cost_mflops)]


def trajectory(p_stop: Tensor, actions: Tensor) -> tuple[Tensor, Tensor]:
    """Exit stage and log-probability of sampled stop/continue actions.

    The input stops at the first decision ``k`` with ``a_k = 1``, or at the last stage
    ``K - 1`` when every action is "continue". Only the decisions taken count:
    ``log pi = sum_{k < tau} log(1 - p_k) + [tau < K-1] log p_tau``.

    Args:
        p_stop: ``[B, K-1]`` stop probabilities (already clamped away from 0 and 1).
        actions: ``[B, K-1]`` sampled actions, 1 = stop.

    Returns:
        ``(tau, log_prob)``: ``[B]`` long exit stages and ``[B]`` log-probabilities.
    """
    b, d = p_stop.shape
    idx = torch.arange(d, device=p_stop.device)  # [K-1]
    stop = actions > 0.5
    tau = torch.where(stop, idx, torch.full_like(idx, d)).min(dim=1).values  # [B]
    taken = idx[None, :] <= tau[:, None]  # [B, K-1] decisions made on the way to tau
    log_pa = torch.where(stop, p_stop.log(), (1 - p_stop).log())  # [B, K-1]
    return tau, (log_pa * taken).sum(dim=1)


class ReinforceObjective(Objective):
    """Joint training of a :class:`MultiStageCascade`'s stages and stopping policy.

    Per batch (means over the batch): sample ``a_k ~ Bernoulli(p_k)``; ``tau`` = first
    stop; ``R = -L(f_tau, y) - alpha * C_tau / c_{K-1}`` with ``C_tau`` the cumulative
    cost; ``loss = -(R - b) * log pi + L(f_tau, y) + aux_weight * sum_k L(f_k, y)
    - entropy_weight * H(pi)``. The first term is the REINFORCE surrogate (its gradient
    is the policy gradient), the second trains each stage where inputs stopped, the third
    keeps every stage trained (module docstring: the open choices).

    Args:
        criterion: the task loss.
        stage_mflops: the cost ``c_k`` of each of the K stages, first to last.
        alpha: the cost weight of the reward.
        reward: ``"loss"`` (the task loss) or ``"error"`` (0-1 error) in the reward.
        baseline: ``"batch_mean"`` (leave-one-out over the batch), ``"moving_average"``,
            ``"self_critical"`` or ``"sample_mean"`` (leave-one-out over the ``samples``
            trajectories of the same input; needs ``samples >= 2``).
        momentum: of the moving-average baseline.
        samples: trajectories sampled per input and step. Every stage has already run on
            the whole batch, so extra trajectories cost no network evaluation.
        aux_weight: weight of every stage's plain loss on every input.
        entropy_weight: bonus on the policy's entropy over the decisions taken (0: none).
        eps: stop probabilities are clamped to ``[eps, 1 - eps]``.
    """

    def __init__(
        self,
        criterion: TaskLoss,
        stage_mflops: Sequence[float],
        alpha: float,
        reward: Literal["loss", "error"] = "loss",
        baseline: Literal["batch_mean", "moving_average", "self_critical", "sample_mean"] = "batch_mean",
        momentum: float = 0.9,
        samples: int = 1,
        aux_weight: float = 1.0,
        entropy_weight: float = 0.0,
        eps: float = 1e-6,
    ):
        if baseline == "sample_mean" and samples < 2:
            raise CascadeError("the sample_mean baseline needs samples >= 2 trajectories per input")
        if len(stage_mflops) < 2 or min(stage_mflops) < 0 or stage_mflops[-1] <= 0:
            raise CascadeError(f"stage costs must be >= 0 with a positive last one, got {list(stage_mflops)}")
        self.criterion = criterion
        costs = torch.tensor([float(c) for c in stage_mflops], dtype=torch.float64)
        # C_tau / c_{K-1}: what stopping at each stage costs, relative to the last stage
        self.relative_paid = (costs.cumsum(0) / costs[-1]).float()  # [K]
        self.alpha = alpha
        self.reward = reward
        self.baseline = baseline
        self.momentum = momentum
        self.samples = samples
        self.aux_weight = aux_weight
        self.entropy_weight = entropy_weight
        self.eps = eps
        self.running_baseline: float | None = None

    def _reward(self, task_term: Tensor, tau: Tensor) -> Tensor:
        """``R = -L(f_tau) - alpha * C_tau / c_{K-1}``, ``[B]``, from the per-stage ``task_term [B, K]``."""
        paid = self.relative_paid.to(task_term.device)[tau]  # [B]
        return -task_term.gather(1, tau[:, None]).squeeze(1) - self.alpha * paid

    def _baseline(self, r: Tensor, p: Tensor, task_term: Tensor) -> Tensor:
        """``b`` for rewards ``r [M, B]`` of ``M`` trajectories per input, ``[M, B]``."""
        if self.baseline == "self_critical":
            greedy_tau, _ = trajectory(p, (p >= 0.5).float())
            return self._reward(task_term, greedy_tau).expand_as(r)
        if self.baseline == "sample_mean":  # the other trajectories of the same input
            return (r.sum(dim=0, keepdim=True) - r) / (len(r) - 1)
        if self.baseline == "batch_mean":
            if r.numel() == 1:
                return torch.zeros_like(r)
            return (r.sum() - r) / (r.numel() - 1)  # leave-one-out: independent of the input's own action
        mean = float(r.mean())
        b = mean if self.running_baseline is None else self.running_baseline
        self.running_baseline = self.momentum * b + (1 - self.momentum) * mean
        return torch.full_like(r, b)

    def __call__(self, model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        x, y = batch
        out: CascadeOutput = model(x)
        if out.p_stop is None:
            raise CascadeError("ReinforceObjective needs a cascade with a stopping policy")
        crit = self.criterion
        losses = [crit.per_sample(s.output, y) for s in out.stages]
        wrong = [~crit.correct(s.output, y) for s in out.stages]
        n_net = len(losses)
        losses.append(model.oracle.per_sample_loss(x, y, crit))
        wrong.append(~model.oracle.correct(x, y, crit))
        loss = torch.stack(losses, dim=1)  # [B, K]
        if loss.shape[1] != len(self.relative_paid):
            raise CascadeError(f"the objective has {len(self.relative_paid)} stage costs, the cascade "
                               f"{loss.shape[1]} stages")
        p = out.p_stop.clamp(self.eps, 1 - self.eps)  # [B, K-1]
        m, b = self.samples, len(p)
        p_m = p.repeat(m, 1)  # [M*B, K-1]: M trajectories per input, sample-major
        with torch.no_grad():
            actions = torch.bernoulli(p_m)
        tau, log_prob = trajectory(p_m, actions)  # [M*B], [M*B]
        loss_m = loss.repeat(m, 1)  # [M*B, K]

        with torch.no_grad():
            task_term = loss if self.reward == "loss" else torch.stack(wrong, dim=1).float()  # [B, K]
            r = self._reward(task_term.repeat(m, 1), tau).view(m, b)  # [M, B]
            advantage = (r - self._baseline(r, p, task_term)).reshape(-1)  # [M*B], sample-major like tau
        policy_loss = -(advantage * log_prob).mean()
        stop_loss = loss_m.gather(1, tau[:, None]).squeeze(1).mean()  # each stage, where inputs stopped
        aux_loss = loss[:, :n_net].mean(dim=0).sum()  # every network stage on every input
        taken = (torch.arange(p.shape[1], device=p.device)[None, :] <= tau[:, None]).float()  # [M*B, K-1]
        entropy = (-(p_m * p_m.log() + (1 - p_m) * (1 - p_m).log()) * taken).sum(dim=1).mean()
        total = policy_loss + stop_loss + self.aux_weight * aux_loss - self.entropy_weight * entropy
        logged = {
            "loss": total,
            "reward": r.mean(),
            "policy_loss": policy_loss.detach(),
            "stop_loss": stop_loss.detach(),
            "aux_loss": aux_loss.detach(),
            "p_stop": out.p_stop.detach().mean(),
        }
        exits = torch.bincount(tau, minlength=loss.shape[1]).float() / len(tau)
        for k, frac in enumerate(exits):
            logged[f"exit_{k}"] = frac
        return logged


# ----------------------------------------------------------------------------- the method


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PolicyOptions(_Strict):
    """The stopping policy: what each head reads (default: sorted log-probabilities and
    confidence for classification, features and output for regression), its hidden
    widths, one head shared by every stage, and whether its gradient stops at its inputs."""

    inputs: list[HeadInput] | None = Field(default=None, min_length=1)
    hidden: list[Annotated[int, Field(gt=0)]] = Field(default_factory=lambda: [16])
    shared: bool = False
    detach: bool = True

    def resolved_inputs(self, kind: TaskKind) -> list[str]:
        return list(self.inputs) if self.inputs is not None else DEFAULT_POLICY_INPUTS[kind]


class ReinforceOptions(MethodOptions):
    """``{name: reinforce, alphas: [...], policy: {...}, ...}``: one cascade per ``alphas``
    value (the cost weight of the reward), used at ``threshold`` (0.5: the greedy policy)
    and with that threshold swept; the rest as :class:`ReinforceObjective`'s arguments.
    ``policy_lr``: the policy's learning rate (default: ``finetune.lr``)."""

    alphas: list[Annotated[float, Field(ge=0)]] = Field(default_factory=lambda: [0.1], min_length=1)
    threshold: Annotated[float, Field(gt=0, lt=1)] = 0.5
    reward: Literal["loss", "error"] = "loss"
    baseline: Literal["batch_mean", "moving_average", "self_critical", "sample_mean"] = "batch_mean"
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    samples: Annotated[int, Field(ge=1)] = 1
    policy_lr: Annotated[float, Field(gt=0)] | None = None
    aux_weight: Annotated[float, Field(ge=0)] = 1.0
    entropy_weight: Annotated[float, Field(ge=0)] = 0.0
    policy: PolicyOptions = Field(default_factory=PolicyOptions)

    @model_validator(mode="after")
    def _samples_for_sample_mean(self) -> "ReinforceOptions":
        if self.baseline == "sample_mean" and self.samples < 2:
            raise ValueError("baseline: sample_mean needs samples >= 2 (trajectories per input)")
        if self.policy.shared and self.policy.inputs and "features" in self.policy.inputs:
            raise ValueError("policy: a shared policy cannot read features (their width differs by stage)")
        return self


@METHODS.register("reinforce")
class Reinforce(TrainedMethod):
    """A stopping policy trained by REINFORCE jointly with the routed stages, one per alpha."""

    Options = ReinforceOptions

    def problems(self, task: Task) -> list[str]:
        wrong = [i for i in self.options.policy.inputs or [] if i in CLASSIFICATION_INPUTS]
        if task.criterion.kind == TaskKind.REGRESSION and wrong:
            return [f"policy.inputs: {wrong} need class probabilities, which a regression task has not; "
                    f"use {DEFAULT_POLICY_INPUTS[TaskKind.REGRESSION]}"]
        return []

    def build(self, context: CascadeContext) -> list[RoutedSystem]:
        o, pc = self.options, self.options.policy
        systems = []
        for alpha in o.alphas:
            policy = StoppingPolicy([s.feature_dim for s in context.pretrained], context.task.num_outputs,
                                    pc.resolved_inputs(context.kind), pc.hidden, pc.shared, pc.detach,
                                    classification=context.kind == TaskKind.CLASSIFICATION)
            model = MultiStageCascade([copy.deepcopy(s) for s in context.pretrained], policy, context.oracle)
            model.to(context.device)
            stages = [PolicyStage(s, model.policy, k) for k, s in enumerate(model.stages)]
            systems.append(RoutedSystem(stages, variant=f"a{alpha:g}", fixed_threshold=o.threshold,
                                        info={"alpha": alpha}, model=model))
        return systems

    def train(self, systems: list[RoutedSystem], context: CascadeContext) -> None:
        o = self.options
        for system in systems:
            model = system.model
            objective = ReinforceObjective(context.task.criterion, stage_costs(model, context.task.input_shape),
                                           system.info["alpha"], o.reward, o.baseline, o.momentum, o.samples,
                                           o.aux_weight, o.entropy_weight)
            in_policy = {id(p) for p in model.policy.parameters()}
            groups = [{"params": [p for p in model.parameters() if id(p) not in in_policy]},
                      {"params": list(model.policy.parameters()), "lr": o.policy_lr or context.finetune.lr}]
            context.fit(model, objective, context.data, system.variant, groups)
