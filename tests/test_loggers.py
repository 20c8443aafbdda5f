"""Training curves (issue 18 item 4): the ``loggers`` config key, the TensorBoard logger,
a user's own logger in the ``LOGGERS`` registry, the missing-extra error, and resume.

The TensorBoard event files are read back with TensorBoard's own ``EventAccumulator``.
Known answers: a trainer by hand (a zero-initialised linear layer: the first loss is
``ln 3``, the second ``ln(1 + 2/e)``); on a tiny digits run, the epoch means equal
``metrics.json``'s training history and the mean of the epoch's step losses, the learning
rate is the config's, and AppealNet's lambda follows its controller's rule from the
logged ``L_P``.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cascade import LOGGERS, CascadeError, Experiment, HistoryHook, Logger, LoggerHook, LoggerOptions, Trainer
from cascade import TensorBoardLogger, load_config
from cascade.cli import main
from tests.conftest import REPO

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

TINY = """\
task: {name: digits}
seeds: [0]
threads: 1
modes: [white_box, black_box]
little: {name: mlp, hidden: [16]}
big: {name: cnn, channels: [4, 8], hidden: 16}
big_train: {epochs: 1, batch_size: 128, lr: 0.003}
pretrain: {epochs: 1, batch_size: 128, lr: 0.003}
finetune: {epochs: 2, batch_size: 128, lr: 0.003}
big_cache: false
pretrain_cache: false
methods: [appealnet, msp]
"""
STEPS_PER_EPOCH = 7  # digits' default training split (1797 * 0.5 inputs) in batches of 128
#: TensorBoard run -> (phase, epochs)
PHASES = {"seed_0/big": ("seed 0 big", 1), "seed_0/little_pretrain": ("seed 0 little pretrain", 1),
          "seed_0/little": ("seed 0 little", 2), "seed_0/appealnet_white_box": ("seed 0 appealnet white_box", 2),
          "seed_0/appealnet_black_box": ("seed 0 appealnet black_box", 2)}
APPEALNET = "seed_0/appealnet_white_box"


class RecordingLogger(Logger):
    """A user's logger: keeps every call (what an MLflow logger would send)."""

    class Options(LoggerOptions):
        note: str = Field(min_length=1)

    calls: list[tuple] = []

    def begin_phase(self, phase, step):
        self.calls.append(("begin", phase, step, self.options.note))

    def log_scalars(self, phase, step, values):
        self.calls.append(("log", phase, step, dict(values)))

    def end_phase(self, phase):
        self.calls.append(("end", phase))

    def close(self):
        self.calls.append(("close",))


