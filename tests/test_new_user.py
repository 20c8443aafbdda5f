"""A new user's own task, written outside the repository and named by dotted path.

Each mistake a new user makes (issue 8, "A new user's own task") is refused before any
training, by ``cascade run`` and by ``cascade validate`` alike, in one line (exit 2, no
traceback) that names the class, key or split and, where there is one, the fix. What is
right runs: a regression task with no ``methods:`` gets the regression defaults.
"""

from __future__ import annotations

import json
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import torch

from cascade.cli import main
from tests.conftest import REPO

#: the user's module: tasks and network builders, each with one mistake (or none)
USER_MODULE = '''
"""My own tasks: 300 inputs of 8 features, 3 classes (or one regression target)."""
import math

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from cascade import CrossEntropyTaskLoss, FeatureNet, MaskedL2TaskLoss, Splits, Task

N, DIM = 300, 8


def blobs(seed, classes=3):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(N) % classes
    x = 3 * torch.randn(classes, DIM, generator=g)[y] + torch.randn(N, DIM, generator=g)
    return x, y


def three_splits(x, y, wrap=TensorDataset):
    return Splits(wrap(x[:180], y[:180]), wrap(x[180:240], y[180:240]), wrap(x[240:], y[240:]))


class Blobs(Task):
    input_shape = (DIM,)
    num_outputs = 3
    default_little = {"name": "mlp", "hidden": [16]}
    default_big = {"name": "mlp", "hidden": [64]}

    def __init__(self, options=None):
        super().__init__(options)
        self.criterion = CrossEntropyTaskLoss()

    def build_splits(self, seed):
        return three_splits(*blobs(seed))


class Line(Blobs):
    """Regression: one real-valued target per input, shaped [N, 1]."""
    num_outputs = 1

    def __init__(self, options=None):
        Task.__init__(self, options)
        self.criterion = MaskedL2TaskLoss(threshold=0.5)

    def targets(self, x):
        return x.sum(dim=1, keepdim=True) / math.sqrt(DIM)

    def build_splits(self, seed):
        x, _ = blobs(seed)
        return three_splits(x, self.targets(x))


class FlatTargets(Line):
    def targets(self, x):
        return x.sum(dim=1) / math.sqrt(DIM)  # [N]: the network outputs [N, 1]


class NoCriterion(Blobs):
    def __init__(self, options=None):
        Task.__init__(self, options)


class NoDefaultLittle(Blobs):
    default_little = None


class WrongInputShape(Blobs):
    input_shape = (1, 28, 28)  # copied from an MNIST example; the inputs are [8]


class FloatLabels(Blobs):
    def build_splits(self, seed):
        x, y = blobs(seed)
        return three_splits(x, y.float())


class Int32TestLabels(Blobs):
    def build_splits(self, seed):
        x, y = blobs(seed)
        splits = three_splits(x, y)
        splits.test = TensorDataset(x[240:], torch.from_numpy(y[240:].numpy().astype(np.int32)))
        return splits


class LabelsFromOne(Blobs):
    def build_splits(self, seed):
        x, y = blobs(seed)
        return three_splits(x, y + 1)  # classes 1, 2, 3 of a 3-class task


class NumpySplits(Blobs):
    def build_splits(self, seed):
        x, y = blobs(seed)
        return three_splits(x.numpy(), y.numpy(), wrap=lambda a, b: (a, b))


class Float64Inputs(Blobs):
    def build_splits(self, seed):
        x, y = blobs(seed)
        x64, y64 = np.asarray(x, dtype=np.float64), np.asarray(y)
        return three_splits(torch.from_numpy(x64), torch.from_numpy(y64))


class FiveOutputs(Blobs):
    num_outputs = 5  # the data hold classes 0, 1, 2


def hard_coded(input_shape, num_outputs, hidden=16):
    """Ignores input_shape: written for 64 inputs."""
    return FeatureNet(nn.Sequential(nn.Linear(64, hidden), nn.ReLU()), nn.Linear(hidden, num_outputs), hidden)


def sequential(input_shape, num_outputs, hidden=16):
    """A plain nn.Sequential: no StageOutput, no features."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), hidden), nn.ReLU(),
                         nn.Linear(hidden, num_outputs))


def seven_outputs(input_shape, num_outputs, hidden=16):
    """Ignores num_outputs."""
    return FeatureNet(nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), hidden), nn.ReLU()),
                      nn.Linear(hidden, 7), hidden)
'''

