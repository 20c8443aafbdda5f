"""The plan of an experiment, built once from its config: the task, the routed stages and
the big network, the modes, the methods and the device with its settings.

:func:`build_plan` resolves and checks what a config names before any data is read;
the checks (:mod:`cascade.engine.checks`) and the experiment
(:class:`~cascade.engine.experiment.Experiment`) both take the :class:`Plan`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cascade.config.schema import ExperimentConfig, NetworkSpec
from cascade.contracts.methods import MethodKind
from cascade.contracts.task import Task
from cascade.core.enums import Mode, TaskKind
from cascade.core.errors import CascadeError
from cascade.engine.tasks import construct_task, resolve_specs
from cascade.methods.catalogue import MethodEntry, build_methods
from cascade.runs.layout import stage_config_key
from cascade.training import distributed
from cascade.training.devices import resolve_amp, resolve_channels_last, resolve_device

#: the training phases' config keys
PHASE_KEYS = ("big_train", "pretrain", "finetune")


@dataclass(frozen=True)
class Plan:
    """What one config runs (see :func:`build_plan`).

    Attributes:
        cfg: the validated config.
        source: the config file's path, for messages and ``metrics.json`` (may be empty).
        task: the task, built and checked for its attributes.
        kind: the task's kind.
        stage_specs: the routed stages, cheapest first, the task's defaults filled in.
        big_spec: the big network (the white-box last stage), or None.
        modes: the modes run.
        methods: the methods, in config order.
        device: where training and evaluation run.
        amp: the autocast dtype on ``device``, or None (full precision).
        channels_last: whether image batches are channels-last on ``device``.
    """

    cfg: ExperimentConfig
    source: str
    task: Task
    kind: TaskKind
    stage_specs: tuple[NetworkSpec, ...]
    big_spec: NetworkSpec | None
    modes: tuple[Mode, ...]
    methods: tuple[MethodEntry, ...]
    device: torch.device
    amp: torch.dtype | None
    channels_last: bool

    @property
    def trained_methods(self) -> list[MethodEntry]:
        return [m for m in self.methods if m.kind == MethodKind.TRAINED]

    @property
    def post_hoc_methods(self) -> list[MethodEntry]:
        return [m for m in self.methods if m.kind == MethodKind.POST_HOC]

    @property
    def runs_big(self) -> bool:
        """Whether the big network runs (as the white-box last stage)."""
        return self.big_spec is not None and Mode.WHITE_BOX in self.modes

    @property
    def where(self) -> str:
        """The config, in messages."""
        return self.source or "config"

    def stage_key(self, k: int) -> str:
        """Routed stage ``k``'s config key, in messages (``little`` or ``stages.<k>``)."""
        return stage_config_key(k, self.cfg.stages is not None)

    def method_names(self) -> list[str]:
        """The methods' names as the config lists them (or their labels: the defaults)."""
        return [s.name for s in self.cfg.methods] if self.cfg.methods else [m.label for m in self.methods]


def build_plan(cfg: ExperimentConfig, source: str = "") -> Plan:
    """The plan of ``cfg``: its task built, its networks and methods resolved for it, its
    device chosen (under torchrun, this process's GPU) and its settings resolved there.

    Raises:
        CascadeError: the task cannot be built, a method does not suit it, a setting does
            not suit the device or the task.
    """
    device = distributed.local_device(resolve_device(cfg.device))
    task = construct_task(cfg)
    kind = TaskKind(task.criterion.kind)
    stage_specs, big_spec = resolve_specs(cfg, task)
    methods = build_methods(cfg.methods, kind)
    amp = resolve_amp(cfg.amp, device)
    channels_last = resolve_channels_last(cfg.channels_last, device, tuple(task.input_shape))
    for key in PHASE_KEYS:
        if getattr(cfg, key).label_smoothing and kind != TaskKind.CLASSIFICATION:
            raise CascadeError(f"{key}.label_smoothing: label smoothing is for classification; the task "
                               f"{cfg.task.name} is {kind.value} (set it to 0)")
    return Plan(cfg=cfg, source=source, task=task, kind=kind, stage_specs=tuple(stage_specs), big_spec=big_spec,
                modes=tuple(Mode(m) for m in cfg.modes), methods=tuple(methods), device=device, amp=amp,
                channels_last=channels_last)
