"""Deploying a run (``Router.from_run``) and bringing networks trained elsewhere (``checkpoint:``,
``trained: true``), on quick runs written to a temporary folder and shared by the tests."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cascade import CascadeError, Router
from cascade.cli import main
from tests.conftest import REPO, run_quick
from tests.test_new_user import USER_MODULE, one_line_error

DIGITS = REPO / "configs" / "digits.yaml"
CASCADE = REPO / "configs" / "digits_cascade.yaml"

#: a network the user trained elsewhere, named by dotted path (``big: {name: ..., trained: true}``)
LOADER_MODULE = '''
import torch
from tasks.networks import build_cnn


def my_trained_cnn(input_shape, num_outputs, weights):
    net = build_cnn(input_shape, num_outputs, channels=[32, 64], hidden=128)
    net.load_state_dict(torch.load(weights, weights_only=True))
    return net
'''


def _cli(*argv) -> int:
    return main([str(a) for a in argv])


def _run(folder: Path, config: Path | str, *sets: str) -> Path:
    return run_quick(folder, config, *sets)


@pytest.fixture(scope="module")
def digits_run(quick_digits_run) -> Path:
    """configs/digits.yaml --quick: AppealNet and the confidence scores, two stages, both modes."""
    return quick_digits_run


@pytest.fixture(scope="module")
def cascade_run(quick_cascade_run) -> Path:
    """configs/digits_cascade.yaml --quick, two alphas: three stages (two routed, the big last)."""
    return quick_cascade_run


@pytest.fixture(scope="module")
def user_run(tmp_path_factory) -> tuple[Path, str]:
    """A user's own task (a module in their folder, named by dotted path), run from that folder."""
    folder = tmp_path_factory.mktemp("user")
    module = "my_router_tasks"
    (folder / f"{module}.py").write_text(USER_MODULE)
    (folder / "mine.yaml").write_text(
        f"task: {{name: {module}.Blobs}}\nseeds: [3]\nmodes: [white_box]\ndevice: cpu\nthreads: 1\n"
        "pretrain: {epochs: 1, batch_size: 32, lr: 0.01}\nbig_train: {epochs: 1, batch_size: 32, lr: 0.01}\n"
        "finetune: {epochs: 1, batch_size: 32, lr: 0.01}\nmethods: [appealnet, msp]\n"
        "evaluation: {white_box_targets: [0.0, 0.05]}\n")
    out = _run(folder, "mine.yaml")
    sys.modules.pop(module, None)  # imported from the user's folder, which later tests are not in
    return out, module


