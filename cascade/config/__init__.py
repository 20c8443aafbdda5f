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
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from cascade.config.limits import MAX_ITEMS, check_file_size, check_value_count
from cascade.core.errors import CascadeError, ConfigError
from cascade.nn.perturb import PerturbConfig
from cascade.core.registry import NETWORKS, TASKS

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
    def _name_or_checkpoint(self) -> "NetworkSpec":
        if self.name is None and self.checkpoint is None:
            raise ValueError("name: a network needs a name (a registered network or a dotted path)")
        if self.checkpoint is not None and self.trained:
            raise ValueError("checkpoint: give checkpoint: or trained: true, not both")
        return self

    def resolved(self, default: dict[str, Any] | None) -> "NetworkSpec":
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
    def _consistent(self) -> "OptimConfig":
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
    delta: Annotated[float, Field(gt=0, lt=1)] = 0.1
    violation_resplits: Annotated[int, Field(ge=0, le=100_000)] = 200
    batch_size: Annotated[int, Field(gt=0)] = 1024


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


def _method_spec(value: Any) -> Any:
    return {"name": value} if isinstance(value, str) else value


class ExperimentConfig(_Strict):
    """The whole experiment; see ``configs/digits.yaml`` for every key in use.

    The cascade is ``stages`` (or ``little``, the one-stage shorthand: AppealNet's case),
    cheapest first, then the big side: the ``big`` network in ``white_box`` mode, a
    black-box oracle (always right, cost ``oracle_mflops``) in ``black_box`` mode.
    """

    name: str | None = None
    task: TaskSpec
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1, max_length=MAX_ITEMS)
    modes: list[Literal["white_box", "black_box"]] = Field(
        default_factory=lambda: ["white_box", "black_box"], min_length=1
    )
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
    #: routing methods; None: the task kind's defaults (see cascade.methods.default_methods)
    methods: list[Annotated[MethodSpec, BeforeValidator(_method_spec)]] | None = Field(default=None, min_length=1,
                                                                                      max_length=MAX_ITEMS)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    #: label noise, a specialist big network, test-time corruptions (cascade.nn.perturb); none by default
    perturb: PerturbConfig = Field(default_factory=PerturbConfig)
    checks: ChecksConfig = Field(default_factory=ChecksConfig)
    quick: dict[str, Any] = Field(default_factory=dict)

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError("seeds must be distinct")
        return v

    @model_validator(mode="after")
    def _one_stage_list(self) -> "ExperimentConfig":
        if self.little is not None and self.stages is not None:
            raise ValueError("set little: (one stage) or stages: (several), not both")
        return self

    def stage_specs(self, task_default: dict[str, Any] | None) -> list["NetworkSpec"]:
        """The routed stages, cheapest first: ``stages``, ``[little]``, or the task's default."""
        if self.stages is not None:
            return list(self.stages)
        if self.little is not None:
            return [self.little]
        return [NetworkSpec.model_validate(task_default)] if task_default else []


#: keys of the configs before the single pipeline, with what replaces each (a one-line
#: migration error instead of "unknown key")
MIGRATIONS = {
    "appealnet": "AppealNet is a routing method now: list it under methods: as {name: appealnet, ...} with the "
                 "same predictor/lambda/approximator_loss/predictor_target keys; appealnet.finetune is the "
                 "top-level finetune:",
    "cascade": "a K-stage cascade is stages: [...] (the routed networks) plus big: (its last network, white-box) or "
               "modes: [black_box] with oracle_mflops:; cascade.methods.reinforce and cascade.policy are the options of "
               "methods: [{name: reinforce, policy: ..., alphas: ...}], cascade.budgets is evaluation.budgets",
    "evaluation.methods": "moved to the top-level methods: list",
}


def _migration_errors(data: dict[str, Any]) -> list[str]:
    errors = [f"{key}: {why}" for key, why in MIGRATIONS.items() if "." not in key and key in data]
    evaluation = data.get("evaluation")
    if isinstance(evaluation, dict) and "methods" in evaluation:
        errors.append(f"evaluation.methods: {MIGRATIONS['evaluation.methods']}")
    return errors


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
        CascadeError: missing or unreadable file, one too big (before it is read) or holding
            too many values (:mod:`cascade.config.limits`), malformed YAML
            (with its line), a key given twice, or a document that is not a mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise CascadeError(f"{path}: config file not found")
    check_file_size(path)
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
    check_value_count(path, data)
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
    """``data[a][b][c] = value`` for ``key = "a.b.c"``, creating mappings on the way; a
    number indexes a list (``methods.0.alphas``)."""
    node: Any = data
    parts = key.split(".")
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not (part.isdigit() and int(part) < len(node)):
                raise CascadeError(f"{source} {key}: {part!r} is not an index of the list at "
                                   f"{'.'.join(parts[:i]) or '<root>'} ({len(node)} items)")
            if last:
                node[int(part)] = value
                return
            child = node[int(part)]
            if isinstance(child, str):  # a method given by name alone: {name: ...} takes options
                child = node[int(part)] = {"name": child}
            node = child
            continue
        if not isinstance(node, dict):
            raise CascadeError(f"{source} {key}: {parts[i - 1]!r} is not a mapping")
        if last:
            node[part] = value
            return
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        node = child


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
    from cascade.contracts.roles import Task

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
    from cascade.methods import method_class

    errors, seen = [], set()
    methods = data.get("methods")
    for i, value in enumerate(methods if isinstance(methods, list) else []):
        spec = _spec_alone(MethodSpec, _method_spec(value))
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


