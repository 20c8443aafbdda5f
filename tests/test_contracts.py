"""The same checks over every registered task, network and method (timm-style contract tests)."""

import copy
import typing

import pytest
import torch
from pydantic import BaseModel, ValidationError
from torch.utils.data import TensorDataset

from cascade import (
    METHODS,
    NETWORKS,
    TASKS,
    Approximator,
    BlackBoxOracle,
    CascadeContext,
    CascadeError,
    CrossEntropyTaskLoss,
    MaskedL2TaskLoss,
    MethodContext,
    MethodKind,
    MethodOptions,
    Mode,
    Predictor,
    PredictorHead,
    RoutedSystem,
    Splits,
    StageOutput,
    Task,
    TaskKind,
    TaskOptions,
    Trainer,
    TrainedMethod,
    TwoHeadNetwork,
    WhiteBoxOracle,
)
from cascade.training.data import make_loader, with_oracle_outputs
from cascade.training.optim import build_optimizer
from cascade.training.phase import freeze
from cascade.engine.checks import task_attribute_problems
from cascade.config import NetworkSpec, OptimConfig
from cascade.nn.cost import measure_cost
from cascade.methods import method_class, method_kind
from cascade.core.registry import Registry

#: input shapes for networks that no registered task uses by default (the CIFAR networks'
#: is the 32x32 they are designed for)
NETWORK_SHAPES = {"mlp": (1, 8, 8), "cnn": (1, 8, 8), "efficientnet_b0_cifar": (3, 32, 32),
                  "shufflenet_v2_cifar": (3, 32, 32), "resnet101_cifar": (3, 32, 32)}


def _network_shape(name: str) -> tuple[int, ...]:
    for task in TASKS.names():
        cls = TASKS.get(task)
        shape = getattr(cls, "input_shape", None)  # None: read from the task's data (image_folder)
        if shape is not None and name in {(cls.default_little or {}).get("name"), (cls.default_big or {}).get("name")}:
            return tuple(shape)
    if name not in NETWORK_SHAPES:
        pytest.fail(f"network {name!r}: no registered task uses it; declare its input shape in NETWORK_SHAPES")
    return NETWORK_SHAPES[name]


# ============================================================================ networks


@pytest.mark.parametrize("name", NETWORKS.names())
def test_network_contract(name):
    shape = _network_shape(name)
    torch.manual_seed(0)
    net = NETWORKS.get(name)(shape, 10)
    assert isinstance(net, Approximator) and isinstance(net.feature_dim, int)
    out = net(torch.randn(4, *shape))
    assert isinstance(out, StageOutput) and out.q is None
    assert out.output.shape == (4, 10) and out.features.shape == (4, net.feature_dim)
    assert torch.isfinite(out.output).all()
    out.output.sum().backward()
    assert all(p.grad is not None for p in net.parameters())
    assert measure_cost(net, shape).mflops > 0


@pytest.mark.parametrize("inputs", [["features"], ["sorted_probs", "confidence"], ["features", "sorted_probs", "confidence"]])
@pytest.mark.parametrize("detach", [False, True])
def test_two_head_gradients(inputs, detach):
    torch.manual_seed(0)
    base = NETWORKS.get("mlp")((1, 8, 8), 10, hidden=[16])
    net = TwoHeadNetwork(base, PredictorHead(16, 10, inputs, hidden=[8], detach=detach))
    out = net(torch.randn(5, 1, 8, 8))
    assert out.q.shape == (5,) and ((out.q > 0) & (out.q < 1)).all()
    (out.output.sum() + out.q.sum()).backward()
    assert all(p.grad is not None for p in net.parameters())
    # the predictor's gradient reaches the shared features only when not detached
    net.zero_grad()
    net(torch.randn(5, 1, 8, 8)).q.sum().backward()
    trunk = net.base.features[1][0].weight.grad
    assert (trunk is None or trunk.abs().sum() == 0) == detach


# ============================================================================ tasks


def _task_options(name: str, tmp_path) -> dict:
    """Options for the tasks that cannot be built without data (their shapes and classes
    come from it): a tiny folder written into ``tmp_path``; {} for the others."""
    if name != "image_folder":
        return {}
    from tests.test_image_tasks import write_tree

    write_tree(tmp_path / "images", n=2)
    return {"root": str(tmp_path / "images"), "test_fraction": 0.5}


@pytest.mark.parametrize("name", TASKS.names())
def test_task_contract(name, tmp_path, monkeypatch):
    # class-level only: nothing here reads the task's data (but image_folder's tiny folder)
    monkeypatch.setenv("CASCADE_CACHE", str(tmp_path / "cache"))
    cls = TASKS.get(name)
    assert isinstance(cls, type) and issubclass(cls, Task)
    assert issubclass(cls.Options, TaskOptions)
    task = cls(cls.Options.model_validate(_task_options(name, tmp_path)))
    assert task_attribute_problems(task) == []
    assert isinstance(task.criterion.kind, TaskKind)
    assert cls.default_little is not None, "a registered task gives a default routed stage"
    for spec in (cls.default_little, cls.default_big):
        if spec is None:
            continue
        net = NETWORKS.get(NetworkSpec.model_validate(spec).name)(task.input_shape, task.num_outputs,
                                                                  **NetworkSpec.model_validate(spec).kwargs())
        out = net(torch.zeros(2, *task.input_shape))
        assert out.output.shape == (2, task.num_outputs)
    if cls.default_big is None:  # the big side is a black box only: its cost may be declared
        assert cls.oracle_mflops is None or cls.oracle_mflops > 0


