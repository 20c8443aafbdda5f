"""Several processes: ``torchrun --nproc_per_node N -m cascade run`` (cascade.training.distributed).

Each rank takes an equal, disjoint share of every batch, DDP averages the gradients, so
a step of 2 ranks computes the single process's step up to the order in which floats are
summed. The end-to-end test resumes, with 2 gloo processes on the CPU, a single-process
run interrupted mid-epoch, and compares the result with an uninterrupted single-process
run: resume, DDP training with the AppealNet lambda controller, and rank-0-only writing
in one torchrun call.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

import cascade.training.distributed
from cascade.training.data import make_loader
from cascade.cli import main
from cascade.core.errors import CascadeError
from cascade.training.hooks import HistoryHook
from cascade.training.rng import loader_generators
from tests.conftest import REPO


def _labels(loader) -> list[list[int]]:
    return [batch[1].tolist() for batch in loader]


def test_every_rank_takes_an_equal_disjoint_share_of_every_batch():
    data = TensorDataset(torch.zeros(50, 1), torch.arange(50))
    single = _labels(make_loader(data, 8, shuffle=True, seed=3))  # 6 batches (the ragged one dropped)
    shards = [_labels(make_loader(data, 8, shuffle=True, seed=3, shard=(r, 2))) for r in range(2)]
    assert len(single) == len(shards[0]) == len(shards[1]) == 6
    for whole, first, second in zip(single, *shards):
        assert first + second == whole and len(first) == len(second) == 4
    # the shuffling generator is found through the shard (a resumed epoch replays it)
    assert len(loader_generators(make_loader(data, 8, shuffle=True, seed=3, shard=(1, 2)))) == 1
    # an evaluation loader keeps the ragged batch; three ranks split 50 % 8 = 2 as 0, 1, 1
    last = [_labels(make_loader(data, 8, shuffle=False, seed=0, shard=(r, 3)))[-1] for r in range(3)]
    assert last == [[], [48], [49]]


class _Listed(Dataset):
    """Data not held in memory as tensors (a DataLoader collates its items)."""

    def __len__(self) -> int:
        return 20

    def __getitem__(self, i: int):
        return torch.zeros(1), i


def test_data_not_in_memory_is_sharded_the_same_way():
    single = _labels(make_loader(_Listed(), 4, shuffle=True, seed=1))
    shards = [_labels(make_loader(_Listed(), 4, shuffle=True, seed=1, shard=(r, 2))) for r in range(2)]
    assert [a + b for a, b in zip(*shards)] == single


def test_a_single_process_is_not_distributed():
    assert not cascade.training.distributed.is_distributed() and cascade.training.distributed.shard() is None
    assert cascade.training.distributed.world_size() == 1 and cascade.training.distributed.is_main()
    assert cascade.training.distributed.broadcast("x") == "x"


TINY = """\
task: {name: digits}
seeds: [0]
threads: 1
modes: [white_box]
little: {name: mlp, hidden: [16]}
big: {name: mlp, hidden: [32]}
big_train: {epochs: 1, batch_size: 64, lr: 0.003}
pretrain: {epochs: 1, batch_size: 64, lr: 0.003}
finetune: {epochs: 2, batch_size: 64, lr: 0.003}
methods: [appealnet]
evaluation: {violation_resplits: 0}
"""


def test_batch_size_must_split_evenly_over_the_processes(tmp_path, monkeypatch):
    import yaml

    from cascade.config import validate
    from cascade.engine.experiment import Experiment

    exp = Experiment(validate(yaml.safe_load(TINY)), tmp_path, quiet=True)
    monkeypatch.setattr(cascade.training.distributed, "world_size", lambda: 3)
    with pytest.raises(CascadeError, match="^seed 0 big: batch_size 64 does not split evenly over 3 processes; "
                                           "use a multiple of 3$"):
        exp._train_big(0, exp.task.build_splits(0).train)


def test_two_gloo_processes_resume_a_run_and_match_the_single_process(tmp_path, monkeypatch, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY)
    assert main(["run", str(config), "--out", str(tmp_path / "single"), "--quiet"]) == 0

    # the same run, stopped after step 17 (epoch 2 of 2, batch 3 of 14) of the plain little network
    after_step = HistoryHook.after_step

    def stopping(self, trainer, losses):
        after_step(self, trainer, losses)
        if trainer.name == "seed 0 little" and trainer.step == 17:
            trainer._interrupt_requested = True  # what Ctrl-C does

    monkeypatch.setattr(HistoryHook, "after_step", stopping)
    out = tmp_path / "ddp"
    assert main(["run", str(config), "--out", str(out), "--quiet"]) == 130
    monkeypatch.undo()
    capsys.readouterr()

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
         "-m", "cascade", "run", str(config), "--out", str(out), "--quiet", "--resume"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("# digits: 2-stage cascade") == 1  # rank 1 trains and prints nothing

    log = (out / "run.log").read_text()  # one writer: every line once
    assert log.count("seed 0 big: resumed from") == 1 and log.count("phase seed 0 appealnet white_box:") == 1
    assert log.count(f"seed 0 little: resumed from {out / 'checkpoints' / 'resume' / 'seed_0_little.pt'} "
                     "at epoch 1, step 17 (continuing)") == 1
    assert not (out / "checkpoints" / "resume").exists()

    single, ddp = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("single", "ddp"))
    # Tolerance: two ranks' mean gradients are the single process's up to float rounding
    # (another summation order, ~1e-7 relative a step), which after ~40 steps moves weights
    # by ~1e-6 and can flip a prediction only at a near-tie: a test input or two of 540.
    assert single["accuracy"].keys() == ddp["accuracy"].keys()
    for net, acc in single["accuracy"].items():
        assert abs(ddp["accuracy"][net] - acc) <= 2 / 540, net
    for name in ("seed0_stage0.pt", "seed0_appealnet_white_box.pt"):  # trained (in part) by the 2 ranks
        a, b = (torch.load(tmp_path / d / "checkpoints" / name, weights_only=True) for d in ("single", "ddp"))
        for key in a:
            assert torch.allclose(a[key].float(), b[key].float(), atol=1e-5), (name, key)
    # the lambda controller read the losses averaged over the ranks: the same multiplier
    lam = [m["training"]["seed 0 appealnet white_box"][-1]["lambda"] for m in (single, ddp)]
    assert lam[0] == pytest.approx(lam[1], rel=1e-6)