def validate(data: dict[str, Any], path: str = "<config>", resolve_data: bool = False) -> ExperimentConfig:
    """Validate ``data`` completely, before any work.

    Checks the schema (unknown keys with the nearest known name, types, ranges), the
    registry names (tasks, networks, methods, listing the known ones), the task's, the
    networks' and the methods' options, cross-key rules, and the data paths: a task class
    may define ``data_problems(options, configured_only) -> list[str]`` (each
    ``"<option>: <message>"``) naming the files its options point to that are missing,
    found without reading them. Keys of the configs before the single pipeline get a
    migration message. What needs the task's data and networks (shapes, label types,
    whether a method suits the task) is checked by :func:`cascade.engine.checks.check_task`.

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
    migrations = _migration_errors(data)
    if migrations:
        raise ConfigError(str(path), migrations)
    errors: list[str] = []
    cfg = None
    try:
        cfg = ExperimentConfig.model_validate(data)
    except ValidationError as exc:
        errors += _pydantic_errors(exc, model=ExperimentConfig)
    task_cls, task_errors = _task_errors(data.get("task"), resolve_data)
    errors += task_errors + _network_errors(data) + _method_errors(data)
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
    if "white_box" in cfg.modes and cfg.big is None and task_cls.default_big is None:
        errors.append("modes: white_box needs a big network; the task has none (set big: or use modes: [black_box])")
    unknown_cost = cfg.oracle_mflops is None and task_cls.oracle_mflops is None and cfg.big is None \
        and task_cls.default_big is None
    several = cfg.stages is not None and len(cfg.stages) > 1
    if "black_box" in cfg.modes and unknown_cost and (several or cfg.evaluation.budgets):
        # two stages rank their points by appeal rate alone; more stages, or budgets, need the cost
        errors.append("oracle_mflops: the black-box oracle's cost is unknown, and routing "
                      f"{'several stages' if several else 'within budgets'} needs it; set it (MFLOPs per input)")
    return errors


def load_config(
    path: str | Path, overrides: list[str] = (), quick: bool = False, resolve_data: bool = False
) -> ExperimentConfig:
    """Read, override and validate a config file, as it runs and as ``--quick`` runs it.

    Both are validated whichever is asked for, and their errors reported together (those
    of the ``--quick`` form only marked so): ``cascade validate`` then vouches for
    ``run --quick`` too, and a value that a ``quick:`` override replaces must still be
    valid for the full run.

    Args:
        path: the YAML file.
        overrides: ``key=value`` strings, applied in order after the file (and after the
            ``quick:`` overrides); an error in a key they set says so.
        quick: return the config with its ``quick:`` overrides applied (a few steps, for tests).
        resolve_data: see :func:`validate`.

    Raises:
        CascadeError: unreadable or malformed file, bad override.
        ConfigError: the config (with overrides), or its ``--quick`` form, fails validation.
    """
    data = read_yaml(path)
    full = copy.deepcopy(data)
    for assignment in overrides:
        apply_override(full, assignment)
    cfg, errors = _validated(full, path, overrides, resolve_data)
    q = data.get("quick")
    if isinstance(q, dict) and q:  # not a mapping: the schema says so
        fast = copy.deepcopy(data)
        quick_errors: list[str] = []
        for key, value in q.items():
            try:
                set_path(fast, str(key), copy.deepcopy(value), "quick:")
            except CascadeError as exc:
                quick_errors.append(str(exc))
        for assignment in overrides:
            apply_override(fast, assignment)
        quick_cfg, more = _validated(fast, path, overrides, resolve_data) if not quick_errors else (None, [])
        errors += [f"{e} (with --quick{_quick_blame(e, q)})" for e in quick_errors + more if e not in errors]
        if quick:
            cfg = quick_cfg
    if errors:
        raise ConfigError(str(path), errors)
    assert cfg is not None  # no error means a config
    return cfg


def _validated(data: dict[str, Any], path: str | Path, overrides: list[str],
               resolve_data: bool) -> tuple[ExperimentConfig | None, list[str]]:
    """``(config, [])``, or ``(None, errors)`` with the ``--set`` that gave each value named."""
    try:
        return validate(data, str(path), resolve_data), []
    except ConfigError as exc:
        return None, [_blame_override(e, overrides) for e in exc.errors]


def _quick_blame(error: str, quick: dict[str, Any]) -> str:
    """``, from quick: KEY`` when a ``quick:`` override set the key of ``error`` (or a parent)."""
    set_key = _setter(error, [str(k) for k in quick])
    return f", from quick: {set_key}" if set_key is not None else ""


def _blame_override(error: str, overrides: list[str]) -> str:
    """``error``, plus which ``--set`` gave the value when one set that key (or a parent)."""
    for assignment in reversed(overrides):  # the last one wins, as when applying them
        if _setter(error, [assignment.partition("=")[0]]) is not None:
            shown = assignment if len(assignment) <= 80 else assignment[:77] + "..."
            return f"{error} (from --set {shown})"
    return error


def _setter(error: str, keys: list[str]) -> str | None:
    """The last of ``keys`` that set the key ``error`` names, a parent or a child of it."""
    key = error.split(": ", 1)[0]
    for set_key in reversed(keys):  # the last one wins, as when applying them
        if key == set_key or key.startswith(set_key + ".") or set_key.startswith(key + "."):
            return set_key
    return None


def resolved_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    """The config as plain data, every default filled in (what ``config.yaml`` holds)."""
    return copy.deepcopy(cfg.model_dump(mode="json", by_alias=True))
