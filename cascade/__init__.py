"""cascade: route each input to the cheapest network that is good enough.

The public API; everything else is private. Importing this package has no side effects
beyond defining classes (concrete tasks and baselines are plugins, loaded on demand).
"""

from cascade.config import ExperimentConfig, load_config
from cascade.cost import NetworkCost, measure_cost
from cascade.errors import CascadeError, CheckpointError, ConfigError, DataError, TrainingError
from cascade.losses import CrossEntropyTaskLoss, MaskedL2TaskLoss
from cascade.multistage import MultiStageCascade, ReinforceObjective, ReinforceStopScore, StoppingPolicy
from cascade.networks import AppealNetScore, FeatureNet, PredictorHead, TwoHeadNetwork, mlp
from cascade.objectives import AppealNetObjective, Objective, SupervisedObjective
from cascade.registry import METHODS, NETWORKS, TASKS, Registry
from cascade.router import RoutedOutput, Router
from cascade.roles import (
    BlackBoxOracle,
    MethodContext,
    Oracle,
    Predictor,
    Splits,
    StageOutput,
    Task,
    TaskLoss,
    TaskOptions,
    WhiteBoxOracle,
)
from cascade.thresholds import OperatingPoint, Sweep, apply_threshold, select_threshold, sweep
from cascade.checkpoint import CheckpointHook, CheckpointStore
from cascade.trainer import HistoryHook, HookBase, LambdaControllerHook, ProgressHook, Trainer

__all__ = [
    "AppealNetObjective",
    "AppealNetScore",
    "BlackBoxOracle",
    "CascadeError",
    "CheckpointError",
    "CheckpointHook",
    "CheckpointStore",
    "ConfigError",
    "CrossEntropyTaskLoss",
    "DataError",
    "ExperimentConfig",
    "FeatureNet",
    "HistoryHook",
    "HookBase",
    "LambdaControllerHook",
    "MaskedL2TaskLoss",
    "METHODS",
    "MethodContext",
    "MultiStageCascade",
    "NETWORKS",
    "NetworkCost",
    "Objective",
    "OperatingPoint",
    "Oracle",
    "Predictor",
    "PredictorHead",
    "ProgressHook",
    "Registry",
    "RoutedOutput",
    "Router",
    "ReinforceObjective",
    "ReinforceStopScore",
    "Splits",
    "StageOutput",
    "StoppingPolicy",
    "SupervisedObjective",
    "Sweep",
    "TASKS",
    "Task",
    "TaskLoss",
    "TaskOptions",
    "TrainingError",
    "Trainer",
    "TwoHeadNetwork",
    "WhiteBoxOracle",
    "apply_threshold",
    "load_config",
    "measure_cost",
    "mlp",
    "select_threshold",
    "sweep",
]