#: a tiny run: one seed, one epoch per phase, white-box only
BASE_CONFIG = """\
task: {{name: {task}}}
seeds: [0]
modes: [white_box]
device: cpu
threads: 1
pretrain: {{epochs: 1, batch_size: 32, lr: 0.01}}
big_train: {{epochs: 1, batch_size: 32, lr: 0.01}}
finetune: {{epochs: 1, batch_size: 32, lr: 0.01}}
evaluation: {{white_box_targets: [0.0, 0.05]}}
"""


@pytest.fixture
def user(tmp_path, monkeypatch):
    """A new user's folder: their module (a fresh name per test) and the CLI run from there."""
    module = f"my_tasks_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(USER_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # main() puts the working folder on it
    yield User(tmp_path, module)
    sys.modules.pop(module, None)


class User:
    def __init__(self, folder: Path, module: str):
        self.folder, self.module = folder, module

    def config(self, task: str, extra: str = "", methods: str | None = "[msp]", name: str = "my.yaml") -> Path:
        """A config for ``task`` (a class of the user's module) plus ``extra`` YAML lines."""
        text = BASE_CONFIG.format(task=f"{self.module}.{task}")
        if methods is not None:
            text += f"methods: {methods}\n"
        (self.folder / name).write_text(text + textwrap.dedent(extra))
        return Path(name)  # as the user types it, in their folder


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(code: int, err: str) -> str:
    """The single ``error:`` line of a refused command."""
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def refused(capsys, config: Path, *names: str, overrides: tuple[str, ...] = ()) -> str:
    """``cascade run`` and ``cascade validate`` refuse ``config`` with the same one line,
    naming each of ``names``; nothing is trained (no run.log phase beyond the checks)."""
    sets = [a for o in overrides for a in ("--set", o)]
    out = config.parent / "out"
    line = one_line_error(*cli(capsys, "run", config, "--out", out, "--quiet", *sets)[::2])
    assert one_line_error(*cli(capsys, "validate", config, *sets)[::2]) == line
    for name in names:
        assert name in line, (name, line)
    log = (out / "run.log").read_text() if (out / "run.log").exists() else ""
    assert "pretrain" not in log and " big:" not in log
    return line


# ============================================================================ the items


def test_regression_targets_shaped_n_against_outputs_n_1_are_refused_with_the_fix(user, capsys):
    # MaskedL2TaskLoss would broadcast [B] against [B, 1] to [B, B]: a silent 0 % accuracy
    line = refused(capsys, user.config("FlatTargets", methods="[appealnet]"), "FlatTargets", "train split",
                   "[N]", "[N, 1]", "num_outputs", "y.unsqueeze(1)")
    assert line == ("error: task FlatTargets: train split: regression targets are shaped [N], but the networks "
                    "output [N, 1] (num_outputs); return targets shaped [N, 1] (y.unsqueeze(1))")


def test_regression_without_methods_runs_with_the_regression_defaults(user, capsys):
    config = user.config("Line", methods=None)
    code, out, err = cli(capsys, "validate", config)
    assert code == 0 and err == "" and "ok (config, task, data, networks)" in out
    code, out, err = cli(capsys, "run", config, "--out", "out", "--quiet")
    assert code == 0, err
    assert "Traceback" not in err
    metrics = json.loads((user.folder / "out" / "metrics.json").read_text())
    assert metrics["kind"] == "regression"
    assert metrics["methods"] == {"appealnet": {"kind": "trained", "confidence_score": False},
                                  "error_head": {"kind": "post_hoc", "confidence_score": False}}
    # the AppealNet head reads [features, output]: 16 features of mlp [16] + 1 output
    state = torch.load(user.folder / "out" / "checkpoints" / "seed0_appealnet_white_box.pt", weights_only=True)
    (first,) = [v for k, v in state.items() if k.endswith("predictor.net.0.weight")]
    assert tuple(first.shape) == (16, 16 + 1)
    # each network's RMSE is over [N, 1] targets: one error per input, finite
    assert set(metrics["errors"]) >= {"big", "stage0", "appealnet_white_box_stage0"}
    assert all(0 < e["rmse"] < 10 for e in metrics["errors"].values())
    assert {p["method"] for p in metrics["operating_points"]} == {"appealnet", "error_head", "oracle"}


