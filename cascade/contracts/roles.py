"""Temporary shim during the layout move (helper C): the roles moved to
cascade.contracts.{task,stages,methods} and cascade.core.enums. Removed before the end."""

from cascade.contracts.methods import MethodContext, MethodOptions, Predictor  # noqa: F401
from cascade.contracts.stages import Approximator, BlackBoxOracle, Oracle, StageOutput, WhiteBoxOracle  # noqa: F401
from cascade.contracts.task import Preprocessing, Splits, Task, TaskLoss, TaskOptions  # noqa: F401
from cascade.core.enums import Mode, TaskKind  # noqa: F401
