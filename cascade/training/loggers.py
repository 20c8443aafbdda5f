"""Training curves for the config's ``loggers``: the hook that feeds them, building them
for a run, and the built-in TensorBoard logger.

:class:`LoggerHook` is in every training phase's hooks, with or without loggers (its
state is empty), so a run's checkpoints are the same whichever loggers it has, and a
run may be resumed with loggers added or removed.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cascade.contracts.loggers import Logger, LoggerOptions, logger_class
from cascade.core.errors import CascadeError
from cascade.core.registry import LOGGERS
from cascade.runs import layout
from cascade.training.hooks import HistoryHook, HookBase
from cascade.training.trainer import Trainer

log = logging.getLogger(__name__)

#: what ``pip`` installs to make the ``tensorboard`` logger work (pyproject.toml's extra)
TENSORBOARD_EXTRA = "pip install 'cascade-routing[tensorboard]'"


class LoggerHook(HookBase):
    """Sends a phase's logged values to ``loggers``: after every step, each value the
    objective logs as ``train/<name>`` and the learning rate as ``train/lr``; after
    every epoch, ``history``'s mean of the epoch as ``epoch/<name>`` (the hook must
    come after ``history`` in the trainer's hooks). It reads floats the trainer has
    already copied from the device, so training computes the same with or without it.

    Args:
        phase: the phase's name (the trainer's ``name``).
        loggers: where the values go (may be empty).
        history: the phase's loss history.
    """

    def __init__(self, phase: str, loggers: Sequence[Logger], history: HistoryHook):
        self.phase = phase
        self.loggers = list(loggers)
        self.history = history

    def before_train(self, trainer: Trainer) -> None:
        for logger in self.loggers:
            logger.begin_phase(self.phase, trainer.step)

    def after_step(self, trainer: Trainer, losses: dict[str, float]) -> None:
        if not self.loggers:
            return
        values = {f"train/{k}": v for k, v in losses.items()}
        for i, group in enumerate(trainer.optimizer.param_groups):
            values["train/lr" if i == 0 else f"train/lr_{i}"] = float(group["lr"])
        self._send(trainer.step, values)

    def after_epoch(self, trainer: Trainer) -> None:
        if self.loggers and self.history.history:
            self._send(trainer.step, {f"epoch/{k}": v for k, v in self.history.history[-1].items()})
            for logger in self.loggers:  # the epoch's checkpoint comes next: a resume starts from it
                logger.flush(self.phase)

    def after_train(self, trainer: Trainer) -> None:
        for logger in self.loggers:
            logger.end_phase(self.phase)

    def on_interrupt(self, trainer: Trainer) -> None:
        self.after_train(trainer)

    def _send(self, step: int, values: dict[str, float]) -> None:
        for logger in self.loggers:
            logger.log_scalars(self.phase, step, values)


def build_loggers(specs: Sequence[Any], run_dir: Path) -> list[Logger]:
    """The config's ``loggers`` (each ``{name, **options}``) for the run in ``run_dir``,
    checked before any training (then ``run_dir`` is created, for them to write in).

    Raises:
        CascadeError: an unknown logger, options it refuses, or one that cannot work on
            this machine (a missing package: the message names what to install).
    """
    checked = []
    for i, spec in enumerate(specs):
        try:
            cls = logger_class(spec.name)
            problems = cls.problems()
            if problems:
                raise CascadeError(problems[0])
            checked.append((cls, cls.Options.model_validate(spec.options())))
        except (CascadeError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
            raise CascadeError(f"loggers.{i}: {' '.join(str(exc).split())}") from None
    if checked:  # every logger can work: the run starts, and its folder is there for them
        Path(run_dir).mkdir(parents=True, exist_ok=True)
    return [cls(Path(run_dir), options) for cls, options in checked]


def close_loggers(loggers: Sequence[Logger]) -> None:
    """Close every logger; one that fails to close is logged, the others still close."""
    for logger in loggers:
        try:
            logger.close()
        except Exception as exc:  # a user's logger failing at the end must not hide the run's own error
            log.warning("logger %s: close failed: %s", type(logger).__name__, exc)


@LOGGERS.register("tensorboard")
class TensorBoardLogger(Logger):
    """TensorBoard event files in the run folder's ``tensorboard/``, one TensorBoard run
    per seed and phase (``seed_0/little_pretrain``, ``seed_0/appealnet_white_box``), so
    that a tag's chart (``train/loss``) overlays the phases and seeds; read them with
    ``tensorboard --logdir <run>/tensorboard``.

    A resumed phase's writer starts with ``purge_step``: TensorBoard drops the events of
    the earlier attempt from the step the checkpoint holds on, so a curve has each step
    once. Needs the ``tensorboard`` package (the ``tensorboard`` extra).
    """

    def __init__(self, run_dir: Path, options: LoggerOptions):
        super().__init__(run_dir, options)
        self.folder = self.run_dir / layout.TENSORBOARD
        self._writers: dict[str, Any] = {}  # phase -> SummaryWriter, created at its first value
        self._current: dict[str, tuple[Path, int]] = {}  # phase -> (its folder, the step it began after)
        self._begun: dict[str, int] = {}  # phase -> how many times it began in this run

    @classmethod
    def problems(cls) -> list[str]:
        try:
            # optional dependency (the tensorboard extra): only a run that asks for it needs it
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError:
            return [f"the tensorboard logger needs the tensorboard package, which is not installed: {TENSORBOARD_EXTRA}"]
        return []

    def begin_phase(self, phase: str, step: int) -> None:
        self.end_phase(phase)
        # a name used twice in a run gets a numbered folder, as its checkpoint file does
        n = self._begun[phase] = self._begun.get(phase, 0) + 1
        base = phase_folder(phase)
        self._current[phase] = (self.folder / (base if n == 1 else f"{base}_{n}"), step)

    def log_scalars(self, phase: str, step: int, values: Mapping[str, float]) -> None:
        # optional dependency (the tensorboard extra), checked by problems() before the run
        from tensorboard.compat.proto.summary_pb2 import Summary

        writer = self._writers.get(phase)
        if writer is None:
            writer = self._writers[phase] = self._open(phase)
        # one event holding every value of the step, as add_scalar writes one per value: the
        # writer's thread checksums each event in pure Python (measured: 0.15 ms a step of 7
        # values instead of 0.66 ms, on a 2-core CPU)
        summary = Summary(value=[Summary.Value(tag=tag, simple_value=float(v)) for tag, v in values.items()])
        writer._get_file_writer().add_summary(summary, step)  # what add_scalar calls

    def _open(self, phase: str) -> Any:
        # optional dependency (the tensorboard extra), checked by problems() before the run
        from torch.utils.tensorboard import SummaryWriter

        if phase not in self._current:  # values without begin_phase (a trainer run by hand)
            self.begin_phase(phase, 0)
        folder, start = self._current[phase]
        _after_earlier_files(folder)
        # events from step start + 1 on replace those an interrupted attempt wrote
        return SummaryWriter(str(folder), purge_step=start + 1, max_queue=100)

    def flush(self, phase: str) -> None:
        writer = self._writers.get(phase)
        if writer is not None:
            writer.flush()

    def end_phase(self, phase: str) -> None:
        writer = self._writers.pop(phase, None)
        if writer is not None:
            writer.close()

    def close(self) -> None:
        for phase in list(self._writers):
            self.end_phase(phase)


def _after_earlier_files(folder: Path) -> None:
    """Wait, if need be, until a new event file in ``folder`` sorts after those there.

    TensorBoard reads a run's files in name order, and a name starts with the second it
    was opened in: a resumed phase's file (whose purge drops the earlier attempt's later
    steps) must come last, also when it is opened in the same second as the earlier one.
    """
    seconds = [int(m[1]) for p in folder.glob("events.out.tfevents.*")
               if (m := re.match(r"events\.out\.tfevents\.(\d+)\.", p.name))]
    if seconds and max(seconds) >= int(time.time()):
        time.sleep(max(seconds) + 1 - time.time())


def phase_folder(phase: str) -> str:
    """The TensorBoard run of a phase: ``seed 0 little pretrain`` -> ``seed_0/little_pretrain``."""
    match = re.fullmatch(r"seed (\S+) (.+)", phase)
    return f"seed_{_slug(match[1])}/{_slug(match[2])}" if match else _slug(phase)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "phase"
