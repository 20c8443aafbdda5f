"""The config schema: pydantic models that forbid unknown keys.

:class:`ExperimentConfig` is a whole experiment; :class:`NetworkSpec`, :class:`MethodSpec`
and :class:`TaskSpec` name a component (a registry key or dotted path) with its options;
:class:`OptimConfig` is one training phase. Checks against the registries are in
:mod:`cascade.config.validation`.
"""

from __future__ import annotations

import copy
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from cascade.config.limits import MAX_ITEMS
from cascade.core.enums import Mode
from cascade.nn.perturb import PerturbConfig

Fraction = Annotated[float, Field(ge=0.0, lt=1.0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class TaskSpec(BaseModel):
    """``task:`` the registry name (or dotted path) plus the task's own options."""

    model_config = ConfigDict(extra="allow")
    name: str


class NetworkSpec(BaseModel):
    """A network: registry name (or dotted path) plus its builder's keyword arguments.

    ``checkpoint``: a state dict (``torch.save(net.state_dict())``) for the network the
    builder makes; ``trained: true``: the builder returns an already trained network.
    Either way its training phase (``pretrain`` / ``big_train``) is skipped. ``name`` may
    be left out with ``checkpoint`` to load into the task's default network.
    """

    model_config = ConfigDict(extra="allow")
    name: str | None = None
    checkpoint: str | None = None
    trained: bool = False

    def kwargs(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    @property
    def given(self) -> bool:
        """Whether the network arrives trained (no training phase)."""
        return self.checkpoint is not None or self.trained

    @model_validator(mode="after")
    def _name_or_checkpoint(self) -> NetworkSpec:
        if self.name is None and self.checkpoint is None:
            raise ValueError("name: a network needs a name (a registered network or a dotted path)")
        if self.checkpoint is not None and self.trained:
            raise ValueError("checkpoint: give checkpoint: or trained: true, not both")
        return self

    def resolved(self, default: dict[str, Any] | None) -> NetworkSpec:
        """This spec, with the task's default network filled in when only a checkpoint is given."""
        if self.name is not None or not default:
            return self
        return NetworkSpec.model_validate({**default, "checkpoint": self.checkpoint})


class OptimConfig(_Strict):
    """One training phase.

    ``batch_size`` is the global batch: under ``torchrun`` each of the N processes takes
    ``batch_size / N`` inputs of every batch. The learning rate moves after every optimizer
    step along ``schedule``:

    - ``step``: ``lr``, multiplied by ``gamma`` at the start of each epoch in ``milestones``;
    - ``cosine``: cosine annealing from ``lr`` to 0 over the phase;
    - ``one_cycle``: PyTorch's OneCycleLR with ``max_lr = lr`` (from ``lr / 25`` up to ``lr``
      over the first 30 % of the steps, or ``warmup_epochs``, then down to ``lr / 25e4``);
      momentum stays as configured.

    ``warmup_epochs`` (``step`` and ``cosine``) ramps the learning rate linearly from
    ``lr / W`` to ``lr`` over the first ``W`` steps of the phase (its length in epochs, which
    may be fractional). ``nesterov``: Nesterov momentum (``sgd`` only).

    ``label_smoothing`` (classification; the supervised phases: ``big_train``,
    ``pretrain`` and the plain stages of ``finetune``, not the routing methods' own
    objectives) mixes ``label_smoothing / K`` of every class into the one-hot targets. It
    is 0 by default because it degrades the confidence ranking the routing scores read:
    a smoothed network's softmax separates its right and wrong answers less well (Xia et
    al., ICLR 2025), which hurts confidence-based routing even where accuracy improves.
    """

    epochs: Annotated[int, Field(ge=0)] = 10
    batch_size: Annotated[int, Field(gt=0)] = 128
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: Annotated[float, Field(gt=0)] = 1e-3
    momentum: Fraction = 0.9
    nesterov: bool = False
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    schedule: Literal["step", "cosine", "one_cycle"] = "step"
    milestones: list[Annotated[int, Field(gt=0)]] = Field(default_factory=list, max_length=MAX_ITEMS)
    gamma: Annotated[float, Field(gt=0, le=1)] = 0.2
    warmup_epochs: Annotated[float, Field(ge=0)] = 0.0
    label_smoothing: Fraction = 0.0

    @model_validator(mode="after")
    def _consistent(self) -> OptimConfig:
        if self.schedule != "step":
            for key in ("milestones", "gamma"):
                if key in self.model_fields_set and (key != "milestones" or self.milestones):
                    raise ValueError(f"{key}: only the step schedule has {key} (schedule is {self.schedule})")
        if self.nesterov and self.optimizer != "sgd":
            raise ValueError(f"nesterov: Nesterov momentum is for optimizer: sgd (optimizer is {self.optimizer})")
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov: needs momentum > 0")
        if self.warmup_epochs and self.epochs and self.warmup_epochs >= self.epochs:
            raise ValueError(f"warmup_epochs: {self.warmup_epochs:g} must be shorter than the phase "
                             f"(epochs: {self.epochs})")
        return self


class EvaluationConfig(_Strict):
    """Which operating points every method is reported at.

    ``white_box_targets`` / ``black_box_targets``: accuracy-degradation targets, AD against
    the big network alone (white-box) or the always-right oracle (black-box);
    ``budgets``: mean-cost budgets as fractions of the last stage's cost, at which each
    method's most accurate point is reported (none by default);
    ``appeal_budgets``: fractions of the inputs allowed to reach the last stage (the appeal
    rate, not a cost), at which each method's most accurate point is reported with its
    accuracy gained over the little network and its share of the oracle router's gain;
    ``delta``: the ``guaranteed`` thresholds keep AD under each target with probability at
    least ``1 - delta`` (Learn then Test on the calibration split);
    ``violation_resplits``: random cal/test re-splits per seed on which to count how often
    ``val`` and ``guaranteed`` thresholds miss their target (0: skip that simulation).
    """

    white_box_targets: list[Fraction] = Field(default_factory=lambda: [0.0, 0.001, 0.005, 0.01], min_length=1,
                                              max_length=MAX_ITEMS)
    black_box_targets: list[Fraction] = Field(default_factory=lambda: [0.005, 0.01, 0.02, 0.05], min_length=1,
                                              max_length=MAX_ITEMS)
    budgets: list[Annotated[float, Field(gt=0, le=1)]] = Field(default_factory=list, max_length=MAX_ITEMS)
    appeal_budgets: list[Annotated[float, Field(gt=0, le=1)]] = Field(
        default_factory=lambda: [0.05, 0.1, 0.2, 0.3], max_length=MAX_ITEMS)
    delta: Annotated[float, Field(gt=0, lt=1)] = 0.1
    violation_resplits: Annotated[int, Field(ge=0, le=100_000)] = 200
    batch_size: Annotated[int, Field(gt=0)] = 1024

    @field_validator("appeal_budgets")
    @classmethod
    def _distinct_appeal_budgets(cls, v: list[float]) -> list[float]:
        if len(set(v)) != len(v):
            raise ValueError("appeal budgets must be distinct")
        return v


class ChecksConfig(_Strict):
    """``checks:`` what happens when training goes wrong without a NaN (see
    :mod:`cascade.training.checks`).

    ``allow_degenerate``: keep a network whose supervised phase's loss rose, or that
    training left worse on the calibration split than a constant answer (no more accurate
    than always answering the majority class, with a loss above that of answering the
    class frequencies or the mean target): a warning; by default the run stops.
    """

    allow_degenerate: bool = False


class MethodSpec(BaseModel):
    """A routing method: registry name (or dotted path) plus its own options, which the
    method's ``Options`` schema validates (``{name: mc_dropout, passes: 20}``)."""

    model_config = ConfigDict(extra="allow")
    name: str

    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


def method_spec(value: Any) -> Any:
    """A method given by name alone (``- msp``) as the mapping ``{name: msp}``."""
    return {"name": value} if isinstance(value, str) else value


class LoggerSpec(BaseModel):
    """A training logger: registry name (or dotted path) plus its own options, which the
    logger's ``Options`` schema validates (``{name: tensorboard}``; ``- tensorboard`` too)."""

    model_config = ConfigDict(extra="allow")
    name: str

    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class ExperimentConfig(_Strict):
    """The whole experiment; see ``configs/digits.yaml`` for every key in use.

    The cascade is ``stages`` (or ``little``, the one-stage shorthand: AppealNet's case),
    cheapest first, then the big side: the ``big`` network in ``white_box`` mode, a
    black-box oracle (always right, cost ``oracle_mflops``) in ``black_box`` mode.
    """

    name: str | None = None
    task: TaskSpec
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1, max_length=MAX_ITEMS)
    modes: list[Mode] = Field(default_factory=lambda: [Mode.WHITE_BOX, Mode.BLACK_BOX], min_length=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    #: CPU threads for torch (None: torch's default). Networks this small run faster on
    #: one thread than on two when other processes share the cores.
    threads: Annotated[int, Field(gt=0)] | None = None
    #: bfloat16 autocast around the training forward passes: ``auto`` turns it on on a
    #: CUDA device that has bfloat16, off on the CPU
    amp: Literal["auto", "bf16", "off"] = "auto"
    #: channels-last memory layout for the trained networks and their image batches:
    #: ``auto`` turns it on on CUDA for image inputs ``[C, H, W]`` (faster convolutions)
    channels_last: Literal["auto"] | bool = "auto"
    #: keep in-memory training data on the GPU, so batches are indexed there with no host
    #: copy: ``auto`` does it when the data takes under a quarter of the free GPU memory
    data_on_device: Literal["auto"] | bool = "auto"
    #: reuse the big network trained by an earlier run (any config) with the same task,
    #: network, ``big_train``, seed and training settings, from ``cache_dir``
    big_cache: bool = True
    #: the same for the pre-trained routed stages (``pretrain``)
    pretrain_cache: bool = True
    #: where trained networks are cached: default ``$CASCADE_CACHE``, else
    #: ``~/.cache/cascade/networks``; never inside the source tree
    cache_dir: str | None = None
    little: NetworkSpec | None = None
    stages: list[NetworkSpec] | None = Field(default=None, min_length=1, max_length=MAX_ITEMS)
    big: NetworkSpec | None = None
    oracle_mflops: Annotated[float, Field(gt=0)] | None = None
    pretrain: OptimConfig = Field(default_factory=OptimConfig)
    big_train: OptimConfig = Field(default_factory=OptimConfig)
    #: every method's fine-tuning phase; the plain stages the post-hoc scores read get as
    #: long, on the same data (a fair comparison)
    finetune: OptimConfig = Field(default_factory=lambda: OptimConfig(epochs=6))
    finetune_data: Literal["train", "holdout"] = "train"
    holdout_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.3
    #: routing methods; None: the task kind's defaults (see cascade.methods.catalogue.build_methods)
    methods: list[Annotated[MethodSpec, BeforeValidator(method_spec)]] | None = Field(default=None, min_length=1,
                                                                                      max_length=MAX_ITEMS)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    #: label noise, a specialist big network, test-time corruptions (cascade.nn.perturb); none by default
    perturb: PerturbConfig = Field(default_factory=PerturbConfig)
    checks: ChecksConfig = Field(default_factory=ChecksConfig)
    #: where training's curves go besides metrics.json (cascade.contracts.loggers):
    #: ``[{name: tensorboard}]`` writes the run folder's tensorboard/; none by default
    loggers: list[Annotated[LoggerSpec, BeforeValidator(method_spec)]] = Field(default_factory=list,
                                                                               max_length=MAX_ITEMS)
    quick: dict[str, Any] = Field(default_factory=dict)

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError("seeds must be distinct")
        return v

    @model_validator(mode="after")
    def _one_stage_list(self) -> ExperimentConfig:
        if self.little is not None and self.stages is not None:
            raise ValueError("set little: (one stage) or stages: (several), not both")
        return self

    def stage_specs(self, task_default: dict[str, Any] | None) -> list[NetworkSpec]:
        """The routed stages, cheapest first: ``stages``, ``[little]``, or the task's default."""
        if self.stages is not None:
            return list(self.stages)
        if self.little is not None:
            return [self.little]
        return [NetworkSpec.model_validate(task_default)] if task_default else []


def resolved_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    """The config as plain data, every default filled in (what ``config.yaml`` holds)."""
    return copy.deepcopy(cfg.model_dump(mode="json", by_alias=True))