def _test_split(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    from tasks.digits import DigitsTask

    return DigitsTask(DigitsTask.Options(cal_fraction=0.2, test_fraction=0.3)).build_splits(seed).test.tensors


def _point(run: Path, seed: int, mode: str, method: str, target: float, source: str = "val") -> dict:
    """The run's one point of ``method`` at ``target`` (a method with several systems: the one chosen there)."""
    points = pd.read_csv(run / "points.csv")
    (row,) = points[(points["seed"] == seed) & (points["mode"] == mode) & (points["method"] == method)
                    & (points["selection"] == "target_ad") & (points["threshold_source"] == source)
                    & np.isclose(points["target_ad"], target, rtol=0, atol=1e-12)].to_dict("records")
    return row


def _assert_reproduces(router: Router, point: dict, x: torch.Tensor, y: torch.Tensor, num_stages: int) -> None:
    """The router, on the run's test split, exits where the run's point says and is as accurate."""
    routed = router(x)
    assert routed.num_stages == router.num_stages == num_stages
    assert routed.exit_stage.min() >= 0 and routed.exit_stage.max() <= num_stages - 1
    exits = torch.bincount(routed.exit_stage, minlength=num_stages).double() / len(x)
    fractions = [float(f) for f in str(point["exit_fractions"]).split(";")]
    assert exits.tolist() == pytest.approx(fractions, abs=1e-5)  # points.csv keeps 6 digits
    assert float((routed.exit_stage == num_stages - 1).double().mean()) == pytest.approx(point["appeal_rate"],
                                                                                          abs=1e-12)
    assert routed.appeal_rate == pytest.approx(point["appeal_rate"], abs=1e-6)
    if router.big is not None:  # white-box: every answer is a network's
        accuracy = (routed.output.argmax(-1) == y).double().mean()
        assert float(accuracy) == pytest.approx(point["system_accuracy"], abs=1e-12)


# ============================================================================ from_run


@pytest.mark.parametrize("method, target, source", [
    ("reinforce", 0.0, "val"), ("reinforce", 0.01, "val"), ("appealnet", 0.005, "test"), ("msp", 0.005, "val")])
def test_router_of_a_three_stage_run_reproduces_its_point(cascade_run, method, target, source):
    x, y = _test_split(0)
    router = Router.from_run(cascade_run, method=method, target_ad=target, threshold_source=source)
    # reinforce: the policy (alpha) the run chose at this target, with its threshold
    point = _point(cascade_run, 0, "white_box", method, target, source)
    assert router.threshold == point["threshold"]
    assert len(router.stages) == 2 and router.big is not None
    _assert_reproduces(router, point, x, y, 3)


def test_router_defaults_to_the_first_trained_method_at_ad_half_a_percent(cascade_run):
    router = Router.from_run(cascade_run)
    assert router.threshold == _point(cascade_run, 0, "white_box", "reinforce", 0.005)["threshold"]


@pytest.mark.parametrize("method, mode", [("msp", "white_box"), ("gap", "black_box"), ("appealnet", "black_box")])
def test_router_of_a_two_stage_run_reproduces_its_point(digits_run, method, mode):
    x, y = _test_split(0)
    router = Router.from_run(digits_run, method=method, mode=mode, target_ad=0.01, threshold_source="test")
    point = _point(digits_run, 0, mode, method, 0.01, "test")
    assert router.threshold == point["threshold"] and (router.big is None) == (mode == "black_box")
    _assert_reproduces(router, point, x, y, 2)


@pytest.mark.parametrize("kwargs, message", [
    ({"seed": 7}, "seed 7 is not in this run; it has 0"),
    ({"method": "mc_dropout"},
     "method 'mc_dropout' is not in this run; it has reinforce, appealnet, msp, gap, entropy"),
    ({"mode": "black_box"}, "mode 'black_box' is not in this run; it has white_box"),
    ({"mode": "grey_box"}, "mode 'grey_box' is not in this run; it has white_box"),
    ({"target_ad": 0.3}, "no val point of reinforce (white_box) at target AD 0.3; the run has targets 0, 0.005, 0.01"),
    ({"method": "msp", "target_ad": 0.02, "threshold_source": "test"},
     "no test point of msp (white_box) at target AD 0.02; the run has targets 0, 0.005, 0.01"),
    ({"threshold_source": "cal"}, "threshold source 'cal': use val (chosen on the calibration split), guaranteed"),
])
def test_router_refuses_what_the_run_does_not_have_naming_what_it_has(cascade_run, kwargs, message):
    with pytest.raises(CascadeError) as info:
        Router.from_run(cascade_run, **kwargs)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_router_refuses_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(CascadeError, match="metrics.json: not found; is .* the output folder of a finished"):
        (tmp_path / "config.yaml").write_text("task: {name: digits}\n")
        Router.from_run(tmp_path)


def test_router_finds_a_users_task_from_another_folder(user_run, tmp_path, monkeypatch):
    out, module = user_run
    monkeypatch.chdir(tmp_path)  # somewhere else, where the user's module is not
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(out.parent)])
    assert module not in sys.modules
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["workdir"] == str(out.parent)
    try:
        router = Router.from_run(out, method="appealnet", target_ad=0.05, seed=3)
        task = sys.modules[module].Blobs()
        x, y = task.build_splits(3).test.tensors
        _assert_reproduces(router, _point(out, 3, "white_box", "appealnet", 0.05), x, y, 2)
        msp = Router.from_run(out, method="msp", target_ad=0.0, seed=3)
        _assert_reproduces(msp, _point(out, 3, "white_box", "msp", 0.0), x, y, 2)
    finally:
        sys.modules.pop(module, None)
    # a run that did not record its folder: the user's module is not found, in one line
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    metrics.pop("workdir")
    (copy / "metrics.json").write_text(json.dumps(metrics))
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(out.parent)])
    with pytest.raises(CascadeError, match=f"task.name: cannot import task '{module}.Blobs'") as info:
        Router.from_run(copy)
    assert "\n" not in str(info.value)