def test_digits_splits_are_stratified_and_fixed_by_seed():
    task = TASKS.get("digits")()
    a, b = task.build_splits(0), task.build_splits(0)
    assert torch.equal(a.test.tensors[1], b.test.tensors[1])
    n = len(a.train) + len(a.cal) + len(a.test)
    assert n == 1797 and abs(len(a.test) - 0.3 * n) < 2
    # every class in every split
    for split in (a.train, a.cal, a.test):
        assert len(torch.unique(split.tensors[1])) == 10


# ============================================================================ methods


class _TinyTask(Task):
    """8x8 inputs; 10 classes, or 4 regression outputs (some targets missing)."""

    input_shape = (1, 8, 8)

    def __init__(self, kind: TaskKind):
        super().__init__()
        self.kind = kind
        self.num_outputs = 10 if kind == TaskKind.CLASSIFICATION else 4
        self.criterion = CrossEntropyTaskLoss() if kind == TaskKind.CLASSIFICATION else MaskedL2TaskLoss(0.5)

    def data(self, n: int = 48) -> TensorDataset:
        g = torch.Generator().manual_seed(1)
        x = torch.randn(n, *self.input_shape, generator=g)
        if self.kind == TaskKind.CLASSIFICATION:
            return TensorDataset(x, torch.randint(0, 10, (n,), generator=g))
        y = torch.randn(n, 4, generator=g)
        y[::5, 1] = float("nan")  # a missing target
        return TensorDataset(x, y)

    def build_splits(self, seed: int) -> Splits:
        return Splits(self.data(), self.data(), self.data())


def _stage(task: _TinyTask, hidden: int, dropout: float = 0.0) -> Approximator:
    return NETWORKS.get("mlp")(task.input_shape, task.num_outputs, hidden=[hidden], dropout=dropout)


def _fit(model, objective, data, oc: OptimConfig, params=None, hooks=()):
    """One short training phase with the shared trainer."""
    opt, sched = build_optimizer(model.parameters() if params is None else params, oc)
    Trainer(model, objective, opt, make_loader(data, oc.batch_size, True, 0), oc.epochs, list(hooks), sched).train()


FINETUNE = OptimConfig(epochs=1, batch_size=16, lr=1e-2)


def _kinds(name: str) -> list[TaskKind]:
    return sorted(method_class(name).task_kinds, key=lambda k: k.value)


@pytest.mark.parametrize("name", METHODS.names())
def test_method_declares_options_kinds_and_defaults(name):
    cls = method_class(name)
    assert issubclass(cls, (Predictor, TrainedMethod))
    assert method_kind(cls) == (MethodKind.TRAINED if issubclass(cls, TrainedMethod) else MethodKind.POST_HOC)
    assert isinstance(cls.Options, type) and issubclass(cls.Options, BaseModel) and issubclass(cls.Options, MethodOptions)
    options = cls.Options()  # every option has a default: `- name` alone is a valid entry
    assert options.label is None
    with pytest.raises(ValidationError):
        cls.Options.model_validate({"surely_not_an_option": 1})
    assert cls.task_kinds and set(cls.task_kinds) <= set(TaskKind)
    assert set(cls.default_for) <= set(cls.task_kinds)
    assert cls(options).options is options


def test_every_task_kind_has_default_methods():
    from cascade.methods import build_methods

    for kind in TaskKind:
        entries = build_methods(None, kind)
        assert entries and all(kind in e.cls.task_kinds for e in entries)
        kinds = [e.kind for e in entries]
        assert kinds == sorted(kinds, key=lambda k: k != MethodKind.TRAINED)  # trained ones first


POST_HOC = [(n, k) for n in METHODS.names() if not issubclass(method_class(n), TrainedMethod) for k in _kinds(n)]
TRAINED = [(n, k, m) for n in METHODS.names() if issubclass(method_class(n), TrainedMethod) for k in _kinds(n)
           for m in Mode]


