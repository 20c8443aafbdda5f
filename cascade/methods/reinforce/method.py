"""The REINFORCE routing method: its options, and building and training one cascade per alpha."""

from __future__ import annotations

import copy
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cascade.contracts.methods import BuildContext, CascadeContext, MethodOptions, RoutedSystem, TrainedMethod
from cascade.contracts.task import Task
from cascade.core.enums import TaskKind
from cascade.core.registry import METHODS
from cascade.methods.reinforce.objective import Baseline, ReinforceObjective, Reward
from cascade.methods.reinforce.policy import (
    DEFAULT_POLICY_INPUTS,
    MultiStageCascade,
    PolicyStage,
    StoppingPolicy,
    stage_costs,
)
from cascade.nn.networks import CLASSIFICATION_INPUTS, HeadInput


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
    reward: Reward = Reward.LOSS
    baseline: Baseline = Baseline.BATCH_MEAN
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    samples: Annotated[int, Field(ge=1)] = 1
    policy_lr: Annotated[float, Field(gt=0)] | None = None
    aux_weight: Annotated[float, Field(ge=0)] = 1.0
    entropy_weight: Annotated[float, Field(ge=0)] = 0.0
    policy: PolicyOptions = Field(default_factory=PolicyOptions)

    @model_validator(mode="after")
    def _samples_for_sample_mean(self) -> "ReinforceOptions":
        if self.baseline == Baseline.SAMPLE_MEAN and self.samples < 2:
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

    def build(self, context: BuildContext) -> list[RoutedSystem]:
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