def test_mc_dropout_on_stages_without_dropout_is_refused_before_training(user, capsys):
    # it used to surface only after every network had trained, when the method prepared itself
    line = refused(capsys, user.config("Line", methods="[mc_dropout]"), "mc_dropout", "dropout", "little")
    assert line == ("error: my.yaml: methods: mc_dropout needs stage networks with dropout "
                    "(e.g. little: {..., dropout: 0.1}) (little)")


def test_classification_scores_on_a_regression_task_are_refused_naming_what_suits(user, capsys):
    line = refused(capsys, user.config("Line", methods="[msp, gap, entropy]"), "'msp'", "'gap'", "'entropy'")
    assert line == ("error: my.yaml: methods.0, methods.1, methods.2: 'msp', 'gap', 'entropy' do not suit a "
                    "regression task (methods for regression: appealnet, error_head, mc_dropout, reinforce); "
                    "remove them, or leave methods: out for the regression defaults (appealnet, error_head)")
    # one unsuitable method among good ones: named alone
    line = refused(capsys, user.config("Line", methods="[error_head, msp]"), "methods.1: 'msp' does not suit")
    assert "methods.0" not in line and "remove it," in line


@pytest.mark.parametrize("method, key", [("appealnet", "predictor"), ("reinforce", "policy")])
def test_a_head_reading_class_probabilities_on_a_regression_task_is_refused_with_the_fix(user, capsys, method, key):
    config = user.config("Line", methods=f"[error_head, {{name: {method}, {key}: {{inputs: [sorted_probs]}}}}]")
    line = refused(capsys, config, f"methods.1.{key}.inputs", "sorted_probs", "regression")
    assert line.endswith("use ['features', 'output']"), line


def test_a_task_without_criterion_is_refused(user, capsys):
    line = refused(capsys, user.config("NoCriterion"), "NoCriterion", "criterion")
    assert "cascade.CrossEntropyTaskLoss()" in line and "cascade.MaskedL2TaskLoss()" in line


def test_a_task_without_default_little_needs_little_in_the_config(user, capsys):
    line = refused(capsys, user.config("NoDefaultLittle"), "NoDefaultLittle", "default_little", "little:")
    assert line == ("error: my.yaml: little: the task NoDefaultLittle has no default_little; set little: or stages:")
    # given little:, it runs
    code, out, err = cli(capsys, "validate", user.config("NoDefaultLittle", "little: {name: mlp, hidden: [8]}\n"))
    assert code == 0, err


def test_an_input_shape_the_data_do_not_have_is_refused(user, capsys):
    line = refused(capsys, user.config("WrongInputShape"), "WrongInputShape", "input_shape", "train split", "[8]",
                   "(1, 28, 28)")
    assert line == ("error: task WrongInputShape: train split: one input is shaped [8], but "
                    "WrongInputShape.input_shape is (1, 28, 28); set input_shape = (8,) (one input, no batch)")


def test_a_network_that_fails_on_the_inputs_is_refused_naming_it_and_input_shape(user, capsys):
    config = user.config("Blobs", f"little: {{name: {user.module}.hard_coded}}\n")
    line = refused(capsys, config, "network little", "hard_coded", "mat1 and mat2", "Blobs.input_shape (8,)")
    assert "RuntimeError" in line and "train batch shaped [8, 8]" in line, line


