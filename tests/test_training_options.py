"""Training options (issue 11): learning-rate schedules, Nesterov, label smoothing, bf16
autocast, channels-last, batched augmentation in the trainer, and the network cache that
lets later runs reuse a big network (and pre-trained stages) trained once.

Schedules and losses are checked against values worked out by hand; the cache against
runs that train, load, and miss when a setting that changes the network changes.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.utils.data import TensorDataset

from cascade import (
    CheckpointStore,
    ConfigError,
    FeatureNet,
    SupervisedObjective,
    Trainer,
)
from cascade.training.augment import random_crop_flip
from cascade.training.data import make_loader, with_oracle_outputs
from cascade.training.devices import resolve_amp, resolve_channels_last
from cascade.training.optim import build_optimizer
from cascade.training.phase import build_trainer
from cascade.training.checkpoint import NetworkCache, network_cache_dir
from cascade.cli import main
from cascade.config import OptimConfig, validate
from cascade.core.errors import CascadeError
from cascade.nn.losses import CrossEntropyTaskLoss, MaskedL2TaskLoss
from cascade.engine.experiment import Experiment
from cascade.contracts.stages import StageOutput, WhiteBoxOracle
from cascade.training.hooks import HookBase
from tests.conftest import REPO

# ============================================================================ schedules


def _lrs(oc: OptimConfig, steps_per_epoch: int, steps: int) -> list[float]:
    """The learning rate of each of the first ``steps`` optimizer steps."""
    opt, sched = build_optimizer([nn.Parameter(torch.zeros(1))], oc, steps_per_epoch)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_step_schedule_drops_by_gamma_at_each_milestone_epoch():
    oc = OptimConfig(epochs=4, lr=1.0, milestones=[1, 3], gamma=0.1)
    assert _lrs(oc, 3, 12) == pytest.approx([1.0] * 3 + [0.1] * 6 + [0.01] * 3)
    assert _lrs(oc, 1, 4) == pytest.approx([1.0, 0.1, 0.1, 0.01])  # stepped once per epoch: the same epochs


def test_cosine_schedule_follows_half_a_cosine_over_the_phase():
    oc = OptimConfig(epochs=2, lr=0.4, schedule="cosine")
    # 10 steps: lr_t = 0.4 * (1 + cos(pi t / 10)) / 2
    assert _lrs(oc, 5, 10) == pytest.approx([0.2 * (1 + math.cos(math.pi * t / 10)) for t in range(10)])


def test_one_cycle_rises_to_lr_then_anneals():
    oc = OptimConfig(epochs=2, lr=0.5, optimizer="sgd", schedule="one_cycle")
    lrs = _lrs(oc, 5, 10)
    # OneCycleLR: from max_lr / 25, up to max_lr at step 0.3 * 10 - 1 = 2, down to max_lr / 25 / 1e4 at the last
    assert lrs[0] == pytest.approx(0.5 / 25)
    assert lrs[2] == pytest.approx(0.5) and max(lrs) == pytest.approx(0.5)
    assert lrs[9] == pytest.approx(0.5 / 25 / 1e4)
    assert lrs[1] == pytest.approx(0.02 + (0.5 - 0.02) * (1 - math.cos(math.pi / 2)) / 2)  # cosine ramp, halfway


def test_warmup_ramps_linearly_and_keeps_the_milestones_where_they_were():
    oc = OptimConfig(epochs=3, lr=1.0, milestones=[2], gamma=0.5, warmup_epochs=1)
    # W = 4 steps: factor 1/4 + (3/4) t / 4 for t < 4, then 1; the milestone stays at epoch 2 (step 8)
    assert _lrs(oc, 4, 12) == pytest.approx([0.25, 0.4375, 0.625, 0.8125, 1, 1, 1, 1, 0.5, 0.5, 0.5, 0.5])
    cosine = OptimConfig(epochs=2, lr=1.0, schedule="cosine", warmup_epochs=0.5)
    assert _lrs(cosine, 4, 8) == pytest.approx([(0.5 + 0.5 * t / 2 if t < 2 else 1) * (1 + math.cos(math.pi * t / 8)) / 2
                                                for t in range(8)])
    one_cycle = OptimConfig(epochs=2, lr=1.0, schedule="one_cycle", warmup_epochs=0.5)
    assert max(range(10), key=_lrs(one_cycle, 5, 10).__getitem__) == 1  # the peak: at 2.5 / 10 of the steps - 1


def test_nesterov_reaches_the_sgd_optimizer():
    opt, _ = build_optimizer([nn.Parameter(torch.zeros(1))], OptimConfig(optimizer="sgd", nesterov=True))
    assert opt.param_groups[0]["nesterov"] is True and opt.param_groups[0]["momentum"] == 0.9


def test_config_errors_name_their_keys():
    data = {
        "task": {"name": "digits"},
        "big_train": {"schedule": "one_cycle", "milestones": [3]},
        "pretrain": {"schedule": "cosine", "gamma": 0.5, "nesterov": True},
        "finetune": {"epochs": 2, "warmup_epochs": 2},
        "amp": "fp16",
        "channels_last": "sometimes",
        "big_cache": "maybe",
    }
    with pytest.raises(ConfigError) as info:
        validate(data)
    errors = info.value.errors
    assert "big_train: milestones: only the step schedule has milestones (schedule is one_cycle)" in errors
    assert "pretrain: gamma: only the step schedule has gamma (schedule is cosine)" in errors
    assert "finetune: warmup_epochs: 2 must be shorter than the phase (epochs: 2)" in errors
    assert any(e.startswith("amp: Input should be 'auto', 'bf16' or 'off'") for e in errors), errors
    assert any(e.startswith("channels_last") for e in errors) and any(e.startswith("big_cache") for e in errors)
    with pytest.raises(ConfigError) as info:
        validate({"task": {"name": "digits"}, "pretrain": {"nesterov": True}})
    assert info.value.errors == ["pretrain: nesterov: Nesterov momentum is for optimizer: sgd (optimizer is adam)"]
    with pytest.raises(ConfigError) as info:
        validate({"task": {"name": "digits"}, "pretrain": {"optimizer": "sgd", "nesterov": True, "momentum": 0}})
    assert info.value.errors == ["pretrain: nesterov: needs momentum > 0"]


# ============================================================================ the trainer


class _Recorder(HookBase):
    """Records the learning rate after each step (the next step's: the scheduler steps
    with the optimizer); with ``stop_at``, requests a stop (as Ctrl-C does) after that step."""

    def __init__(self, stop_at: int | None = None):
        self.lrs: list[float] = []
        self.stop_at = stop_at

    def after_step(self, trainer, losses):
        self.lrs.append(trainer.optimizer.param_groups[0]["lr"])
        if trainer.step == self.stop_at:
            trainer._interrupt_requested = True


def _image_trainer(epochs: int, hooks=(), seed: int = 0, **options) -> Trainer:
    torch.manual_seed(seed)
    model = FeatureNet(nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten()), nn.Linear(32, 3), 32)
    data = TensorDataset(torch.randn(40, 1, 4, 4, generator=torch.Generator().manual_seed(1)),
                         torch.arange(40) % 3)
    loader = make_loader(data, 8, shuffle=True, seed=0)  # 5 steps an epoch
    oc = OptimConfig(epochs=epochs, batch_size=8, optimizer="sgd", lr=0.1, schedule="one_cycle")
    opt, sched = build_optimizer(model.parameters(), oc, steps_per_epoch=len(loader))
    return Trainer(model, SupervisedObjective(CrossEntropyTaskLoss()), opt, loader, epochs, list(hooks), sched,
                   scheduler_interval="step", **options)


def test_one_cycle_with_augmentation_resumes_exactly_mid_epoch(tmp_path):
    def augment(x):  # draws from torch's global generator
        return random_crop_flip(x, padding=1)

    straight = _image_trainer(3, [_Recorder()], augment=augment)
    CheckpointStore(tmp_path / "straight", {}).fit(straight)
    after = torch.rand(2)

    stopped = _image_trainer(3, [_Recorder(stop_at=7)], augment=augment)  # epoch 2, after its 2nd batch
    with pytest.raises(KeyboardInterrupt):
        CheckpointStore(tmp_path / "run", {}).fit(stopped)
    assert (stopped.step, stopped.batch) == (7, 2)
    resumed = _image_trainer(3, [_Recorder()], seed=99, augment=augment)  # other initial weights and RNG
    CheckpointStore(tmp_path / "run", {}, resume=True).fit(resumed)

    assert resumed.step == straight.step == 15
    assert stopped.hooks[0].lrs + resumed.hooks[0].lrs == straight.hooks[0].lrs  # the one-cycle lrs, step by step
    # the lr after step 14 is the last step's: the schedule's end
    assert straight.hooks[0].lrs[-2] == pytest.approx(0.1 / 25 / 1e4)
    for a, b in zip(resumed.model.parameters(), straight.model.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(torch.rand(2), after)  # the RNG continues as if never stopped


def test_augment_sees_every_training_batch_on_the_device_and_changes_what_is_learned():
    seen = []

    def augment(x):
        seen.append((tuple(x.shape), x.device.type))
        return x.flip(-1)

    plain, flipped = _image_trainer(1), _image_trainer(1, augment=augment)
    plain.train()
    flipped.train()
    assert seen == [((8, 1, 4, 4), "cpu")] * 5
    assert not torch.equal(plain.model.head.weight, flipped.model.head.weight)


def test_the_pipeline_trainer_augments_the_tasks_inputs_only():
    calls = []

    def augment(x):
        calls.append(tuple(x.shape))
        return x

    task = SimpleNamespace(augments=True, augment=augment, input_shape=(1, 4, 4))
    oc = OptimConfig(epochs=1, batch_size=8)
    images = TensorDataset(torch.randn(16, 1, 4, 4), torch.arange(16) % 3)
    features = TensorDataset(torch.randn(16, 32), torch.arange(16) % 3)  # a head trained on features
    image_net = _image_trainer(1).model
    head = FeatureNet(nn.Identity(), nn.Linear(32, 3), 32)
    for model, data in ((image_net, images), (head, features)):
        trainer = build_trainer(model, SupervisedObjective(CrossEntropyTaskLoss()), data, oc, 0, "phase", task=task,
                                device=torch.device("cpu"))
        assert trainer.scheduler_interval == "step" and len(trainer.loader) == 2
        trainer.train()
    assert calls == [(8, 1, 4, 4)] * 2


class _DtypeObjective(SupervisedObjective):
    """The supervised loss, recording the dtype and layout of what the network saw and gave."""

    def __init__(self):
        super().__init__(CrossEntropyTaskLoss())
        self.seen: list[tuple] = []

    def __call__(self, model, batch):
        out = model(batch[0])
        self.seen.append((batch[0].is_contiguous(memory_format=torch.channels_last), out.output.dtype))
        return {"loss": self.criterion.per_sample(out.output, batch[1]).mean()}


def test_amp_is_off_on_the_cpu_unless_asked_and_bf16_autocast_runs_the_forward():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_amp("auto", cpu) is None and resolve_amp("off", cuda) is None
    assert resolve_amp("bf16", cpu) is torch.bfloat16
    trainer = _image_trainer(1)
    trainer.objective = _DtypeObjective()
    trainer.train()
    assert {dtype for _, dtype in trainer.objective.seen} == {torch.float32}
    trainer = _image_trainer(1, amp_dtype=torch.bfloat16)
    trainer.objective = _DtypeObjective()
    before = trainer.model.head.weight.detach().clone()
    trainer.train()
    assert {dtype for _, dtype in trainer.objective.seen} == {torch.bfloat16}
    assert trainer.model.head.weight.dtype == torch.float32 and not torch.equal(trainer.model.head.weight, before)


def test_channels_last_on_the_cpu_still_trains():
    assert resolve_channels_last("auto", torch.device("cpu"), (3, 32, 32)) is False
    assert resolve_channels_last("auto", torch.device("cuda"), (3, 32, 32)) is True
    assert resolve_channels_last("auto", torch.device("cuda"), (64,)) is False
    with pytest.raises(CascadeError, match=r"channels_last: true needs image inputs \[C, H, W\]; the task's are \[64\]"):
        resolve_channels_last(True, torch.device("cpu"), (64,))
    reference, trainer = _image_trainer(2), _image_trainer(2, channels_last=True)
    trainer.objective = _DtypeObjective()
    reference.train()
    trainer.train()
    conv = trainer.model.features[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    assert {layout for layout, _ in trainer.objective.seen} == {True}
    # the same arithmetic in another memory layout: the same network, up to rounding
    assert torch.allclose(conv, reference.model.features[0].weight, atol=1e-5)


# ============================================================================ label smoothing


def test_label_smoothing_known_answer():
    logits = torch.tensor([[0.0, math.log(3.0)]])  # softmax [1/4, 3/4]
    y = torch.tensor([1])
    def model(x):
        return StageOutput(output=x)

    # (1 - e) * CE + e * mean_k(-log p_k), e = 0.2
    expected = 0.8 * -math.log(0.75) + 0.2 * -(math.log(0.25) + math.log(0.75)) / 2
    loss = SupervisedObjective(CrossEntropyTaskLoss(), label_smoothing=0.2)(model, (logits, y))["loss"]
    assert float(loss) == pytest.approx(expected, abs=1e-6)
    assert float(loss) == pytest.approx(float(F.cross_entropy(logits, y, label_smoothing=0.2)), abs=1e-6)
    plain = SupervisedObjective(CrossEntropyTaskLoss())(model, (logits, y))["loss"]
    assert float(plain) == pytest.approx(-math.log(0.75), abs=1e-6)
    with pytest.raises(ValueError, match="label_smoothing needs a classification loss; MaskedL2TaskLoss is regression"):
        SupervisedObjective(MaskedL2TaskLoss(), label_smoothing=0.1)


def test_oracle_outputs_are_not_precomputed_when_the_task_augments():
    data = TensorDataset(torch.randn(6, 4), torch.arange(6) % 2)
    oracle = WhiteBoxOracle(FeatureNet(nn.Identity(), nn.Linear(4, 2), 4), 1.0)
    assert len(with_oracle_outputs(data, oracle, 4, torch.device("cpu"))[0]) == 3
    assert with_oracle_outputs(data, oracle, 4, torch.device("cpu"), augments=True) is data


# ============================================================================ the network cache

TINY = """\
task: {name: digits}
seeds: [0]
threads: 1
modes: [white_box]
little: {name: mlp, hidden: [8]}
big: {name: cnn, channels: [4, 8], hidden: 16}
big_train: {epochs: 1, batch_size: 128, lr: 0.003}
pretrain: {epochs: 1, batch_size: 128, lr: 0.003}
finetune: {epochs: 1, batch_size: 128, lr: 0.003}
methods: [msp]
evaluation: {violation_resplits: 0}
"""


def _experiment(tmp_path, **changes) -> Experiment:
    data = yaml.safe_load(TINY)
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            data[section] = {**data[section], field: value}
        else:
            data[key] = value
    exp = Experiment(validate(data), tmp_path / "out", quiet=True)
    exp.network_cache = NetworkCache(tmp_path / "cache")  # what run() sets
    return exp


def _train_big(exp: Experiment, caplog) -> tuple[nn.Module, list[str], torch.Tensor]:
    """The big network of seed 0, the log lines about the cache, and what torch's RNG draws next."""
    splits = exp.task.build_splits(0)
    caplog.clear()
    torch.manual_seed(0)
    with caplog.at_level(logging.INFO, logger="cascade"):
        big = exp._train_big(0, splits.train)
    lines = [r.getMessage() for r in caplog.records]
    return big, [m for m in lines if "cache" in m and not m.startswith("phase ")], torch.rand(3)


