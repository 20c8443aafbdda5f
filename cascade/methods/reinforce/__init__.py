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

The package: :mod:`~cascade.methods.reinforce.policy` (the stopping policy and the
cascade it decides in), :mod:`~cascade.methods.reinforce.objective` (the REINFORCE loss)
and :mod:`~cascade.methods.reinforce.method` (the registered method and its options).
"""

from cascade.methods.reinforce.method import PolicyOptions, Reinforce, ReinforceOptions
from cascade.methods.reinforce.objective import Baseline, ReinforceObjective, Reward, trajectory
from cascade.methods.reinforce.policy import (
    DEFAULT_POLICY_INPUTS,
    POLICY_INPUTS,
    CascadeOutput,
    MultiStageCascade,
    PolicyStage,
    StoppingPolicy,
    stage_costs,
)

__all__ = [
    "DEFAULT_POLICY_INPUTS",
    "POLICY_INPUTS",
    "Baseline",
    "CascadeOutput",
    "MultiStageCascade",
    "PolicyOptions",
    "PolicyStage",
    "Reinforce",
    "ReinforceObjective",
    "ReinforceOptions",
    "Reward",
    "StoppingPolicy",
    "stage_costs",
    "trajectory",
]
