"""Training that goes wrong is loud (issue 16, item 7): a diverging phase stops the run in
one line naming the phase and its learning rate; a full disk during a checkpoint save is
one line naming the file, with nothing partial left; SIGTERM stops a run as Ctrl-C does;
files honour the umask; a killed run's temporary files go on the next run; ``validate``
checks the config as ``--quick`` runs it; absurd sizes are refused before any work.
"""

from __future__ import annotations

import errno
import math
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from cascade.core.files import atomic_save, atomic_write_text, load_checkpoint
from cascade.cli import EXIT_INTERRUPTED, main
from cascade.core.errors import CascadeError, TrainingError
from cascade.nn.losses import CrossEntropyTaskLoss, MaskedL2TaskLoss
from cascade.contracts.stages import StageOutput
from cascade.training.checks import degenerate_training, loss_rise_problem, constant_answer_problem

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "configs" / "digits.yaml"

# a tiny experiment: 7 steps per epoch on digits' ~900 training inputs
TINY = """\
task: {name: digits}
seeds: [0]
threads: 1
modes: [black_box]
little: {name: mlp, hidden: [16]}
pretrain: {epochs: 2, batch_size: 128, lr: 0.01}
finetune: {epochs: 1, batch_size: 128, lr: 0.003}
methods: [msp]
evaluation: {violation_resplits: 0}
"""


