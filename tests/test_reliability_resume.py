"""Checkpoints, resume and reproducibility (issue 5, items 3 and 4).

One tiny experiment (digits, both oracle modes, five training phases of 7 steps per
epoch: big, little pretrain, plain little, AppealNet white-box, AppealNet black-box) is
run three ways: uninterrupted, twice in-process (the same metrics.json, byte for byte);
and in a subprocess stopped by a real SIGINT in the middle of an epoch of its fourth
phase, then resumed with ``--resume`` (again the same metrics.json). The
interrupted run's folder also serves the refusal tests (a different config, a fresh run
over it, damaged or code-carrying checkpoint files).
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cascade import CheckpointError, CheckpointStore, FeatureNet, SupervisedObjective, Trainer
from cascade.cli import main
from cascade.nn.losses import CrossEntropyTaskLoss
from cascade.core.files import atomic_save, load_checkpoint
from tests.conftest import REPO

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
methods: [appealnet, msp]
"""
# the phases begun when interrupted (their checkpoint files)
PHASES = ["seed_0_big", "seed_0_little_pretrain", "seed_0_little", "seed_0_appealnet_white_box"]
STOP_PHASE, STOP_STEP = "seed 0 appealnet white_box", 10  # epoch 2, after its 3rd batch

# Runs the CLI and sends itself SIGINT (what Ctrl-C sends) after step STOP_STEP of phase
# STOP_PHASE. The trigger wraps a method rather than adding a hook, so the trainers (and
# their checkpoints) are the same as in a plain run.
INTERRUPTING_CLI = """\
import os, signal, sys
from cascade.cli import main
from cascade.training.hooks import HistoryHook

PHASE, STEP = os.environ["STOP_PHASE"], int(os.environ["STOP_STEP"])
_after_step = HistoryHook.after_step

def after_step(self, trainer, losses):
    _after_step(self, trainer, losses)
    if trainer.name == PHASE and trainer.step == STEP:
        os.kill(os.getpid(), signal.SIGINT)

HistoryHook.after_step = after_step
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("reliability")
    (path / "tiny.yaml").write_text(TINY)
    return path


def _run(*argv) -> int:
    # the configs set `threads: 1`, so the in-process runs and the interrupted subprocess
    # sum floats in the same order (the comparison is byte for byte); one thread is also
    # much the faster for networks this small on shared cores
    return main(["run", *map(str, argv), "--quiet"])


@pytest.fixture(scope="module")
def reference(work) -> Path:
    """An uninterrupted run."""
    assert _run(work / "tiny.yaml", "--out", work / "reference") == 0
    return work / "reference"


@pytest.fixture(scope="module")
def interrupted(work) -> tuple[subprocess.CompletedProcess, Path]:
    """A subprocess run stopped by SIGINT mid-epoch; returns it and a pristine copy of its folder."""
    script = work / "interrupting_cli.py"
    script.write_text(INTERRUPTING_CLI)
    out = work / "interrupted"
    env = {**os.environ, "STOP_PHASE": STOP_PHASE, "STOP_STEP": str(STOP_STEP), "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, str(script), "run", str(work / "tiny.yaml"), "--out", str(out), "--quiet"],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    shutil.copytree(out, work / "interrupted_pristine")
    return proc, work / "interrupted_pristine"


def _copy(pristine: Path, dest: Path) -> Path:
    shutil.copytree(pristine, dest)
    return dest


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ============================================================================ item 3: interrupt and resume


def test_interrupted_run_resumes_to_the_uninterrupted_metrics(work, reference, interrupted, capsys):
    proc, pristine = interrupted
    assert proc.returncode == 130, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"interrupted; continue with: cascade run {work / 'tiny.yaml'} --out {work / 'interrupted'} " \
           "--quiet --resume" in proc.stderr
    resume_dir = pristine / "checkpoints" / "resume"
    assert sorted(p.stem for p in resume_dir.glob("*.pt")) == sorted(PHASES)
    assert not list(resume_dir.glob("*.tmp")) and not (pristine / "metrics.json").exists()
    finished = load_checkpoint(resume_dir / "seed_0_little.pt")["trainer"]  # as long as the fine-tuning
    assert (finished["epoch"], finished["batch"]) == (2, 0)
    stopped = load_checkpoint(resume_dir / "seed_0_appealnet_white_box.pt")["trainer"]
    assert (stopped["epoch"], stopped["step"], stopped["batch"]) == (1, STOP_STEP, STOP_STEP - 7)  # mid-epoch

    out = _copy(pristine, work / "resumed")
    capsys.readouterr()
    assert _run(work / "tiny.yaml", "--out", out, "--resume") == 0
    assert "Traceback" not in capsys.readouterr().err
    assert (out / "metrics.json").read_bytes() == (reference / "metrics.json").read_bytes()
    assert (out / "samples.csv").read_bytes() == (reference / "samples.csv").read_bytes()
    log = (out / "run.log").read_text()
    assert "seed 0 big: resumed from" in log and "(finished, not trained again)" in log
    resumed = out / "checkpoints" / "resume" / "seed_0_appealnet_white_box.pt"
    assert f"seed 0 appealnet white_box: resumed from {resumed} at epoch 1, step {STOP_STEP} (continuing)" in log
    assert "seed 0 appealnet black_box: resumed" not in log  # not begun before the interrupt: trained afresh
    assert not (out / "checkpoints" / "resume").exists()  # finished: only the final weights stay
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == sorted(
        p.name for p in (reference / "checkpoints").iterdir())
    assert (out / "checkpoints" / "seed0_appealnet_white_box.pt").is_file()


# ============================================================================ item 4: reproducibility


def test_same_config_and_seed_give_identical_results(work, reference):
    assert _run(work / "tiny.yaml", "--out", work / "again") == 0
    for name in ("metrics.json", "samples.csv", "table.csv"):
        assert (work / "again" / name).read_bytes() == (reference / name).read_bytes(), name


# ============================================================================ item 3: refusals


@pytest.mark.parametrize("override, difference", [
    ("pretrain.lr=0.004", "pretrain.lr: 0.003 in the checkpoint, 0.004 now"),
    ("little.hidden=[12]", "little.hidden: [16] in the checkpoint, [12] now"),
    ("seeds=[0, 1]", "seeds: [0] in the checkpoint, [0, 1] now"),
])
def test_checkpoint_of_a_different_config_is_refused_naming_the_difference(work, interrupted, capsys, override,
                                                                           difference):
    out = _copy(interrupted[1], work / f"different_{override.partition('=')[0]}")
    before = _snapshot(out)
    capsys.readouterr()
    assert _run(work / "tiny.yaml", "--out", out, "--resume", "--set", override) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1
    assert f"error: {out / 'checkpoints' / 'resume'}/seed_0_" in err
    assert f".pt: written by a different config: {difference}" in err
    assert _snapshot(out) == before  # nothing written, nothing lost


def test_fresh_run_over_an_interrupted_one_is_refused(work, interrupted, capsys):
    out = _copy(interrupted[1], work / "fresh_over")
    before = _snapshot(out)
    capsys.readouterr()
    assert _run(work / "tiny.yaml", "--out", out) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"error: {out / 'checkpoints' / 'resume'}: an unfinished run (interrupted, or stopped by an error) left " \
           "checkpoints here; continue it with --resume" in err
    assert _snapshot(out) == before


class _RunsCode:
    """Unpickling this creates ``path``: what a malicious checkpoint could do."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


