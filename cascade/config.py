"""Experiment configs: YAML data validated against a schema before any work.

``load_config`` reads a YAML file, applies ``--set key=value`` overrides (and the
config's own ``quick:`` overrides with ``--quick``), validates the whole thing and
raises :class:`ConfigError` listing every problem with its key path.
"""

from __future__ import annotations

import copy
import difflib
import inspect
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cascade.errors import CascadeError, ConfigError
from cascade.registry import METHODS, NETWORKS, TASKS

Fraction = Annotated[float, Field(ge=0.0, lt=1.0)]
#: what a predictor head or stopping policy may read (cascade.networks.HEAD_INPUTS)
HeadInput = Literal["features", "sorted_probs", "sorted_log_probs", "confidence", "logit_stats", "output"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class TaskSpec(BaseModel):
    """``task:`` the registry name (or dotted path) plus the task's own options."""

    model_config = ConfigDict(extra="allow")
    name: str


class NetworkSpec(BaseModel):
    """A network: registry name (or dotted path) plus its builder's keyword arguments."""

    model_config = ConfigDict(extra="allow")
    name: str

    def kwargs(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class OptimConfig(_Strict):
    """One training phase."""

    epochs: Annotated[int, Field(ge=0)] = 10
    batch_size: Annotated[int, Field(gt=0)] = 128
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: Annotated[float, Field(gt=0)] = 1e-3
    momentum: Fraction = 0.9
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    milestones: list[Annotated[int, Field(gt=0)]] = Field(default_factory=list)
    gamma: Annotated[float, Field(gt=0, le=1)] = 0.2


class PredictorConfig(_Strict):
    """The AppealNet predictor head. The paper's is ``inputs: [features], hidden: []``."""

    inputs: list[HeadInput] = Field(
        default_factory=lambda: ["sorted_probs", "confidence"], min_length=1
    )
    hidden: list[Annotated[int, Field(gt=0)]] = Field(default_factory=lambda: [16])
    detach: bool = True
    normalize: bool = False
    lr_scale: Annotated[float, Field(gt=0)] = 1.0


class LambdaConfig(_Strict):
    """The Lagrange multiplier and its dynamic controller (App. B.2)."""

    init: Annotated[float, Field(gt=0)] = 0.1
    dynamic: bool = True
    budget: Annotated[float, Field(gt=0)] = 0.5
    up: Annotated[float, Field(gt=0, lt=1)] = 0.99
    down: Annotated[float, Field(gt=1)] = 1.01


class AppealNetConfig(_Strict):
    """AppealNet's joint fine-tuning (after the little network's pre-training)."""

    predictor: PredictorConfig = Field(default_factory=PredictorConfig)
    lambda_: LambdaConfig = Field(default_factory=LambdaConfig, alias="lambda")
    approximator_loss: Literal["weighted", "full"] = "weighted"
    predictor_target: Literal["loss", "error"] = "loss"
    finetune: OptimConfig = Field(default_factory=lambda: OptimConfig(epochs=6))
    finetune_data: Literal["train", "holdout"] = "train"
    holdout_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.3


class EvaluationConfig(_Strict):
    white_box_targets: list[Fraction] = Field(default_factory=lambda: [0.0, 0.001, 0.005, 0.01], min_length=1)
    black_box_targets: list[Fraction] = Field(default_factory=lambda: [0.005, 0.01, 0.02, 0.05], min_length=1)
    methods: list[str] = Field(default_factory=lambda: ["msp", "gap", "entropy"])
    batch_size: Annotated[int, Field(gt=0)] = 1024


class StoppingPolicyConfig(_Strict):
    """The REINFORCE stopping policy of a multi-stage cascade (``cascade.policy``).

    ``inputs`` are what each policy head reads from its stage (as for the AppealNet
    predictor head; regression needs ``[output]`` or ``[features, output]``); ``shared``:
    one head for every stage with the stage index as an extra input, instead of one
    head per stage; ``detach``: the policy's gradient stops at its inputs.
    """

    inputs: list[HeadInput] = Field(
        default_factory=lambda: ["sorted_log_probs", "confidence"], min_length=1
    )
    hidden: list[Annotated[int, Field(gt=0)]] = Field(default_factory=lambda: [16])
    shared: bool = False
    detach: bool = True


class ReinforceConfig(_Strict):
    """Joint REINFORCE training of the stages and the stopping policy (``cascade.reinforce``).

    One cascade is trained per ``alphas`` value (the cost weight of the reward
    ``-L - alpha * cumulative_cost / c_K``); ``policy_lr`` is the policy's learning rate
    (default: ``finetune.lr``, the stages'); ``finetune_data: holdout`` pre-trains the
    stages on all but ``holdout_fraction`` of the training split and runs every method's
    fine-tuning on that held-out part; see :mod:`cascade.multistage` for the rest.
    """

    alphas: list[Annotated[float, Field(ge=0)]] = Field(default_factory=lambda: [0.1], min_length=1)
    threshold: Annotated[float, Field(gt=0, lt=1)] = 0.5
    reward: Literal["loss", "error"] = "loss"
    baseline: Literal["batch_mean", "moving_average", "self_critical", "sample_mean"] = "batch_mean"
    momentum: Fraction = 0.9
    samples: Annotated[int, Field(ge=1)] = 1
    policy_lr: Annotated[float, Field(gt=0)] | None = None
    aux_weight: Annotated[float, Field(ge=0)] = 1.0
    entropy_weight: Annotated[float, Field(ge=0)] = 0.0
    finetune: OptimConfig = Field(default_factory=lambda: OptimConfig(epochs=6))
    finetune_data: Literal["train", "holdout"] = "train"
    holdout_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.3

    @model_validator(mode="after")
    def _samples_for_sample_mean(self) -> "ReinforceConfig":
        if self.baseline == "sample_mean" and self.samples < 2:
            raise ValueError("baseline: sample_mean needs samples >= 2 (trajectories per input)")
        return self


class CascadeConfig(_Strict):
    """A K-stage cascade (``cascade:``); when present, ``cascade run`` runs the
    multi-stage experiment (:mod:`cascade.multistage_experiment`) instead of AppealNet's.

    ``stages`` are the networks, cheapest first, each pre-trained with ``pretrain``;
    ``oracle: black_box`` appends a black-box last stage (always right, cost
    ``oracle_mflops`` or the task's); ``budgets`` are mean costs, as fractions of the last
    stage's, at which every method's accuracy is reported.
    """

    stages: list[NetworkSpec] = Field(min_length=1)
    oracle: Literal["none", "black_box"] = "none"
    oracle_mflops: Annotated[float, Field(gt=0)] | None = None
    policy: StoppingPolicyConfig = Field(default_factory=StoppingPolicyConfig)
    reinforce: ReinforceConfig = Field(default_factory=ReinforceConfig)
    appealnet_cascade: bool = True
    budgets: list[Annotated[float, Field(gt=0, le=1)]] = Field(default_factory=lambda: [0.1, 0.2, 0.5])

    @model_validator(mode="after")
    def _at_least_two_stages(self) -> "CascadeConfig":
        if len(self.stages) + (self.oracle == "black_box") < 2:
            raise ValueError("a cascade needs at least 2 stages (networks, plus the oracle when oracle: black_box)")
        return self


class ExperimentConfig(_Strict):
    """The whole experiment; see ``configs/digits.yaml`` for every key in use."""

    name: str | None = None
    task: TaskSpec
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    modes: list[Literal["white_box", "black_box"]] = Field(
        default_factory=lambda: ["white_box", "black_box"], min_length=1
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    #: CPU threads for torch (None: torch's default). Networks this small run faster on
    #: one thread than on two when other processes share the cores.
    threads: Annotated[int, Field(gt=0)] | None = None
    little: NetworkSpec | None = None
    big: NetworkSpec | None = None
    pretrain: OptimConfig = Field(default_factory=OptimConfig)
    big_train: OptimConfig = Field(default_factory=OptimConfig)
    appealnet: AppealNetConfig = Field(default_factory=AppealNetConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    cascade: CascadeConfig | None = None
    quick: dict[str, Any] = Field(default_factory=dict)

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError("seeds must be distinct")
        return v


# --------------------------------------------------------------------------- loading


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key given twice in one mapping (YAML keeps the
    last silently, so a repeated ``pretrain:`` block would drop the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Parse a YAML mapping; errors name the file (and the line, for malformed YAML).

    Raises:
        CascadeError: missing or unreadable file, malformed YAML (with its line), a key
            given twice, or a document that is not a mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise CascadeError(f"{path}: config file not found")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise CascadeError(f"{path}: cannot read the config ({exc})") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: plain data only, like safe_load
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise CascadeError(f"{path}: {where}malformed YAML: {problem}") from None
    if not isinstance(data, dict):
        raise CascadeError(f"{path}: a config must be a YAML mapping, got {type(data).__name__}")
    return data


def apply_override(data: dict[str, Any], assignment: str, source: str = "--set") -> None:
    """Apply ``a.b.c=value`` to nested ``data`` in place; ``value`` is parsed as YAML."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise CascadeError(f"{source} {assignment!r}: expected key=value")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        raise CascadeError(f"{source} {assignment!r}: value is not valid YAML") from None
    set_path(data, key, value, source)


def set_path(data: dict[str, Any], key: str, value: Any, source: str = "--set") -> None:
    """``data[a][b][c] = value`` for ``key = "a.b.c"``, creating mappings on the way."""
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise CascadeError(f"{source} {key}: {part!r} is not a mapping")
        node = child
    node[parts[-1]] = value


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
    """Unknown keyword arguments of a network builder, as config errors."""
    params = inspect.signature(builder).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return []
    allowed = [n for n in params if n not in fixed]
    errors = []
    for k in kwargs:
        if k not in allowed:
            near = difflib.get_close_matches(k, allowed, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            errors.append(f"{key}.{k}: unknown key{hint}; known: {', '.join(allowed)}")
    return errors


def _cascade_errors(cfg: ExperimentConfig, task_cls: Any) -> list[str]:
    """Problems of the ``cascade:`` section that need the registries (stage networks)."""
    if cfg.cascade is None:
        return []
    errors = [f"{role}: not used with cascade: (list the networks under cascade.stages)"
              for role in ("little", "big") if getattr(cfg, role) is not None]
    for i, spec in enumerate(cfg.cascade.stages):
        try:
            builder = NETWORKS.get(spec.name)
        except CascadeError as exc:
            errors.append(f"cascade.stages.{i}.name: {exc}")
            continue
        errors += _check_kwargs(builder, spec.kwargs(), f"cascade.stages.{i}", ("input_shape", "num_outputs"))
    for i, method in enumerate(cfg.evaluation.methods):
        if method in ("appealnet", "reinforce"):
            errors.append(f"evaluation.methods.{i}: {method!r} is built into the cascade experiment "
                          "(list per-stage scores such as msp, gap, entropy here)")
    if (cfg.cascade.oracle == "black_box" and cfg.cascade.oracle_mflops is None and task_cls is not None
            and task_cls.oracle_mflops is None):
        errors.append("cascade.oracle_mflops: the black-box oracle's cost is unknown; set it (MFLOPs per input)")
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
    options_cls = getattr(task_cls, "Options", None)
    if options_cls is None:
        return task_cls, [f"task.name: {task['name']!r} is not a Task (it has no Options)"]
    try:
        options = options_cls.model_validate({k: v for k, v in task.items() if k != "name"})
    except ValidationError as exc:
        return task_cls, _pydantic_errors(exc, prefix="task", model=options_cls)
    problems = getattr(task_cls, "data_problems", None)
    if problems is None:
        return task_cls, []
    return task_cls, [f"task.{p}" for p in problems(options, configured_only=not resolve_data)]


def _name_errors(data: dict[str, Any]) -> list[str]:
    """Unknown network and method names (and network options) in the raw config, so that
    they are reported together with the schema's errors, not after those are fixed."""
    errors = []
    for role in ("little", "big"):
        spec = data.get(role)
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            continue
        try:
            builder = NETWORKS.get(spec["name"])
        except CascadeError as exc:
            errors.append(f"{role}.name: {exc}")
            continue
        errors += _check_kwargs(builder, {k: v for k, v in spec.items() if k != "name"}, role,
                                ("input_shape", "num_outputs"))
    evaluation = data.get("evaluation")
    methods = evaluation.get("methods") if isinstance(evaluation, dict) else None
    for i, method in enumerate(methods if isinstance(methods, list) else []):
        if isinstance(method, str) and method not in METHODS:
            errors.append(f"evaluation.methods.{i}: {METHODS.unknown_message(method)}")
    return errors


def validate(data: dict[str, Any], path: str = "<config>", resolve_data: bool = False) -> ExperimentConfig:
    """Validate ``data`` completely, before any work.

    Checks the schema (unknown keys with the nearest known name, types, ranges), the
    registry names (tasks, networks, methods, listing the known ones), the task's and the
    networks' options, cross-key rules, and the data paths: a task class may define
    ``data_problems(options, configured_only) -> list[str]`` (each ``"<option>:
    <message>"``) naming the files its options point to that are missing, found without
    reading them.

    Args:
        data: the parsed config.
        path: the config file, in messages.
        resolve_data: also check data paths that come from the environment or the
            default data root, not only those the config sets (``cascade run`` does;
            ``cascade validate`` checks the config itself, valid on any machine).

    Raises:
        ConfigError: every problem at once, each with its key path.
    """
    if not isinstance(data, dict):
        raise ConfigError(str(path), [f"<root>: a config is a mapping of keys, got {type(data).__name__}"])
    errors: list[str] = []
    cfg = None
    try:
        cfg = ExperimentConfig.model_validate(data)
    except ValidationError as exc:
        errors += _pydantic_errors(exc, model=ExperimentConfig)
    task_cls, task_errors = _task_errors(data.get("task"), resolve_data)
    errors += task_errors + _name_errors(data)
    if cfg is not None:
        errors += _cascade_errors(cfg, task_cls)
        big_missing = task_cls is not None and cfg.big is None and task_cls.default_big is None
        if cfg.cascade is None and "white_box" in cfg.modes and big_missing:
            errors.append("modes: white_box needs a big network; the task has none (set big: or use modes: [black_box])")
    if errors:
        raise ConfigError(str(path), errors)
    assert cfg is not None  # no schema error means a config
    return cfg


def load_config(
    path: str | Path, overrides: list[str] = (), quick: bool = False, resolve_data: bool = False
) -> ExperimentConfig:
    """Read, override and validate a config file.

    Args:
        path: the YAML file.
        overrides: ``key=value`` strings, applied in order after the file; an error in a
            key they set says so.
        quick: also apply the config's ``quick:`` overrides (a few steps, for tests).
        resolve_data: see :func:`validate`.

    Raises:
        CascadeError: unreadable or malformed file, bad override.
        ConfigError: the config (with overrides) fails validation.
    """
    data = read_yaml(path)
    if quick:
        q = data.get("quick") or {}
        if not isinstance(q, dict):
            raise ConfigError(str(path), ["quick: must be a mapping of key: value overrides"])
        for key, value in q.items():
            set_path(data, str(key), copy.deepcopy(value), f"{path}: quick")
    for assignment in overrides:
        apply_override(data, assignment)
    try:
        return validate(data, str(path), resolve_data)
    except ConfigError as exc:
        raise ConfigError(exc.path, [_blame_override(e, overrides) for e in exc.errors]) from None


def _blame_override(error: str, overrides: list[str]) -> str:
    """``error``, plus which ``--set`` gave the value when one set that key (or a parent)."""
    key = error.split(": ", 1)[0]
    for assignment in reversed(overrides):  # the last one wins, as when applying them
        set_key = assignment.partition("=")[0]
        if key == set_key or key.startswith(set_key + ".") or set_key.startswith(key + "."):
            return f"{error} (from --set {assignment})"
    return error


def resolved_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    """The config as plain data, every default filled in (what ``config.yaml`` holds)."""
    return copy.deepcopy(cfg.model_dump(mode="json", by_alias=True))