@pytest.fixture
def recording(monkeypatch):
    """``recording`` registered in LOGGERS for one test (the registry restored after)."""
    monkeypatch.setattr(LOGGERS, "_entries", dict(LOGGERS._entries))
    monkeypatch.setattr(RecordingLogger, "calls", [])
    LOGGERS.register("recording")(RecordingLogger)
    return RecordingLogger


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Tag -> [(step, value)] of one TensorBoard run, as TensorBoard reads it."""
    acc = event_accumulator.EventAccumulator(str(folder), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _run(*argv) -> int:
    return main(["run", *map(str, argv), "--quiet"])


# ============================================================================ a trainer by hand


class _CrossEntropy:
    def __call__(self, model, batch):
        return {"loss": F.cross_entropy(model(batch[0]), batch[1])}


def test_tensorboard_curves_of_a_trainer_hold_the_losses_worked_out_by_hand(tmp_path, recording):
    # one input x = (1, 0) of class 0, a 3-class linear layer from zero, SGD with lr 1:
    # step 1 sees logits 0 (loss ln 3); the gradient (softmax - onehot) x^T moves the weights
    # to logits (2/3, -1/3, -1/3), so step 2's loss is -2/3 + ln(e^(2/3) + 2 e^(-1/3)) = ln(1 + 2/e)
    model = nn.Linear(2, 3, bias=False)
    nn.init.zeros_(model.weight)
    loader = DataLoader(TensorDataset(torch.tensor([[1.0, 0.0]]), torch.tensor([0])), batch_size=1)
    tb = TensorBoardLogger(tmp_path, TensorBoardLogger.Options())
    mine = RecordingLogger(tmp_path, RecordingLogger.Options(note="by hand"))
    history = HistoryHook()
    trainer = Trainer(model, _CrossEntropy(), torch.optim.SGD(model.parameters(), lr=1.0), loader, epochs=2,
                      hooks=[history, LoggerHook("seed 3 by hand", [tb, mine], history)], name="seed 3 by hand")
    trainer.train()
    tb.close()
    first, second = math.log(3), math.log(1 + 2 / math.e)
    curves = scalars(tmp_path / "tensorboard" / "seed_3" / "by_hand")
    assert sorted(curves) == ["epoch/loss", "train/loss", "train/lr"]
    assert [s for s, _ in curves["train/loss"]] == [1, 2]
    assert [v for _, v in curves["train/loss"]] == pytest.approx([first, second], rel=1e-6)  # float32 in the file
    assert [v for _, v in curves["epoch/loss"]] == pytest.approx([first, second], rel=1e-6)
    assert curves["train/lr"] == [(1, 1.0), (2, 1.0)]
    # the user's logger saw the same numbers (the float32 losses the trainer computed, exactly
    # what the event file holds), and the phase's start and end
    logged = [c for c in mine.calls if c[0] == "log"]
    assert [(c[2], sorted(c[3])) for c in logged] == [(1, ["train/loss", "train/lr"]), (1, ["epoch/loss"]),
                                                     (2, ["train/loss", "train/lr"]), (2, ["epoch/loss"])]
    assert [logged[0][3]["train/loss"], logged[2][3]["train/loss"]] == [v for _, v in curves["train/loss"]]
    assert mine.calls[0] == ("begin", "seed 3 by hand", 0, "by hand") and mine.calls[-1] == ("end", "seed 3 by hand")


def test_a_phase_name_used_twice_gets_a_second_folder(tmp_path):
    tb = TensorBoardLogger(tmp_path, TensorBoardLogger.Options())
    for value in (1.0, 2.0):
        tb.begin_phase("seed 0 probe", 0)
        tb.log_scalars("seed 0 probe", 1, {"train/loss": value})
        tb.end_phase("seed 0 probe")
    tb.close()
    assert scalars(tmp_path / "tensorboard" / "seed_0" / "probe")["train/loss"] == [(1, 1.0)]
    assert scalars(tmp_path / "tensorboard" / "seed_0" / "probe_2")["train/loss"] == [(1, 2.0)]


# ============================================================================ a tiny digits run


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("loggers")
    (path / "tiny.yaml").write_text(TINY)
    return path


@pytest.fixture(scope="module")
def plain_run(work) -> Path:
    """The tiny run without loggers."""
    assert _run(work / "tiny.yaml", "--out", work / "plain") == 0
    return work / "plain"


@pytest.fixture(scope="module")
def logged_run(work) -> tuple[Path, list[tuple]]:
    """The tiny run with the tensorboard logger and a user's ``recording`` one; its calls."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(LOGGERS, "_entries", dict(LOGGERS._entries))
        mp.setattr(RecordingLogger, "calls", [])
        LOGGERS.register("recording")(RecordingLogger)
        assert _run(work / "tiny.yaml", "--out", work / "logged", "--set",
                    "loggers=[tensorboard, {name: recording, note: digits}]") == 0
        calls = list(RecordingLogger.calls)
    return work / "logged", calls


def test_a_run_with_loggers_has_the_same_results_as_one_without(plain_run, logged_run):
    out, _ = logged_run
    for name in ("metrics.json", "points.csv", "samples.csv", "table.md"):
        assert (out / name).read_bytes() == (plain_run / name).read_bytes(), name
    assert not (plain_run / "tensorboard").exists()