@pytest.mark.parametrize("damage", ["garbage", "truncated", "code", "foreign"])
def test_damaged_or_code_carrying_checkpoint_is_refused(work, interrupted, capsys, damage):
    out = _copy(interrupted[1], work / f"damaged_{damage}")
    target = out / "checkpoints" / "resume" / "seed_0_little_pretrain.pt"
    marker = work / f"code_ran_{damage}"
    if damage == "garbage":
        target.write_bytes(b"\x80\x02 not a checkpoint")
        message = "not a readable checkpoint (truncated or corrupt"
    elif damage == "truncated":
        target.write_bytes(target.read_bytes()[:300])
        message = "not a readable checkpoint (truncated or corrupt"
    elif damage == "code":
        torch.save({"format": 1, "trainer": _RunsCode(marker)}, target)
        message = "refused: it holds more than tensors and plain data (io.open), and loading it would run code"
    else:
        torch.save({"model": {"w": torch.zeros(2)}}, target)  # weights, but not a training checkpoint
        message = "not a cascade training checkpoint"
    capsys.readouterr()
    assert _run(work / "tiny.yaml", "--out", out, "--resume") == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1
    assert f"error: {target}: {message}" in err
    assert not marker.exists()


def _tiny_trainer(width: int, epochs: int = 2) -> Trainer:
    torch.manual_seed(0)
    model = FeatureNet(nn.Identity(), nn.Linear(4, width), 4)  # a network returns a StageOutput
    data = TensorDataset(torch.randn(32, 4), torch.randint(0, width, (32,)))
    loader = DataLoader(data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
    return Trainer(model, SupervisedObjective(CrossEntropyTaskLoss()), torch.optim.SGD(model.parameters(), lr=0.1),
                   loader, epochs, name="phase")


def test_checkpoint_of_a_different_network_is_refused_naming_what_differs(tmp_path):
    # the config is the same (same fingerprint) but the network is not, as after a code change
    CheckpointStore(tmp_path, {"lr": 0.1}).fit(_tiny_trainer(width=3))
    store = CheckpointStore(tmp_path, {"lr": 0.1}, resume=True)
    with pytest.raises(CheckpointError) as info:
        store.fit(_tiny_trainer(width=5))
    assert str(info.value) == (f"{tmp_path / 'phase.pt'}: phase: the network differs from the checkpoint's: "
                               "head.weight [3, 4] in the checkpoint, [5, 4] now; head.bias [3] in the checkpoint, [5] now")


def test_finished_phase_is_loaded_not_retrained_and_continues_the_rng(tmp_path):
    straight = _tiny_trainer(3, epochs=2)
    CheckpointStore(tmp_path / "a", {}).fit(straight)
    after_straight = torch.rand(3)
    resumed = _tiny_trainer(3, epochs=2)
    torch.manual_seed(123)  # whatever the RNG holds before, the checkpoint's state wins
    CheckpointStore(tmp_path / "a", {}, resume=True).fit(resumed)
    assert resumed.step == straight.step == 8
    assert torch.equal(resumed.model.head.weight, straight.model.head.weight)
    assert torch.equal(torch.rand(3), after_straight)


def test_checkpoints_are_written_atomically(tmp_path):
    path = tmp_path / "ckpt.pt"
    atomic_save({"w": torch.ones(2)}, path)
    with pytest.raises(Exception):
        atomic_save({"w": lambda: None}, path)  # fails while writing: a lambda does not pickle
    assert torch.equal(load_checkpoint(path)["w"], torch.ones(2))  # the old file, whole
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary file left


def test_every_torch_load_uses_weights_only():
    calls = []
    for folder in ("cascade", "tasks", "baselines", "benchmarks"):
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                        and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
                    safe = any(k.arg == "weights_only" and getattr(k.value, "value", None) is True
                               for k in node.keywords)
                    calls.append((f"{path.relative_to(REPO)}:{node.lineno}", safe))
    assert calls, "no torch.load found: the scan is broken"
    assert [where for where, safe in calls if not safe] == []


# ============================================================================ the same for K = 3 stages

TINY_CASCADE = """\
task: {name: digits}
seeds: [0]
threads: 1
modes: [white_box]
stages: [{name: mlp, hidden: [8]}, {name: mlp, hidden: [32]}]
big: {name: cnn, channels: [4, 8], hidden: 16}
big_train: {epochs: 1, batch_size: 128, lr: 0.003}
pretrain: {epochs: 1, batch_size: 128, lr: 0.003}
finetune: {epochs: 2, batch_size: 128, lr: 0.003}
methods: [{name: reinforce, alphas: [0.05]}, msp]
"""


def test_interrupted_cascade_run_resumes_to_the_uninterrupted_metrics(tmp_path):
    (tmp_path / "c.yaml").write_text(TINY_CASCADE)
    assert _run(tmp_path / "c.yaml", "--out", tmp_path / "reference") == 0
    script = tmp_path / "interrupting_cli.py"
    script.write_text(INTERRUPTING_CLI)
    # 897 training inputs / 128 = 7 steps an epoch (the ragged batch dropped): step 12 is
    # inside the policy's second epoch
    env = {**os.environ, "STOP_PHASE": "seed 0 reinforce white_box a0.05", "STOP_STEP": "12", "OMP_NUM_THREADS": "2"}
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(script), "run", str(tmp_path / "c.yaml"), "--out", str(out), "--quiet"],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert proc.returncode == 130, proc.stderr
    assert not (out / "metrics.json").exists()
    stopped = load_checkpoint(out / "checkpoints" / "resume" / "seed_0_reinforce_white_box_a0.05.pt")["trainer"]
    assert (stopped["epoch"], stopped["step"]) == (1, 12)
    assert _run(tmp_path / "c.yaml", "--out", out, "--resume") == 0
    assert (out / "metrics.json").read_bytes() == (tmp_path / "reference" / "metrics.json").read_bytes()
    assert not (out / "checkpoints" / "resume").exists()