# ============================================================================ networks trained elsewhere


def _phases(run: Path) -> list[str]:
    return [line.split("phase ", 1)[1].split(":")[0] for line in (run / "run.log").read_text().splitlines()
            if " phase " in line]


def test_given_big_and_little_checkpoints_skip_their_training(digits_run, tmp_path):
    """``big: {checkpoint}`` and ``little: {..., checkpoint}`` load the first run's networks:
    no big or pretrain phase, the same accuracies and, with no fine-tuning, the same MSP points."""
    ckpt = digits_run / "checkpoints"
    out = _run(tmp_path, DIGITS, f"big.checkpoint={ckpt / 'seed0_big.pt'}",
               f"little={{name: mlp, hidden: [32], checkpoint: {ckpt / 'seed0_stage0.pt'}}}",
               "finetune.epochs=0", "methods=[msp]")
    phases = _phases(out)
    assert "seed 0 checks" in phases and "seed 0 little" in phases
    assert not any(p.endswith(" big") or "pretrain" in p for p in phases), phases
    before = json.loads((digits_run / "metrics.json").read_text())
    after = json.loads((out / "metrics.json").read_text())
    assert after["accuracy"]["big"] == before["accuracy"]["big"]
    assert after["accuracy"]["stage0"] == before["accuracy"]["stage0"]
    old, new = pd.read_csv(digits_run / "points.csv"), pd.read_csv(out / "points.csv")
    cols = ["mode", "target_ad", "threshold_source", "threshold", "appeal_rate", "system_accuracy"]
    old = old[(old["method"] == "msp") & (old["selection"] == "target_ad")][cols].reset_index(drop=True)
    new = new[(new["method"] == "msp") & (new["selection"] == "target_ad")][cols].reset_index(drop=True)
    pd.testing.assert_frame_equal(old, new)


def test_a_trained_big_from_a_users_function_skips_big_train(digits_run, tmp_path):
    (tmp_path / "my_networks.py").write_text(LOADER_MODULE)
    weights = digits_run / "checkpoints" / "seed0_big.pt"
    try:
        out = _run(tmp_path, DIGITS, f"big={{name: my_networks.my_trained_cnn, trained: true, weights: {weights}}}",
                   "methods=[msp]", "modes=[white_box]")
    finally:
        sys.modules.pop("my_networks", None)
    assert not any(p.endswith(" big") for p in _phases(out)) and "seed 0 little pretrain" in _phases(out)
    before = json.loads((digits_run / "metrics.json").read_text())
    assert json.loads((out / "metrics.json").read_text())["accuracy"]["big"] == before["accuracy"]["big"]


@pytest.mark.parametrize("key", ["big", "little"])
def test_a_checkpoint_that_does_not_fit_is_one_line_naming_the_file(digits_run, tmp_path, capsys, monkeypatch, key):
    monkeypatch.chdir(tmp_path)
    wrong = digits_run / "checkpoints" / ("seed0_stage0.pt" if key == "big" else "seed0_big.pt")
    sets = ["--set", f"{key}.checkpoint={wrong}"]
    capsys.readouterr()
    line = one_line_error(_cli("run", DIGITS, "--quick", "--quiet", "--out", tmp_path / "out", *sets),
                          capsys.readouterr().err)
    assert line.startswith(f"error: {wrong}: does not fit {key} ("), line
    assert one_line_error(_cli("validate", DIGITS, *sets), capsys.readouterr().err) == line
    assert not any("pretrain" in p or p.endswith(" big") for p in _phases(tmp_path / "out"))
