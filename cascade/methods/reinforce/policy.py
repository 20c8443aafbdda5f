"""The REINFORCE cascade's modules: the stopping policy, the routed stages with their
decisions, and what each stage costs (METHOD.md section 2; the open choices are in
:mod:`cascade.methods.reinforce`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cascade.contracts.stages import Oracle, StageOutput
from cascade.core.enums import TaskKind
from cascade.core.errors import CascadeError
from cascade.nn.cost import measure_cost
from cascade.nn.networks import CLASSIFICATION_INPUTS, HEAD_INPUTS, PredictorHead, head_input, head_input_width


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
        stages: the routed stages, cheapest first (:class:`~cascade.contracts.stages.Approximator`).
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
