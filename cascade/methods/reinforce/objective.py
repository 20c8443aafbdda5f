"""The REINFORCE objective: joint training of a cascade's stages and its stopping policy."""

from __future__ import annotations

from enum import StrEnum
from typing import Sequence

import torch
from torch import Tensor, nn

from cascade.contracts.task import TaskLoss
from cascade.core.errors import CascadeError
from cascade.methods.reinforce.policy import CascadeOutput
from cascade.nn.objectives import Batch, Objective


class Reward(StrEnum):
    """The task term of the reward: the task loss, or the 0-1 error."""

    LOSS = "loss"
    ERROR = "error"


class Baseline(StrEnum):
    """The REINFORCE baseline ``b`` (see :class:`ReinforceObjective`)."""

    BATCH_MEAN = "batch_mean"
    MOVING_AVERAGE = "moving_average"
    SELF_CRITICAL = "self_critical"
    SAMPLE_MEAN = "sample_mean"


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
        reward: Reward = Reward.LOSS,
        baseline: Baseline = Baseline.BATCH_MEAN,
        momentum: float = 0.9,
        samples: int = 1,
        aux_weight: float = 1.0,
        entropy_weight: float = 0.0,
        eps: float = 1e-6,
    ):
        if baseline == Baseline.SAMPLE_MEAN and samples < 2:
            raise CascadeError("the sample_mean baseline needs samples >= 2 trajectories per input")
        if len(stage_mflops) < 2 or min(stage_mflops) < 0 or stage_mflops[-1] <= 0:
            raise CascadeError(f"stage costs must be >= 0 with a positive last one, got {list(stage_mflops)}")
        self.criterion = criterion
        costs = torch.tensor([float(c) for c in stage_mflops], dtype=torch.float64)
        # C_tau / c_{K-1}: what stopping at each stage costs, relative to the last stage
        self.relative_paid = (costs.cumsum(0) / costs[-1]).float()  # [K]
        self.alpha = alpha
        self.reward = Reward(reward)
        self.baseline = Baseline(baseline)
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
        if self.baseline == Baseline.SELF_CRITICAL:
            greedy_tau, _ = trajectory(p, (p >= 0.5).float())
            return self._reward(task_term, greedy_tau).expand_as(r)
        if self.baseline == Baseline.SAMPLE_MEAN:  # the other trajectories of the same input
            return (r.sum(dim=0, keepdim=True) - r) / (len(r) - 1)
        if self.baseline == Baseline.BATCH_MEAN:
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
            task_term = loss if self.reward == Reward.LOSS else torch.stack(wrong, dim=1).float()  # [B, K]
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
