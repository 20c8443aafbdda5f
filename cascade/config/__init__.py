"""Experiment configs: YAML data validated against a schema before any work.

``load_config`` reads a YAML file, applies ``--set key=value`` overrides (and the
config's own ``quick:`` overrides with ``--quick``), validates the whole thing and
raises :class:`ConfigError` listing every problem with its key path.

- :mod:`~cascade.config.schema`: the pydantic models (:class:`ExperimentConfig`, ...);
- :mod:`~cascade.config.loading`: YAML, ``--set`` and ``quick:`` overrides;
- :mod:`~cascade.config.validation`: the schema and the registries, every error at once;
- :mod:`~cascade.config.migrations`: messages for the keys of older configs;
- :mod:`~cascade.config.limits`: size limits, checked before the expensive work.
"""

from cascade.config.loading import apply_override, load_config, read_yaml, set_path
from cascade.config.migrations import MIGRATIONS
from cascade.config.schema import (
    ChecksConfig,
    EvaluationConfig,
    ExperimentConfig,
    MethodSpec,
    NetworkSpec,
    OptimConfig,
    TaskSpec,
    resolved_dict,
)
from cascade.config.validation import validate
from cascade.core.errors import ConfigError

__all__ = [
    "MIGRATIONS",
    "ChecksConfig",
    "ConfigError",
    "EvaluationConfig",
    "ExperimentConfig",
    "MethodSpec",
    "NetworkSpec",
    "OptimConfig",
    "TaskSpec",
    "apply_override",
    "load_config",
    "read_yaml",
    "resolved_dict",
    "set_path",
    "validate",
]