@pytest.mark.parametrize("name, kind", POST_HOC, ids=lambda v: getattr(v, "value", v))
def test_post_hoc_scores_are_in_unit_interval_one_per_input(name, kind):
    torch.manual_seed(0)
    task = _TinyTask(kind)
    net = freeze(_stage(task, 16, dropout=0.2))  # dropout: what mc_dropout samples
    method = method_class(name)()
    fits = []

    def fit(model, objective, data, oc, desc):
        fits.append(desc)
        _fit(model, objective, data, oc)

    cal = task.data(40)
    method.prepare(net, MethodContext(task=task, train=task.data(), seed=0, device=torch.device("cpu"), fit=fit,
                                      cal=cal, mode=Mode.WHITE_BOX, next_stage=net))
    if method.cal_scores is not None:  # out-of-sample scores of the calibration split, one per input
        assert method.cal_scores.shape == (len(cal),) and ((method.cal_scores >= 0) & (method.cal_scores <= 1)).all()
    x = task.data(7).tensors[0]
    with torch.no_grad():
        scores = method.score_batch(net, x)
    assert scores.shape == (7,)
    assert torch.isfinite(scores).all() and ((scores >= 0) & (scores <= 1)).all()
    if type(method).score_batch is Predictor.score_batch:  # one pass: score() reads that pass's output
        with torch.no_grad():
            stage = net(x)
        assert torch.equal(method.score(stage), scores)
        # routing is "score >= threshold": the lowest score keeps every input, a higher one not all
        assert method.route(stage, float(scores.min())).all()
        assert method.route(stage, float(scores.max())).any()
    if kind == TaskKind.CLASSIFICATION and type(method).score_batch is Predictor.score_batch:
        # overconfident logits saturate a float32 softmax: still within [0, 1]
        sharp = method.score(StageOutput(output=stage.output * 300, features=stage.features))
        assert sharp.shape == (7,) and ((sharp >= 0) & (sharp <= 1)).all()


@pytest.mark.parametrize("name, kind, mode", TRAINED, ids=lambda v: getattr(v, "value", v))
def test_trained_method_builds_and_trains_systems_of_stage_outputs(name, kind, mode):
    torch.manual_seed(0)
    task = _TinyTask(kind)
    pretrained = [_stage(task, 8), _stage(task, 16)]  # two routed stages: K = 3
    plain = [freeze(copy.deepcopy(n)) for n in pretrained]
    costs = [measure_cost(n, task.input_shape).mflops for n in plain]
    oracle = WhiteBoxOracle(_stage(task, 32), 0.05) if mode == Mode.WHITE_BOX else BlackBoxOracle(0.05)
    calls = []

    def fit(model, objective, data, desc="", param_groups=None, hooks=()):
        calls.append(desc)
        _fit(model, objective, data, FINETUNE, param_groups, hooks)

    ctx = CascadeContext(task=task, mode=mode, pretrained=pretrained, plain=plain, oracle=oracle,
                         stage_mflops=[*costs, 0.05], data=task.data(), finetune=FINETUNE, device=torch.device("cpu"),
                         fit=fit, with_oracle_outputs=lambda d, o: with_oracle_outputs(d, o, 64, torch.device("cpu")))
    method = method_class(name)()
    assert method.problems(task) == []
    systems = method.build(ctx)
    assert systems and all(isinstance(s, RoutedSystem) for s in systems)
    assert len({s.variant for s in systems}) == len(systems)  # variants name the systems apart
    before = [copy.deepcopy(s.module().state_dict()) for s in systems]
    method.train(systems, ctx)
    assert calls, "train() must train through context.fit (checkpointed, logged)"
    x = task.data(6).tensors[0]
    for system, start in zip(systems, before):
        assert len(system.stages) == len(pretrained)
        for stage in system.stages:
            stage.eval()
            with torch.no_grad():
                out = stage(x)
            assert isinstance(out, StageOutput)
            assert out.output.shape == (6, task.num_outputs)
            assert out.q is not None and out.q.shape == (6,) and ((out.q > 0) & (out.q < 1)).all()
        state = system.module().state_dict()
        assert any(not torch.equal(state[k], start[k]) for k in start), "training changed nothing"
        assert system.fixed_threshold is None or 0 < system.fixed_threshold < 1
    # the router rebuilds the systems untrained and loads the saved weights into them
    rebuilt = {s.variant: s for s in method.build(ctx)}
    for system in systems:
        rebuilt[system.variant].module().load_state_dict(system.module().state_dict())
    # the pre-trained stages are the method's to copy, not to train
    for net, frozen in zip(pretrained, plain):
        assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), frozen.state_dict().values()))


def test_method_head_inputs_match_the_network_code():
    from cascade.nn.networks import HEAD_INPUTS, HeadInput

    for name, key in (("appealnet", "predictor"), ("reinforce", "policy")):
        options = method_class(name).Options
        assert options.model_validate({key: {"inputs": list(HEAD_INPUTS)}})  # every input the code reads
        with pytest.raises(ValidationError):
            options.model_validate({key: {"inputs": ["not_an_input"]}})
        # the options name the network code's own list, not a copy of it
        inputs = options.model_fields[key].annotation.model_fields["inputs"].annotation
        assert inputs == typing.Optional[list[HeadInput]]


# ============================================================================ the registry


def test_registry_rejects_duplicates_and_lists_known_names():
    reg = Registry("thing")
    reg.register("a")(object)
    with pytest.raises(ValueError):
        reg.register("a")(object)
    with pytest.raises(CascadeError, match="known: a"):
        reg.get("b")


def test_dotted_path_reaches_a_class():
    assert TASKS.get("tasks.digits.DigitsTask").__name__ == "DigitsTask"
    assert method_class("baselines.confidence.MaxSoftmaxScore") is METHODS.get("msp")
    with pytest.raises(CascadeError, match="is not a routing method"):
        method_class("tasks.digits.DigitsTask")
