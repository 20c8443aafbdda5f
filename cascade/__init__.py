"""cascade: route each input to the cheapest network that is good enough.

The public API; everything else is private. Importing this package has no side effects
beyond defining classes and registering the built-in routing methods (AppealNet, the
REINFORCE stopping policy) and the ``tensorboard`` training logger; concrete tasks and
baselines are plugins, loaded on demand.
"""

from cascade.config import ExperimentConfig, load_config
from cascade.nn.cost import NetworkCost, measure_cost
from cascade.core.errors import CascadeError, CheckpointError, ConfigError, DataError, TrainingError
from cascade.nn.losses import CrossEntropyTaskLoss, MaskedL2TaskLoss
from cascade.contracts.methods import CascadeContext, MethodKind, RoutedSystem, TrainedMethod
from cascade.nn.networks import FeatureNet, PredictorHead, mlp
from cascade.nn.objectives import Objective, SupervisedObjective
from cascade.methods.appealnet import AppealNet, AppealNetObjective, LambdaControllerHook, TwoHeadNetwork
from cascade.training.augment import random_crop_flip
from cascade.methods.reinforce import MultiStageCascade, Reinforce, ReinforceObjective, StoppingPolicy
from cascade.core.registry import LOGGERS, METHODS, NETWORKS, TASKS, Registry
from cascade.contracts.loggers import Logger, LoggerOptions
from cascade.contracts.methods import MethodContext, MethodOptions, Predictor
from cascade.contracts.stages import Approximator, BlackBoxOracle, Oracle, StageOutput, WhiteBoxOracle
from cascade.contracts.task import Preprocessing, Splits, Task, TaskLoss, TaskOptions
from cascade.core.enums import Mode, Selection, TaskKind, ThresholdSource
from cascade.evaluation import CascadePoint, CascadeSweep, cascade_point, cascade_sweep
from cascade.training.checkpoint import CheckpointHook, CheckpointStore
from cascade.engine.experiment import Experiment
from cascade.deploy.router import RoutedOutput, Router
from cascade.deploy.bundle import Bundle, RoutedBatch
from cascade.deploy.inputs import InputFile, load_inputs
from cascade.training.hooks import HistoryHook, HookBase, ProgressHook
from cascade.training.loggers import LoggerHook, TensorBoardLogger
from cascade.training.trainer import Trainer

__all__ = [
    "AppealNet",
    "AppealNetObjective",
    "Approximator",
    "BlackBoxOracle",
    "Bundle",
    "CascadeContext",
    "CascadeError",
    "CascadePoint",
    "CascadeSweep",
    "CheckpointError",
    "CheckpointHook",
    "CheckpointStore",
    "ConfigError",
    "CrossEntropyTaskLoss",
    "DataError",
    "Experiment",
    "ExperimentConfig",
    "FeatureNet",
    "HistoryHook",
    "HookBase",
    "InputFile",
    "LambdaControllerHook",
    "LOGGERS",
    "Logger",
    "LoggerHook",
    "LoggerOptions",
    "MaskedL2TaskLoss",
    "METHODS",
    "MethodContext",
    "MethodKind",
    "MethodOptions",
    "Mode",
    "MultiStageCascade",
    "NETWORKS",
    "NetworkCost",
    "Objective",
    "Oracle",
    "Predictor",
    "PredictorHead",
    "Preprocessing",
    "ProgressHook",
    "Registry",
    "Reinforce",
    "ReinforceObjective",
    "RoutedBatch",
    "RoutedOutput",
    "RoutedSystem",
    "Selection",
    "Router",
    "Splits",
    "StageOutput",
    "StoppingPolicy",
    "SupervisedObjective",
    "TASKS",
    "Task",
    "TaskKind",
    "TaskLoss",
    "TaskOptions",
    "TensorBoardLogger",
    "ThresholdSource",
    "TrainedMethod",
    "Trainer",
    "TrainingError",
    "TwoHeadNetwork",
    "WhiteBoxOracle",
    "cascade_point",
    "cascade_sweep",
    "load_config",
    "load_inputs",
    "measure_cost",
    "mlp",
    "random_crop_flip",
]
