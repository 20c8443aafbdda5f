"""The AppealNet routing method: its options, and building and training its two-head stages."""

from __future__ import annotations

import copy
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from cascade.contracts.methods import BuildContext, CascadeContext, MethodOptions, RoutedSystem, TrainedMethod
from cascade.contracts.stages import Oracle, WhiteBoxOracle
from cascade.contracts.task import Task
from cascade.core.enums import TaskKind
from cascade.core.registry import METHODS
from cascade.methods.appealnet.controller import LambdaControllerHook
from cascade.methods.appealnet.head import TwoHeadNetwork
from cascade.methods.appealnet.objective import DIRECT_TARGETS, AppealNetObjective, ApproximatorLoss, PredictorTarget
from cascade.nn.networks import CLASSIFICATION_INPUTS, HeadInput, PredictorHead
from cascade.training.phase import freeze

#: what the head reads when the config does not say: what ranks best for each task kind
DEFAULT_INPUTS = {TaskKind.CLASSIFICATION: ["sorted_probs", "confidence"], TaskKind.REGRESSION: ["features", "output"]}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class PredictorOptions(_Strict):
    """The predictor head. The paper's is ``inputs: [features], hidden: []``.

    ``inputs`` default: ``[sorted_probs, confidence]`` (classification), ``[features,
    output]`` (regression, which has no class probabilities).
    """

    inputs: list[HeadInput] | None = Field(default=None, min_length=1)
    hidden: list[Annotated[int, Field(gt=0)]] = Field(default_factory=lambda: [16])
    detach: bool = True
    normalize: bool = False
    lr_scale: Annotated[float, Field(gt=0)] = 1.0

    def resolved_inputs(self, kind: TaskKind) -> list[str]:
        return list(self.inputs) if self.inputs is not None else DEFAULT_INPUTS[kind]


class LambdaOptions(_Strict):
    """The Lagrange multiplier and its dynamic controller (App. B.2)."""

    init: Annotated[float, Field(gt=0)] = 0.1
    dynamic: bool = True
    budget: Annotated[float, Field(gt=0)] = 0.5
    up: Annotated[float, Field(gt=0, lt=1)] = 0.99
    down: Annotated[float, Field(gt=1)] = 1.01


class AppealNetOptions(MethodOptions):
    """``{name: appealnet, predictor: {...}, lambda: {...}, approximator_loss, predictor_target}``."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    predictor: PredictorOptions = Field(default_factory=PredictorOptions)
    lambda_: LambdaOptions = Field(default_factory=LambdaOptions, alias="lambda")
    approximator_loss: ApproximatorLoss = ApproximatorLoss.WEIGHTED
    predictor_target: PredictorTarget = PredictorTarget.LOSS
    #: train the predictor head alone, the stage network frozen as pre-trained (no joint fine-tuning)
    freeze_stage: bool = False


@METHODS.register("appealnet")
class AppealNet(TrainedMethod):
    """A jointly trained predictor head per routed stage; its ``q(x)`` is the score."""

    Options = AppealNetOptions
    default_for = frozenset(TaskKind)

    def problems(self, task: Task) -> list[str]:
        inputs = self.options.predictor.inputs or []
        wrong = [i for i in inputs if i in CLASSIFICATION_INPUTS]
        if task.criterion.kind == TaskKind.REGRESSION and wrong:
            return [f"predictor.inputs: {wrong} need class probabilities, which a regression task has not; "
                    f"use {DEFAULT_INPUTS[TaskKind.REGRESSION]}"]
        return []

    def build(self, context: BuildContext) -> list[RoutedSystem]:
        pc = self.options.predictor
        stages = []
        for net in context.pretrained:
            head = PredictorHead(net.feature_dim, context.task.num_outputs, pc.resolved_inputs(context.kind),
                                 pc.hidden, pc.detach, classification=context.kind == TaskKind.CLASSIFICATION,
                                 normalize=pc.normalize)
            stages.append(TwoHeadNetwork(copy.deepcopy(net), head).to(context.device))
        return [RoutedSystem(stages)]

    def train(self, systems: list[RoutedSystem], context: CascadeContext) -> None:
        o = self.options
        crit = context.task.criterion
        for k, net in enumerate(systems[0].stages):
            # an appealed input goes to the next stage: its answers are what the head weighs
            nxt = k + 1 < len(context.plain)
            oracle: Oracle = WhiteBoxOracle(context.plain[k + 1]) if nxt else context.oracle
            objective = AppealNetObjective(crit, oracle, o.lambda_.init, o.approximator_loss, o.predictor_target)
            lc = o.lambda_
            lagrangian = o.predictor_target not in DIRECT_TARGETS
            hooks = (LambdaControllerHook(objective, lc.budget, lc.up, lc.down),) if lc.dynamic and lagrangian else ()
            data = context.with_oracle_outputs(context.data, oracle)
            groups = [{"params": list(net.predictor.parameters()), "lr": context.finetune.lr * o.predictor.lr_scale}]
            if o.freeze_stage:
                freeze(net.base)
            else:
                groups.insert(0, {"params": list(net.base.parameters())})
            context.fit(net, objective, data, f"stage {k}" if len(systems[0].stages) > 1 else "", groups, hooks)