def test_float_labels_for_classification_are_refused(user, capsys):
    line = refused(capsys, user.config("FloatLabels"), "FloatLabels", "train split", "torch.float32", "y.long()")
    assert "integer class indices" in line


def test_int32_labels_in_one_split_are_refused_naming_that_split(user, capsys):
    line = refused(capsys, user.config("Int32TestLabels"), "Int32TestLabels", "test split", "torch.int32",
                   "y.long()")
    assert "train split" not in line


def test_labels_outside_the_classes_are_refused_naming_the_sample(user, capsys):
    line = refused(capsys, user.config("LabelsFromOne"), "LabelsFromOne", "train split")
    assert line == ("error: task LabelsFromOne, seed 0: train split, sample 2: label outside the classes 0..2 (3); "
                    "60 of 180 samples")


def test_splits_of_numpy_arrays_are_refused_with_the_conversion(user, capsys):
    refused(capsys, user.config("NumpySplits"), "NumpySplits", "train split", "tuple", "torch Dataset",
                   "TensorDataset(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y))")


def test_float64_inputs_from_numpy_are_refused_with_the_conversion(user, capsys):
    line = refused(capsys, user.config("Float64Inputs"), "Float64Inputs", "train split", "float64", "x.float()")
    assert "numpy" in line


def test_a_builder_returning_a_plain_sequential_is_refused_before_pretraining(user, capsys):
    config = user.config("Blobs", f"little: {{name: {user.module}.sequential}}\n")
    refused(capsys, config, "little", f"{user.module}.sequential", "Sequential", "cascade.Approximator",
                   "cascade.FeatureNet(features, head, feature_dim)")
    # as the big network too
    config = user.config("Blobs", f"big: {{name: {user.module}.sequential}}\n")
    assert refused(capsys, config, "big", "Sequential").startswith("error: big: ")


def test_a_network_with_seven_outputs_for_three_classes_is_refused(user, capsys):
    config = user.config("Blobs", f"little: {{name: {user.module}.seven_outputs}}\n")
    line = refused(capsys, config, "little", "seven_outputs", "[B, 7]", "Blobs.num_outputs is 3")
    assert line == (f"error: network little ({user.module}.seven_outputs) outputs [B, 7] but Blobs.num_outputs is 3: "
                    "build it with num_outputs outputs (the builder's second argument)")


def test_num_outputs_above_the_classes_present_warns_and_runs(user, capsys):
    config = user.config("FiveOutputs")
    code, out, err = cli(capsys, "validate", config)
    assert code == 0 and "ok" in out
    warning = ("warning: task FiveOutputs: num_outputs is 5 but the train split holds 3 classes (0, 1, 2); the "
               "missing classes are never predicted")
    assert err.splitlines() == [warning]
    code, out, err = cli(capsys, "run", config, "--out", "out", "--quiet")
    assert code == 0 and "Traceback" not in err
    assert warning in err.splitlines()
    metrics = json.loads((user.folder / "out" / "metrics.json").read_text())
    assert {p["method"] for p in metrics["operating_points"]} == {"msp", "oracle"}
    samples = (user.folder / "out" / "samples.csv").read_text()
    assert "stage0_score_msp" in samples


def test_evaluation_methods_gets_a_migration_line_and_methods_works(user, capsys):
    digits = REPO / "configs" / "digits.yaml"
    code, _, err = cli(capsys, "validate", digits, "--set", "evaluation.methods=[appealnet]")
    line = one_line_error(code, err)
    assert line == (f"error: {digits}: evaluation.methods: moved to the top-level methods: list "
                    "(from --set evaluation.methods=[appealnet])")
    code, _, err = cli(capsys, "run", digits, "--quick", "--out", "out", "--set", "evaluation.methods=[appealnet]")
    assert one_line_error(code, err) == line
    assert not (user.folder / "out").exists()
    code, out, err = cli(capsys, "validate", digits, "--set", "methods=[appealnet]")
    assert code == 0 and err == "" and out.strip() == f"{digits}: ok (config, task, data, networks)"
