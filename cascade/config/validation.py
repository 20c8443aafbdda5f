"""Validation of a parsed config, before any work: the schema, the registry names (tasks,
networks, methods, loggers) and each component's own options, with every error's key path."""

from __future__ import annotations

import difflib
import inspect
import typing
from typing import Any

from pydantic import BaseModel, TypeAdapter, ValidationError

from cascade.config.migrations import migration_errors
from cascade.config.schema import ExperimentConfig, LoggerSpec, MethodSpec, NetworkSpec, method_spec
from cascade.contracts.loggers import logger_class
from cascade.contracts.methods import method_class
from cascade.contracts.task import Task
from cascade.core.enums import Mode
from cascade.core.errors import CascadeError, ConfigError
from cascade.core.registry import NETWORKS, TASKS


def _pydantic_errors(exc: ValidationError, prefix: str = "", model: type[BaseModel] | None = None) -> list[str]:
    out = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and "[" in p))
        key = ".".join(str(p) for p in (prefix.split(".") if prefix else []) + list(loc))
        if err["type"] == "extra_forbidden":
            msg = f"unknown key{_suggest(model, loc)}"
        else:
            msg = err["msg"].removeprefix("Value error, ")  # a validator's own message reads better alone
        out.append(f"{key or '<root>'}: {msg}")
    return out


def _suggest(model: type[BaseModel] | None, loc: tuple) -> str:
    """' (did you mean 'x'?)' for an unknown key, from the fields of the enclosing model."""
    if model is None:
        return ""
    for part in loc[:-1]:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            field = next((f for f in model.model_fields.values() if f.alias == part), None)
        ann = getattr(field, "annotation", None)
        inner = [a for a in typing.get_args(ann) if a is not type(None)]  # `Model | None` -> Model
        ann = inner[0] if len(inner) == 1 else ann
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return ""
        model = ann
    names = [f.alias or n for n, f in model.model_fields.items()]
    near = difflib.get_close_matches(str(loc[-1]), names, n=1)
    return f" (did you mean {near[0]!r}?)" if near else ""