def test_tensorboard_reads_back_every_phase_with_its_known_values(logged_run):
    import json

    out, _ = logged_run
    history = json.loads((out / "metrics.json").read_text())["training"]
    board = out / "tensorboard"
    assert sorted(str(p.parent.relative_to(board)) for p in board.rglob("events.out.tfevents.*")) == sorted(PHASES)
    for run, (phase, epochs) in PHASES.items():
        curves = scalars(board / run)
        steps = epochs * STEPS_PER_EPOCH
        assert [s for s, _ in curves["train/loss"]] == list(range(1, steps + 1)), run
        assert [v for _, v in curves["train/lr"]] == pytest.approx([0.003] * steps), run  # constant: no schedule
        # each epoch's mean is metrics.json's history, and the mean of that epoch's steps
        ends = [(e + 1) * STEPS_PER_EPOCH for e in range(epochs)]
        assert [s for s, _ in curves["epoch/loss"]] == ends
        assert [v for _, v in curves["epoch/loss"]] == pytest.approx([h["loss"] for h in history[phase]], rel=1e-6)
        step_losses = [v for _, v in curves["train/loss"]]
        means = [sum(step_losses[e - STEPS_PER_EPOCH:e]) / STEPS_PER_EPOCH for e in ends]
        assert [v for _, v in curves["epoch/loss"]] == pytest.approx(means, rel=1e-5), run


def test_appealnet_curves_hold_lambda_as_its_controller_moves_it_and_mean_q(logged_run):
    out, _ = logged_run
    curves = scalars(out / "tensorboard" / APPEALNET)
    assert {"train/L_A", "train/L_P", "train/lambda", "train/q_mean", "train/lr_1", "epoch/lambda"} <= set(curves)
    # lambda starts at lambda.init (0.1) and, after each step, is divided by up (0.99) when
    # L_P > budget (0.5), else by down (1.01): the value logged at a step is the one it used
    lam, expected = 0.1, []
    for _, l_p in curves["train/L_P"]:
        expected.append(lam)
        lam /= 0.99 if l_p > 0.5 else 1.01
    assert [v for _, v in curves["train/lambda"]] == pytest.approx(expected, rel=1e-6)
    assert all(0 < q < 1 for _, q in curves["train/q_mean"])
    assert len(curves["train/q_mean"]) == 2 * STEPS_PER_EPOCH


def test_a_registered_logger_of_ones_own_gets_every_phase_and_the_same_numbers(logged_run):
    out, calls = logged_run
    begun = [c[1:] for c in calls if c[0] == "begin"]
    assert begun == [(phase, 0, "digits") for phase, _ in PHASES.values()]  # in training order, options passed
    assert [c[1] for c in calls if c[0] == "end"] == [phase for phase, _ in PHASES.values()]
    assert calls[-1] == ("close",) and calls.count(("close",)) == 1
    # the first step's loss the trainer logged, as TensorBoard holds it (float32)
    big = [c for c in calls if c[0] == "log" and c[1] == "seed 0 big"]
    curves = scalars(out / "tensorboard" / "seed_0" / "big")
    assert big[0][2] == 1 and big[0][3]["train/loss"] == pytest.approx(curves["train/loss"][0][1], rel=1e-7)
    # near ln 10 before any update (10 classes, a network just initialised)
    assert big[0][3]["train/loss"] == pytest.approx(math.log(10), abs=0.15)


# ============================================================================ errors