def _cli(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def _one_error_line(code: int, err: str) -> str:
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def _temporaries(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.tmp"))


# ============================================================================ degenerate training


def test_a_diverging_lr_stops_the_run_naming_the_phase_and_its_lr(tmp_path, capsys, monkeypatch):
    """The issue's case: big_train.lr 1e6 keeps the loss finite, and the big network answers
    class 1 to nearly everything (10.8 % on the calibration split, whose majority class is
    10.3 %), with a loss of 1e12 (answering the class frequencies: ln 10)."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    run = ["run", str(DIGITS), "--quick", "--quiet", "--out", str(out), "--set", "big_train.lr=1e6",
           "--set", "modes=[white_box]", "--set", "methods=[msp]"]  # fewer phases after the big one
    line = _one_error_line(*_cli(capsys, *run))
    assert line.startswith("error: seed 0 big (big_train, lr 1e+06): accuracy 0.108 on the calibration split is no "
                           "better than always answering the majority class (0.103, give or take 0.032 on 360 inputs), "
                           "and its loss ")
    assert "is above that of answering the class frequencies (2.3)" in line
    assert "checks.allow_degenerate: true" in line
    assert not (out / "metrics.json").exists()  # no tables built on it
    # allowed on purpose: the same run, resumed, keeps the network with a warning and finishes
    code = main([*run, "--set", "checks.allow_degenerate=true", "--resume"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "warning: seed 0 big (big_train, lr 1e+06): accuracy 0.108" in err
    assert "(kept: checks.allow_degenerate is true)" in err
    assert (out / "metrics.json").is_file()


def test_a_diverging_regression_phase_stops_the_run(tmp_path, capsys, monkeypatch):
    """Keypoints, pretrain.lr 1: the loss stays finite (1e19 on the calibration split) and
    far above both the mean target's (0.0121) and the network's before training."""
    monkeypatch.chdir(tmp_path)
    code, err = _cli(capsys, "run", REPO / "configs" / "keypoints.yaml", "--quick", "--quiet",
                     "--out", tmp_path / "out", "--set", f"task.data_root={tmp_path / 'data'}",
                     "--set", "pretrain.lr=1", "--set", "methods=[appealnet]")
    line = _one_error_line(code, err)
    assert line.startswith("error: seed 0 little pretrain (pretrain, lr 1): its loss ")
    assert "on the calibration split is above that of always answering the mean target (0.0121) and of the network " \
           "before training" in line


def test_the_quick_configs_the_suite_runs_are_not_degenerate(quick_digits_run):
    """The default config's quick run trains networks well above the majority class (it
    finishes: the check did not stop it)."""
    assert (quick_digits_run / "metrics.json").is_file()


def test_loss_rise_known_values():
    assert loss_rise_problem([{"loss": 2.0}, {"loss": 1.0}, {"loss": 2.5}]) == \
        "loss rose from 2 (epoch 1) to 2.5 (epoch 3)"
    assert loss_rise_problem([{"loss": 2.0}, {"loss": 2.1}]) is None  # within the 10 % tolerance
    assert loss_rise_problem([{"loss": 2.0}, {"loss": 0.1}]) is None
    assert loss_rise_problem([{"loss": 9.0}]) is None  # one epoch: nothing to compare


class _Constant(nn.Module):
    """Answers ``logits`` for every input."""

    def __init__(self, logits: list[float]):
        super().__init__()
        self.logits = torch.tensor(logits)

    def forward(self, x):
        return StageOutput(self.logits.expand(len(x), -1))


def test_constant_answer_check_known_values():
    x = torch.zeros(10, 2)
    y = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 2, 2])  # majority class 0: 0.6
    data, cpu, loss = TensorDataset(x, y), torch.device("cpu"), CrossEntropyTaskLoss()
    # always class 0, confidently: loss 0.4 * 10 = 4.0, against 0.950 for the class frequencies
    always_0 = constant_answer_problem(_Constant([10.0, 0.0, 0.0]), loss, data, 4, cpu)
    assert always_0 == ("accuracy 0.600 on the calibration split is no better than always answering the majority "
                        "class (0.600, give or take 0.310 on 10 inputs), and its loss 4 is above that of answering "
                        "the class frequencies (0.95)")  # 2 * sqrt(0.6 * 0.4 / 10) = 0.310
    # at chance but with the constant's loss (a network still near its initialization): let through
    assert constant_answer_problem(_Constant([math.log(0.6), math.log(0.2), math.log(0.2)]), loss, data, 4, cpu) is None
    assert constant_answer_problem(_Constant([1.0, 0.0, 0.0]), loss, data, 4, cpu) is None  # loss 0.951: within 2 %
    # loss 0.6 * 0.239 + 0.4 * 2.239 = 1.039: worse than the constant's 0.950 and the start's 1.0, refused; but
    # not worse than a start at 1.1 (training improved it, only not enough)
    assert constant_answer_problem(_Constant([2.0, 0.0, 0.0]), loss, data, 4, cpu, start_loss=1.0).endswith(
        "and its loss 1.04 is above that of answering the class frequencies (0.95) and of the network before "
        "training (1)")
    assert constant_answer_problem(_Constant([2.0, 0.0, 0.0]), loss, data, 4, cpu, start_loss=1.1) is None

    class Perfect(nn.Module):
        def forward(self, x):
            return StageOutput(nn.functional.one_hot(y[: len(x)], 3).float())

    assert constant_answer_problem(Perfect(), CrossEntropyTaskLoss(), TensorDataset(x, y), 16, torch.device("cpu")) \
        is None
    # regression: the constant is the mean target (here 1 and 3, a missing coordinate left out); answering 0 has
    # loss (1 + 9) / 2 = 5 where the mean's is 0
    targets = torch.tensor([[1.0, 3.0]] * 9 + [[1.0, float("nan")]])
    regression = TensorDataset(x, targets)
    assert constant_answer_problem(_Constant([0.0, 0.0]), MaskedL2TaskLoss(), regression, 4, cpu, start_loss=2.0) == \
        ("its loss 4.6 on the calibration split is above that of always answering the mean target (0) and of the "
         "network before training (2)")  # (9 * 5 + 1) / 10 = 4.6, over twice the start's
    # not twice as bad as its start (a regression network's first batch says little): let through
    assert constant_answer_problem(_Constant([0.0, 0.0]), MaskedL2TaskLoss(), regression, 4, cpu, start_loss=3.0) \
        is None


def test_degenerate_training_stops_or_warns(caplog):
    with pytest.raises(TrainingError, match=r"^seed 1 little pretrain \(pretrain, lr 0\.5\): loss rose from 1 "):
        degenerate_training("seed 1 little pretrain", "pretrain", 0.5, [None, "loss rose from 1 to 2"], allow=False)
    degenerate_training("seed 1 little pretrain", "pretrain", 0.5, ["loss rose from 1 to 2"], allow=True)
    assert "seed 1 little pretrain (pretrain, lr 0.5): loss rose from 1 to 2 (kept" in caplog.text
    degenerate_training("p", "pretrain", 0.5, [None, None], allow=False)  # nothing found: nothing said


# ============================================================================ files


def test_a_full_disk_during_a_checkpoint_save_is_one_line_and_leaves_nothing_partial(tmp_path, capsys,
                                                                                     monkeypatch):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY)
    out = tmp_path / "out"
    real_write_bytes = Path.write_bytes

    def disk_full(self, data):  # half the checkpoint, then the disk is full
        if ".pt." in self.name:
            real_write_bytes(self, bytes(data)[:100])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write_bytes(self, data)

    with monkeypatch.context() as m:
        m.setattr(Path, "write_bytes", disk_full)
        line = _one_error_line(*_cli(capsys, "run", cfg, "--quiet", "--out", out))
    resume = out / "checkpoints" / "resume"
    assert line.startswith(f"error: {resume / 'seed_0_little_pretrain.pt'}: cannot write it (No space left on device)")
    assert not _temporaries(out) and not list(resume.glob("*.pt"))

    # torch's own writer failing (what the issue saw) is one line too, and keeps the old file
    path = tmp_path / "ckpt.pt"
    atomic_save({"w": torch.ones(2)}, path)

    def torch_writer_fails(obj, f, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 5504 vs 5392")

    monkeypatch.setattr(torch, "save", torch_writer_fails)
    with pytest.raises(CascadeError, match=rf"^{path}: cannot write it \(torch's writer failed: RuntimeError: "
                                           r"\[enforce fail at inline_container.cc:603\] . unexpected pos"):
        atomic_save({"w": torch.zeros(2)}, path)
    assert torch.equal(load_checkpoint(path)["w"], torch.ones(2))
    assert [p.name for p in tmp_path.glob(".*")] == []


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_honour_the_umask(tmp_path, umask, mode):
    before = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        atomic_save({"w": torch.ones(1)}, tmp_path / "b.pt")
    finally:
        os.umask(before)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == mode
    assert stat.S_IMODE((tmp_path / "b.pt").stat().st_mode) == mode


def test_a_killed_runs_temporary_files_are_removed_on_the_next_run_and_on_resume(tmp_path, capsys):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY)
    out = tmp_path / "out"
    stray = [out / "figures" / ".accuracy_vs_cost_white_box.png.k2j3h4.tmp", out / ".metrics.json.abcd.tmp",
             out / "checkpoints" / ".seed0_stage0.pt.x1.tmp", out / "checkpoints" / "resume" / ".seed_0_big.pt.y.tmp"]
    for p in stray:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"half a file")
    keep = out / "figures" / "notes.tmp"  # not one of ours (no leading dot): left alone
    keep.write_text("mine")
    assert main(["run", str(cfg), "--quiet", "--out", str(out), "--resume"]) == 0, capsys.readouterr().err
    assert _temporaries(out) == [keep]
    for p in stray[:2]:
        p.write_bytes(b"half a file")
    assert main(["run", str(cfg), "--quiet", "--out", str(out)]) == 0, capsys.readouterr().err
    assert _temporaries(out) == [keep]


def test_sigterm_stops_a_run_as_ctrl_c_does(tmp_path):
    cfg = tmp_path / "long.yaml"
    cfg.write_text(TINY.replace("pretrain: {epochs: 2,", "pretrain: {epochs: 2000,"))
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "cascade", "run", str(cfg), "--quiet", "--out", str(out)],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    checkpoint = out / "checkpoints" / "resume" / "seed_0_little_pretrain.pt"
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # waits for the first epoch's checkpoint: training is under way
    assert checkpoint.exists(), proc.communicate(timeout=10)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_INTERRUPTED, err
    assert "Traceback" not in err
    assert "SIGTERM received; stopping after this step and saving a checkpoint" in err
    assert err.strip().splitlines()[-1] == f"interrupted; continue with: cascade run {cfg} --quiet --out {out} --resume"
    assert not _temporaries(out)
    assert load_checkpoint(checkpoint)["trainer"]["step"] >= 7  # saved on the way out, whole


# ============================================================================ validation


def test_validate_checks_the_quick_block_too(tmp_path, capsys):
    bad_key = tmp_path / "bad_key.yaml"
    bad_key.write_text("task: {name: digits}\nquick:\n  seeds: [0]\n  finetune.epoch: 1\n")
    line = _one_error_line(*_cli(capsys, "validate", bad_key, "--config-only"))
    assert line == (f"error: {bad_key}: finetune.epoch: unknown key (did you mean 'epochs'?) (with --quick, from "
                    "quick: finetune.epoch)")
    replaced = tmp_path / "replaced.yaml"
    replaced.write_text("task: {name: digits}\npretrain: {epochs: -1}\nquick:\n  pretrain.epochs: 1\n")
    expected = f"error: {replaced}: pretrain.epochs: Input should be greater than or equal to 0"
    assert _one_error_line(*_cli(capsys, "validate", replaced, "--config-only")) == expected
    assert _one_error_line(*_cli(capsys, "run", replaced, "--quick", "--out", tmp_path / "out")) == expected
    assert not (tmp_path / "out").exists()


def test_absurd_sizes_are_refused_at_validation_in_one_line_naming_the_key(tmp_path, capsys):
    huge = tmp_path / "huge.yaml"  # the 1.4 M targets: 9.8 MB, refused before parsing
    huge.write_text("task: {name: digits}\nevaluation:\n  white_box_targets: [" + ", ".join(["0.001"] * 1_400_000)
                    + "]\n")
    start = time.perf_counter()
    line = _one_error_line(*_cli(capsys, "validate", huge))
    assert time.perf_counter() - start < 1.0
    assert line == (f"error: {huge}: 9.8 MB; a config is at most 1 MB (a list of thousands of values? lists hold at "
                    "most 1000 items)")
    long = tmp_path / "long.yaml"
    long.write_text("task: {name: digits}\nevaluation:\n  white_box_targets: [" + ", ".join(["0.001"] * 1001) + "]\n")
    assert _one_error_line(*_cli(capsys, "validate", long, "--config-only")) == \
        f"error: {long}: evaluation.white_box_targets: List should have at most 1000 items after validation, not 1001"
    zero = tmp_path / "zero.yaml"
    zero.write_text("task: {name: digits}\nlittle: {name: mlp, hidden: [0]}\n")
    assert _one_error_line(*_cli(capsys, "validate", zero)) == \
        f"error: {zero}: little.hidden.0: Input should be greater than 0"
    seeds = "seeds=[" + ", ".join(map(str, range(1001))) + "]"
    code, err = _cli(capsys, "validate", zero, "--config-only", "--set", "little.hidden=[8]",
                     "--set", "big={name: cnn, channels: [32, -1]}", "--set", seeds)
    assert code == 2 and any(line.startswith(f"error: {zero}: big.channels.1: Input should be greater than 0")
                             for line in err.splitlines())
    assert any(line.startswith(f"error: {zero}: seeds: List should have at most 1000 items") for line in
               err.splitlines())
    # YAML aliases standing for 10^9 values: refused after at most 100,000 steps
    bomb = tmp_path / "bomb.yaml"
    levels = ["a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"] + \
        [f"{k}: &{k} [{', '.join([f'*{p}'] * 10)}]" for p, k in zip("abcdefgh", "bcdefghi")]
    bomb.write_text("task: {name: digits}\n" + "\n".join(levels) + "\n")
    start = time.perf_counter()
    line = _one_error_line(*_cli(capsys, "validate", bomb, "--config-only"))
    assert time.perf_counter() - start < 1.0
    assert line.startswith(f"error: {bomb}: ") and "more than 100000 values (counted through YAML aliases)" in line