def test_big_network_cache_hit_miss_and_invalidation(tmp_path, caplog):
    cache = tmp_path / "cache"
    first = _experiment(tmp_path)
    big, lines, rng = _train_big(first, caplog)
    [path] = cache.glob("big-cnn-*.pt")
    assert lines == [f"seed 0 big network: saved to cache {path}"]

    # another config (other methods and fine-tuning), the same big network: loaded, not trained
    again = _experiment(tmp_path, methods=["entropy"], finetune__epochs=3)
    loaded, lines, rng_after_load = _train_big(again, caplog)
    assert lines == [f"seed 0 big network: loaded from cache {path}"]
    for a, b in zip(loaded.state_dict().values(), big.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(rng_after_load, rng)  # what follows draws the same numbers, trained or loaded
    assert again.histories["seed 0 big"] == first.histories["seed 0 big"]  # the run records the same losses
    assert len(first.histories["seed 0 big"]) == 1

    # a setting that changes the trained network: a miss, and a second entry
    _, lines, _ = _train_big(_experiment(tmp_path, big_train__lr=0.01), caplog)
    assert len(lines) == 1 and lines[0].startswith("seed 0 big network: saved to cache")
    assert len(list(cache.glob("big-cnn-*.pt"))) == 2
    _, lines, _ = _train_big(_experiment(tmp_path, big_cache=False), caplog)
    assert lines == []
    assert not list(cache.glob("*.tmp")) and not list(cache.glob(".*"))


def test_cache_key_holds_what_changes_the_network_and_nothing_else(tmp_path):
    def key(**changes):
        exp = _experiment(tmp_path, **changes)
        return exp._cache_slot("big", "big", 0, exp.big_spec, exp.cfg.big_train).key

    base = key()
    assert key(methods=["gap"], finetune__lr=0.1, name="other", evaluation={"delta": 0.2}) == base
    for changes in ({"amp": "bf16"}, {"channels_last": True}, {"big_train__label_smoothing": 0.1},
                    {"big_train__schedule": "cosine"}, {"task": {"name": "digits", "test_fraction": 0.4}},
                    {"big": {"name": "cnn", "channels": [4, 8], "hidden": 32}}, {"perturb": {"label_noise": 0.1}}):
        assert key(**changes) != base, changes
    assert key(perturb={"shift": {"corruption": "blur"}}) == base  # test-time only


def test_a_damaged_entry_is_retrained_and_replaced_and_writes_are_atomic(tmp_path, caplog, monkeypatch):
    _train_big(_experiment(tmp_path), caplog)
    [path] = (tmp_path / "cache").glob("big-*.pt")
    good = torch.load(path, weights_only=True)["model"]
    path.write_bytes(path.read_bytes()[:200])  # truncated
    _, lines, _ = _train_big(_experiment(tmp_path), caplog)
    assert lines[0].startswith(f"network cache: {path}: not a readable checkpoint (truncated or corrupt")
    assert lines[1] == f"seed 0 big network: saved to cache {path}"
    replaced = torch.load(path, weights_only=True)["model"]
    assert all(torch.equal(replaced[k], v) for k, v in good.items())  # the same network again (deterministic)

    real_write_bytes = Path.write_bytes

    def full_disk(self, data):  # the archive is built in memory, then written: half of it, then the disk is full
        real_write_bytes(self, b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    with pytest.raises(CascadeError, match="cannot write it \\(No space left on device\\)"):
        NetworkCache(tmp_path / "cache").save({"k": 1}, "big-cnn", {"w": torch.ones(1)}, {})
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [path.name]  # no partial file, no temporary


def test_cache_folder_defaults_and_never_inside_the_source_tree(tmp_path, monkeypatch):
    monkeypatch.setenv("CASCADE_CACHE", str(tmp_path / "env"))
    assert network_cache_dir(None) == (tmp_path / "env").resolve()
    assert network_cache_dir(str(tmp_path / "set")) == (tmp_path / "set").resolve()
    monkeypatch.delenv("CASCADE_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert network_cache_dir(None) == (tmp_path / "home" / ".cache" / "cascade" / "networks").resolve()
    with pytest.raises(CascadeError, match=r"^cache_dir: .*/cache is inside the source tree"):
        network_cache_dir(str(REPO / "cache"))


def test_later_runs_reuse_the_big_and_pretrained_networks(tmp_path, capsys):
    cache = tmp_path / "cache"
    (tmp_path / "a.yaml").write_text(TINY + f"cache_dir: {cache}\n")
    (tmp_path / "b.yaml").write_text(TINY.replace("methods: [msp]", "methods: [entropy]") + f"cache_dir: {cache}\n")
    assert main(["run", str(tmp_path / "a.yaml"), "--out", str(tmp_path / "a"), "--quiet"]) == 0
    assert main(["run", str(tmp_path / "b.yaml"), "--out", str(tmp_path / "b"), "--quiet"]) == 0
    capsys.readouterr()
    [big] = cache.glob("big-cnn-*.pt")
    [little] = cache.glob("stage0-mlp-*.pt")
    log = (tmp_path / "b" / "run.log").read_text()
    assert f"seed 0 big network: loaded from cache {big}" in log
    assert f"seed 0 little pre-trained network: loaded from cache {little}" in log
    assert "phase seed 0 big: " in log and f"cached {big}, steps 7)" in log  # the timing records the reuse
    assert "saved to cache" not in log and "saved to cache" in (tmp_path / "a" / "run.log").read_text()
    a, b = (pd.read_csv(tmp_path / r / "samples.csv") for r in "ab")
    for col in ("big_correct", "stage0_correct", "stage0_pred"):  # the same networks, to the last prediction
        assert a[col].equals(b[col]), col