def test_an_unknown_logger_is_one_line_naming_the_nearest(work, capsys):
    assert main(["validate", str(work / "tiny.yaml"), "--set", "loggers=[tensorbord]"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "loggers.0.name: unknown logger 'tensorbord' (did you mean 'tensorboard'?); known: tensorboard" in err


def test_a_logger_option_it_does_not_have_is_refused(work, capsys):
    assert main(["validate", str(work / "tiny.yaml"), "--set", "loggers=[{name: tensorboard, every: 5}]"]) == 2
    assert "loggers.0.every: unknown key" in capsys.readouterr().err


def test_without_the_tensorboard_package_a_run_stops_before_training_naming_the_extra(work, tmp_path, monkeypatch,
                                                                                      capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # `import` of it raises ImportError
    out = tmp_path / "out"
    capsys.readouterr()
    assert _run(work / "tiny.yaml", "--out", out, "--set", "loggers=[tensorboard]") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert ("loggers.0: the tensorboard logger needs the tensorboard package, which is not installed: "
            "pip install 'cascade-routing[tensorboard]'") in err
    assert not out.exists()  # nothing trained, nothing written
    # `cascade validate` says so too; with --config-only it checks the config itself, valid on
    # a machine that has the package
    assert main(["validate", str(work / "tiny.yaml"), "--set", "loggers=[tensorboard]"]) == 2
    assert "pip install 'cascade-routing[tensorboard]'" in capsys.readouterr().err
    assert main(["validate", str(work / "tiny.yaml"), "--config-only", "--set", "loggers=[tensorboard]"]) == 0
    # the library says so too, before any training
    cfg = load_config(work / "tiny.yaml", overrides=["loggers=[tensorboard]"])
    with pytest.raises(CascadeError, match=r"^loggers\.0: .*pip install 'cascade-routing\[tensorboard\]'$"):
        Experiment(cfg, out, quiet=True).run()
    assert not (out / "run.log").exists()


# ============================================================================ resume after SIGKILL

STOP_PHASE, STOP_STEP = "seed 0 appealnet white_box", 10  # epoch 2, after its 3rd batch
# Runs the CLI and kills itself (SIGKILL: no checkpoint, no cleanup) after step STOP_STEP of
# STOP_PHASE, having flushed the event files first (a writer may have flushed by itself):
# the steps after the phase's last checkpoint (end of epoch 1) are on disk and come again.
KILLING_CLI = """\
import os, signal, sys
from cascade.cli import main
from cascade.training.loggers import LoggerHook

PHASE, STEP = os.environ["STOP_PHASE"], int(os.environ["STOP_STEP"])
_after_step = LoggerHook.after_step

def after_step(self, trainer, losses):
    _after_step(self, trainer, losses)
    if trainer.name == PHASE and trainer.step == STEP:
        for logger in self.loggers:
            logger.flush(self.phase)
        os.kill(os.getpid(), signal.SIGKILL)

LoggerHook.after_step = after_step
sys.exit(main(sys.argv[1:]))
"""


def test_a_run_killed_mid_epoch_resumes_to_the_same_curves_each_step_once(work, logged_run):
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    reference, _ = logged_run
    script = work / "killing_cli.py"
    script.write_text(KILLING_CLI)
    out = work / "killed"
    args = ["run", str(work / "tiny.yaml"), "--out", str(out), "--quiet", "--set", "loggers=[tensorboard]"]
    env = {**os.environ, "STOP_PHASE": STOP_PHASE, "STOP_STEP": str(STOP_STEP), "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=300)
    assert proc.returncode == -9, proc.stderr
    first = sorted((out / "tensorboard" / APPEALNET).glob("events.out.tfevents.*"))
    assert len(first) == 1
    before = [e.step for e in EventFileLoader(str(first[0])).Load()
              if e.HasField("summary") and e.summary.value[0].tag == "train/loss"]
    assert before == list(range(1, STOP_STEP + 1))  # 8..10 are past the checkpoint (step 7): they come again

    assert main([*args, "--resume"]) == 0
    assert (out / "metrics.json").read_bytes() == (reference / "metrics.json").read_bytes()
    assert len(list((out / "tensorboard" / APPEALNET).glob("events.out.tfevents.*"))) == 2
    resumed, uninterrupted = scalars(out / "tensorboard" / APPEALNET), scalars(reference / "tensorboard" / APPEALNET)
    assert sorted(resumed) == sorted(uninterrupted)
    for tag, points in uninterrupted.items():
        assert resumed[tag] == points, tag  # each step once (the earlier attempt's 8..10 purged), same values
    shutil.rmtree(out)


def test_loggers_do_not_decide_training_so_a_run_resumes_with_them_changed(work):
    from cascade.engine.experiment import training_fingerprint

    plain = load_config(work / "tiny.yaml")
    logged = load_config(work / "tiny.yaml", overrides=["loggers=[tensorboard]"])
    assert logged.loggers[0].name == "tensorboard" and plain.loggers == []
    assert training_fingerprint(logged) == training_fingerprint(plain)