def _check_kwargs(builder: Any, kwargs: dict[str, Any], key: str, fixed: tuple[str, ...]) -> list[str]:
    """Unknown keyword arguments of a network builder, and values its type hints refuse
    (``hidden: Sequence[PositiveInt]`` refuses ``[0]``), as config errors."""
    params = inspect.signature(builder).parameters
    errors = _kwarg_type_errors(builder, kwargs, key)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return errors
    allowed = [n for n in params if n not in fixed]
    for k in kwargs:
        if k not in allowed:
            near = difflib.get_close_matches(k, allowed, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            errors.append(f"{key}.{k}: unknown key{hint}; known: {', '.join(allowed) or 'none'}")
    return errors


def _kwarg_type_errors(builder: Any, kwargs: dict[str, Any], key: str) -> list[str]:
    """``kwargs`` validated against ``builder``'s type hints (pydantic, lax: a YAML ``2.0``
    is an int); hints that cannot be resolved or turned into a validator are skipped."""
    try:
        hints = typing.get_type_hints(builder.__init__ if isinstance(builder, type) else builder, include_extras=True)
    except Exception:  # a user's builder with hints that do not resolve here: not checked
        return []
    errors = []
    for name, value in kwargs.items():
        if name not in hints:
            continue
        try:
            adapter = TypeAdapter(hints[name])
        except Exception:  # e.g. type[nn.Module]: no validator; the builder checks it
            continue
        try:
            adapter.validate_python(value)
        except ValidationError as exc:
            errors += _pydantic_errors(exc, prefix=f"{key}.{name}")
    return errors


def _task_errors(task: Any, resolve_data: bool) -> tuple[Any, list[str]]:
    """``(task class or None, errors)`` of the raw ``task:`` mapping: its name, its options
    and, when those are valid, the data paths they name (see :func:`validate`)."""
    if not isinstance(task, dict) or not isinstance(task.get("name"), str):
        return None, []  # the schema reports a missing or mistyped task.name
    try:
        task_cls = TASKS.get(task["name"])
    except CascadeError as exc:
        return None, [f"task.name: {exc}"]
    if not (isinstance(task_cls, type) and issubclass(task_cls, Task)):
        return None, [f"task.name: {task['name']!r} is not a cascade.Task subclass"]
    try:
        options = task_cls.Options.model_validate({k: v for k, v in task.items() if k != "name"})
    except ValidationError as exc:
        return task_cls, _pydantic_errors(exc, prefix="task", model=task_cls.Options)
    return task_cls, [f"task.{p}" for p in task_cls.data_problems(options, configured_only=not resolve_data)]


def _spec_alone(model: type[BaseModel], value: Any) -> Any:
    """``value`` validated as ``model`` on its own, or None (the schema reports why), so that
    names and options are checked even while another key of the config is wrong."""
    try:
        return model.model_validate(value)
    except ValidationError:
        return None


def _network_errors(data: dict[str, Any]) -> list[str]:
    """Unknown network names and builder options of ``little``, ``stages`` and ``big``."""
    stages = data.get("stages")
    raw = [("little", data.get("little")), ("big", data.get("big"))] + \
        [(f"stages.{i}", s) for i, s in enumerate(stages if isinstance(stages, list) else [])]
    specs = [(key, _spec_alone(NetworkSpec, value)) for key, value in raw if value is not None]
    errors = []
    for key, spec in specs:
        if spec is None or spec.name is None:
            continue
        try:
            builder = NETWORKS.get(spec.name)
        except CascadeError as exc:
            errors.append(f"{key}.name: {exc}")
            continue
        if not callable(builder):
            errors.append(f"{key}.name: {spec.name!r} is not a network builder (a function or class)")
            continue
        errors += _check_kwargs(builder, spec.kwargs(), key, ("input_shape", "num_outputs"))
    return errors


def _method_errors(data: dict[str, Any]) -> list[str]:
    """Unknown method names and invalid method options (each method's own schema)."""
    errors, seen = [], set()
    methods = data.get("methods")
    for i, value in enumerate(methods if isinstance(methods, list) else []):
        spec = _spec_alone(MethodSpec, method_spec(value))
        if spec is None:
            continue
        try:
            cls = method_class(spec.name)
        except CascadeError as exc:
            errors.append(f"methods.{i}.name: {exc}")
            continue
        try:
            cls.Options.model_validate(spec.options())
        except ValidationError as exc:
            errors += _pydantic_errors(exc, prefix=f"methods.{i}", model=cls.Options)
        label = spec.options().get("label") or spec.name.rpartition(".")[2]
        if label in seen:
            errors.append(f"methods.{i}: {label!r} is listed twice (give one of them a label:)")
        seen.add(label)
    return errors


def _logger_errors(data: dict[str, Any], on_this_machine: bool) -> list[str]:
    """Unknown logger names and invalid logger options; with ``on_this_machine``, also a
    logger that cannot work here (its package is not installed)."""
    errors = []
    loggers = data.get("loggers")
    for i, value in enumerate(loggers if isinstance(loggers, list) else []):
        spec = _spec_alone(LoggerSpec, method_spec(value))
        if spec is None:
            continue
        try:
            cls = logger_class(spec.name)
        except CascadeError as exc:
            errors.append(f"loggers.{i}.name: {exc}")
            continue
        try:
            cls.Options.model_validate(spec.options())
        except ValidationError as exc:
            errors += _pydantic_errors(exc, prefix=f"loggers.{i}", model=cls.Options)
        if on_this_machine:
            errors += [f"loggers.{i}: {p}" for p in cls.problems()]
    return errors


def validate(data: dict[str, Any], path: str = "<config>", resolve_data: bool = False) -> ExperimentConfig:
    """Validate ``data`` completely, before any work.

    Checks the schema (unknown keys with the nearest known name, types, ranges), the
    registry names (tasks, networks, methods, loggers, listing the known ones), the
    task's, the networks', the methods' and the loggers' options, cross-key rules, and the data paths: a task class
    may define ``data_problems(options, configured_only) -> list[str]`` (each
    ``"<option>: <message>"``) naming the files its options point to that are missing,
    found without reading them. Keys of the configs before the single pipeline get a
    migration message. What needs the task's data and networks (shapes, label types,
    whether a method suits the task) is checked by :func:`cascade.engine.checks.check_task`.

    Args:
        data: the parsed config.
        path: the config file, in messages.
        resolve_data: also check data paths that come from the environment or the
            default data root, not only those the config sets, and that the loggers'
            packages are installed (``cascade run`` does; ``cascade validate`` checks the
            config itself, valid on any machine).

    Raises:
        ConfigError: every problem at once, each with its key path.
    """
    if not isinstance(data, dict):
        raise ConfigError(str(path), [f"<root>: a config is a mapping of keys, got {type(data).__name__}"])
    migrations = migration_errors(data)
    if migrations:
        raise ConfigError(str(path), migrations)
    errors: list[str] = []
    cfg = None
    try:
        cfg = ExperimentConfig.model_validate(data)
    except ValidationError as exc:
        errors += _pydantic_errors(exc, model=ExperimentConfig)
    task_cls, task_errors = _task_errors(data.get("task"), resolve_data)
    errors += task_errors + _network_errors(data) + _method_errors(data) + _logger_errors(data, resolve_data)
    if cfg is not None and task_cls is not None:
        errors += _cascade_errors(cfg, task_cls)
    if errors:
        raise ConfigError(str(path), errors)
    assert cfg is not None  # no schema error means a config
    return cfg


def _cascade_errors(cfg: ExperimentConfig, task_cls: Any) -> list[str]:
    """Rules across keys that need the task class: a big side for each mode."""
    errors = []
    if not cfg.stage_specs(getattr(task_cls, "default_little", None)):
        errors.append(f"little: the task {task_cls.__name__} has no default_little; set little: or stages:")
    if Mode.WHITE_BOX in cfg.modes and cfg.big is None and task_cls.default_big is None:
        errors.append("modes: white_box needs a big network; the task has none (set big: or use modes: [black_box])")
    unknown_cost = cfg.oracle_mflops is None and task_cls.oracle_mflops is None and cfg.big is None \
        and task_cls.default_big is None
    several = cfg.stages is not None and len(cfg.stages) > 1
    if Mode.BLACK_BOX in cfg.modes and unknown_cost and (several or cfg.evaluation.budgets):
        # two stages rank their points by appeal rate alone; more stages, or budgets, need the cost
        errors.append("oracle_mflops: the black-box oracle's cost is unknown, and routing "
                      f"{'several stages' if several else 'within budgets'} needs it; set it (MFLOPs per input)")
    return errors
