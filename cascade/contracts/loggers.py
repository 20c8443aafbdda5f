"""The training-logger interface: where every step's losses go besides ``metrics.json``.

A logger is listed in the config (``loggers: [{name: tensorboard}]``) and built once per
run, on the process that writes the run folder. The trainer's
:class:`~cascade.training.loggers.LoggerHook` calls it with plain floats, so a logger
cannot change what training computes. ``tensorboard`` is built in
(:class:`~cascade.training.loggers.TensorBoardLogger`); a user's own, e.g. MLflow, is a
subclass registered in :data:`~cascade.core.registry.LOGGERS` (or named by dotted path)::

    @LOGGERS.register("mlflow")
    class MLflowLogger(Logger):
        def log_scalars(self, phase, step, values):
            mlflow.log_metrics({f"{phase}/{k}": v for k, v in values.items()}, step=step)
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from cascade.core.errors import CascadeError
from cascade.core.registry import LOGGERS


class LoggerOptions(BaseModel):
    """A logger's own config keys (none by default); a subclass adds fields."""

    model_config = ConfigDict(extra="forbid")


class Logger:
    """Receives the scalars training logs; override :meth:`log_scalars` (and what else you need).

    The values of one call share a step: the phase's optimizer steps so far (1 after its
    first step). Per step they are ``train/<name>`` for each value the objective logs
    (``train/loss``, AppealNet's ``train/lambda``, ``train/q_mean``...) and ``train/lr``
    (``train/lr_<i>`` for parameter group ``i`` > 0); at each epoch's end, ``epoch/<name>``,
    the epoch's mean of each (the ``training`` history of ``metrics.json``).

    A resumed phase begins again at the step its checkpoint holds; steps logged after that
    checkpoint, before the run stopped, come again (:meth:`begin_phase` says from where).

    Args:
        run_dir: the run folder (write inside it, e.g. ``run_dir / "tensorboard"``).
        options: the config's keys for this logger, validated by :attr:`Options`.
    """

    Options: type[LoggerOptions] = LoggerOptions

    def __init__(self, run_dir: Path, options: LoggerOptions):
        self.run_dir = Path(run_dir)
        self.options = options

    @classmethod
    def problems(cls) -> list[str]:
        """What keeps this logger from working on this machine (a missing package), as
        one-line messages; checked before any training."""
        return []

    def begin_phase(self, phase: str, step: int) -> None:
        """Training phase ``phase`` starts (``step`` 0) or resumes after step ``step``."""

    def log_scalars(self, phase: str, step: int, values: Mapping[str, float]) -> None:
        """Record ``values`` (tag -> number) of phase ``phase`` (its name as in ``run.log``:
        ``seed 0 little pretrain``) at ``step``."""
        raise NotImplementedError

    def flush(self, phase: str) -> None:
        """An epoch of ``phase`` ended and its checkpoint is written next: make what was
        logged so far durable (a run killed later resumes from that checkpoint)."""

    def end_phase(self, phase: str) -> None:
        """Phase ``phase`` finished or was interrupted (flush what it wrote)."""

    def close(self) -> None:
        """The run ended (or stopped); release what the logger holds."""


def logger_class(name: str) -> type[Logger]:
    """The logger class registered as ``name`` (or at dotted path ``name``).

    Raises:
        CascadeError: unknown name (the known ones listed), or not a :class:`Logger` subclass.
    """
    cls = LOGGERS.get(name)
    if not (isinstance(cls, type) and issubclass(cls, Logger)):
        raise CascadeError(f"{name!r} is not a logger (subclass cascade.Logger)")
    return cls
