"""The cascade pipeline: one recipe for every K >= 2, AppealNet's two stages included.

Per seed:

1. the big network (white-box last stage) is trained with ``big_train``, or loaded;
2. every routed stage (``little`` or ``stages``, cheapest first) is pre-trained with
   ``pretrain``, or loaded;
3. the *plain* stages: each pre-trained stage fine-tuned alone with ``finetune`` (as long,
   on the same data, as every trained method: the post-hoc scores read these);
4. every trained method (:class:`~cascade.methods.TrainedMethod`) builds and trains its
   systems from the pre-trained stages, once per mode (its oracle differs);
5. every post-hoc method (:class:`~cascade.contracts.roles.Predictor`) prepares itself on each
   plain stage;
6. every network runs once over the calibration and test splits into the per-sample
   table (``samples.csv``); every operating point is computed from it
   (:mod:`cascade.evaluation`), as is how often val-tuned and guaranteed thresholds miss
   their target on random re-splits of it, and the report is views of that one table.

Each training phase checkpoints after every epoch and on Ctrl-C into
``checkpoints/resume/``; ``run(resume=True)`` replays the run from there and the
results equal an uninterrupted run's.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from cascade.training import distributed
from cascade.training.building import (
    BIG,
    build_network,
    build_task,
    build_trainer,
    data_on_device,
    freeze,
    holdout_split,
    make_loader,
    phase_seed,
    resolve_amp,
    resolve_channels_last,
    resolve_device,
    resolve_specs,
    seeded_rng,
    stage_name,
    system_name,
    with_oracle_outputs,
)
from cascade.training.checkpoint import CheckpointStore, NetworkCache, network_cache_dir
from cascade.config import ExperimentConfig, NetworkSpec, OptimConfig, resolved_dict
from cascade.nn.cost import measure_cost
from cascade.core.errors import CascadeError, CheckpointError
from cascade.evaluation import (
    ORACLE,
    Variant,
    aggregate,
    comparisons,
    gap_table,
    operating_points,
    threshold_violations,
)
from cascade.methods import CascadeContext, MethodEntry, MethodKind, RoutedSystem, build_methods, scorer_key
from cascade.nn.objectives import Objective, SupervisedObjective
from cascade.nn.perturb import perturb_splits
from cascade.contracts.roles import Approximator, BlackBoxOracle, MethodContext, Mode, Oracle, Splits, Task, TaskKind, WhiteBoxOracle
from cascade.runs.record import clear_record, write_record
from cascade.runs.writer import RunWriter, timed_phase
from cascade.training.trainer import HistoryHook, HookBase, ProgressHook, Trainer
from cascade.training.checks import constant_answer_problem, degenerate_training, loss_rise_problem

log = logging.getLogger("cascade")

#: a trained system whose first-stage scores on the test split all lie within this range has collapsed
COLLAPSE_RANGE = 1e-3

#: config keys that cannot change what training computes: a run may be resumed with them
#: changed (``seeds`` is not one: the files of the seeds left out would be lost at the end)
RESUME_IGNORES = ("name", "quick", "data_on_device", "big_cache", "pretrain_cache", "cache_dir", "checks")


class _CacheSlot(NamedTuple):
    """Where a training phase's network is kept in the :class:`NetworkCache`."""

    what: str  # the network, in messages: "seed 0 big"
    label: str  # starts the file name: "big-resnet101_cifar"
    key: dict[str, Any]  # everything that decides the trained network

def training_fingerprint(cfg: ExperimentConfig) -> dict[str, Any]:
    """The resolved config without :data:`RESUME_IGNORES`: what a training checkpoint
    must have been written under to be resumed."""
    data = resolved_dict(cfg)
    for key in RESUME_IGNORES:
        data.pop(key, None)
    return data


def checkpoint_store(cfg: ExperimentConfig, out_dir: Path, resume: bool) -> CheckpointStore:
    """The run's resumable training checkpoints, ``<out>/checkpoints/resume/``, checked
    before any work.

    Raises:
        CheckpointError: an unfinished run's checkpoints are there and ``resume`` is off,
            or a checkpoint was written under a different config or is unreadable.
    """
    store = CheckpointStore(Path(out_dir) / "checkpoints" / "resume", training_fingerprint(cfg), resume)
    if resume:
        store.verify()
        if not store.files():
            log.warning("%s: no checkpoint to resume from; starting from scratch", store.folder)
    elif store.files():
        raise CheckpointError(f"{store.folder}: an unfinished run (interrupted, or stopped by an error) left "
                              "checkpoints here; continue it with --resume, or delete that folder (or choose another "
                              "--out) to start over")
    return store


class Experiment:
    """Runs one config over all its seeds and writes the output folder.

    Args:
        cfg: a validated config.
        out_dir: where results go (created when the run starts).
        quiet: no progress bars.
        source: the config file's path, for messages and ``metrics.json``.
        cache: trained weights shared between runs of one process that differ only
            downstream (an ablation reuses the big and the pre-trained stages).

    Raises:
        CascadeError: the task cannot be built, or a method does not suit it.
    """

    def __init__(self, cfg: ExperimentConfig, out_dir: str | Path, quiet: bool = False, source: str = "",
                 cache: dict[str, dict] | None = None):
        self.cfg = cfg
        self.out = Path(out_dir)
        self.quiet = quiet
        self.source = source
        self.cache = cache
        self.device = distributed.local_device(resolve_device(cfg.device))
        self.task = _construct_task(cfg)
        self.kind = TaskKind(self.task.criterion.kind)
        self.stage_specs, self.big_spec = resolve_specs(cfg, self.task)
        self.modes = [Mode(m) for m in cfg.modes]
        self.methods: list[MethodEntry] = build_methods(cfg.methods, self.kind)
        #: the config's amp and channels_last, resolved for the device
        self.amp = resolve_amp(cfg.amp, self.device)
        self.channels_last = resolve_channels_last(cfg.channels_last, self.device, tuple(self.task.input_shape))
        for key in ("big_train", "pretrain", "finetune"):
            if getattr(cfg, key).label_smoothing and self.kind != TaskKind.CLASSIFICATION:
                raise CascadeError(f"{key}.label_smoothing: label smoothing is for classification; the task "
                                   f"{cfg.task.name} is {self.kind.value} (set it to 0)")
        #: trained networks kept across runs (set by run(): see big_cache, pretrain_cache)
        self.network_cache: NetworkCache | None = None
        self._device_data: dict[int, tuple[Dataset, Dataset]] = {}
        self.histories: dict[str, list[dict[str, float]]] = {}
        #: names of the criterion's extra per-sample errors (``rmse``...), columns ``<network>_<name>``
        self.error_names: set[str] = set()
        self.checkpoints: CheckpointStore | None = None
        self.writer: RunWriter | None = None
        #: the seed's calibration split, on which trained networks are checked (inside run())
        self._cal: Dataset | None = None

    @property
    def trained_methods(self) -> list[MethodEntry]:
        return [m for m in self.methods if m.kind == MethodKind.TRAINED]

    @property
    def post_hoc_methods(self) -> list[MethodEntry]:
        return [m for m in self.methods if m.kind == MethodKind.POST_HOC]

    # -- checks -------------------------------------------------------------------------

    def check(self, seed: int | None = None, networks: bool = True) -> Splits:
        """Check the task, its data and (with ``networks``) its networks on one batch of
        each split, before any training (:func:`cascade.engine.checks.check_task`); the seed's splits.

        Raises:
            CascadeError: the first problem, in one line naming the class, key or split.
        """
        from cascade.engine.checks import check_task

        seed = self.cfg.seeds[0] if seed is None else seed
        return check_task(self, seed, networks)

    # -- training -----------------------------------------------------------------------

    def _fit(self, model: nn.Module, objective: Objective, data: Dataset, oc: OptimConfig, seed: int, desc: str,
             hooks: tuple[HookBase, ...] = (), params=None, cache: _CacheSlot | None = None,
             checked: str | None = None) -> None:
        """Train one phase: checkpointed inside :meth:`run`, on every process under torchrun
        (each taking its share of every batch). With ``cache``, the network is loaded from
        the network cache when it holds it, else trained and stored there. ``checked``: the
        config key of a supervised phase (``big_train``...), whose network is checked once
        trained (:mod:`cascade.training.checks`), before it is cached."""
        world = distributed.world_size()
        if oc.batch_size % world:
            raise CascadeError(f"{desc}: batch_size {oc.batch_size} does not split evenly over {world} processes; "
                               f"use a multiple of {world}")
        train_data = self._on_device(data)
        history = HistoryHook()
        trainer = build_trainer(model, objective, train_data, oc, seed, desc, task=self.task, device=self.device,
                                hooks=[*hooks, history, ProgressHook(desc, self.quiet or not distributed.is_main())],
                                params=params, amp_dtype=self.amp, channels_last=self.channels_last,
                                pin_memory=self.device.type == "cuda" and train_data is data)
        cached = self._cache_lookup(cache, model) if cache is not None else None
        finished = None
        if cached is not None:
            def finished(t: Trainer, entry=cached[1]) -> None:
                t.load_finished(entry["model"], entry["steps"], {history: entry["history"]})

        with timed_phase(desc, device=self.device.type, samples=len(data), epochs=oc.epochs) as facts:
            if cached is not None:
                log.info("%s network: loaded from cache %s", cache.what, cached[0])
                facts["cached"] = str(cached[0])
            if self.checkpoints is not None:  # inside run(): checkpointed, resumable
                self.checkpoints.fit(trainer, finished)
            else:
                if finished is not None:
                    finished(trainer)
                trainer.train()
            facts["steps"] = trainer.step
        self.histories[desc] = history.history
        if checked is not None and oc.epochs > 0:
            self._check_phase(desc, checked, oc, model, history)
        if cache is not None and cached is None and distributed.is_main():
            path = self.network_cache.save(cache.key, cache.label, model.state_dict(),
                                           {"steps": trainer.step, "history": history.state_dict()})
            log.info("%s network: saved to cache %s", cache.what, path)

    def _check_phase(self, desc: str, key: str, oc: OptimConfig, model: nn.Module, history: HistoryHook) -> None:
        """Stop the run when a supervised phase's loss rose or training left its network worse
        than a constant answer on the calibration split (see :mod:`cascade.training.checks`)."""
        problem = loss_rise_problem(history.history)
        if problem is None and self._cal is not None:
            problem = constant_answer_problem(model, self.task.criterion, self._cal, self.cfg.evaluation.batch_size,
                                              self.device, start_loss=history.first_loss)
        degenerate_training(desc, key, oc.lr, [problem], self.cfg.checks.allow_degenerate)

    def _cache_slot(self, what: str, label: str, seed: int, spec: NetworkSpec, oc: OptimConfig,
                    **extra: Any) -> _CacheSlot | None:
        """The cache slot of a phase, or None outside :meth:`run` or with the cache off.

        The key holds what decides the trained network: the task's options, the
        perturbations of the training data, the network, the phase's settings, the seed
        and the training settings that change its numbers (device type, amp,
        channels-last). Not the number of processes (torchrun: the same global batches,
        so the same network but for rounding and batch-norm statistics; a big network
        trained on 8 GPUs serves runs on one), the torch version, nor the data files'
        contents: a task reading other data under the same options must change them.
        """
        if self.network_cache is None:
            return None
        perturb = {k: v for k, v in self.cfg.perturb.model_dump(mode="json").items() if k != "shift"}  # shift: test only
        key = {"network": label, "task": self.cfg.task.model_dump(mode="json"), "perturb": perturb,
               "spec": spec.model_dump(mode="json"), "train": oc.model_dump(mode="json"), "seed": seed,
               "device": self.device.type, "amp": str(self.amp), "channels_last": self.channels_last, **extra}
        return _CacheSlot(what, f"{label}-{spec.name}", key)

    def _cache_lookup(self, slot: _CacheSlot, model: nn.Module) -> tuple[Path, dict] | None:
        """``(file, entry)`` of ``slot`` in the network cache, or None; rank 0 decides for
        every rank (a rank that trained while another loaded would wait for it forever)."""
        found = self.network_cache.load(slot.key, slot.label) if distributed.is_main() else None
        if found is not None:
            differences = NetworkCache.fits(found[1], model)
            if differences:
                log.warning("network cache: %s does not fit %s (%s); training instead, and replacing it",
                            found[0], slot.what, differences)
                found = None
        path = distributed.broadcast(str(found[0]) if found is not None else None)
        if path is not None and found is None:  # another rank: read what rank 0 found
            found = self.network_cache.load(slot.key, slot.label)
            if found is None:
                raise CheckpointError(f"{path}: rank {distributed.rank()} cannot read the cached network rank 0 read")
        return found

    def _on_device(self, data: Dataset) -> Dataset:
        """``data`` moved to the GPU per the config's ``data_on_device`` (once per seed)."""
        if self.device.type != "cuda" or self.cfg.data_on_device is False:
            return data
        moved = self._device_data.get(id(data))
        if moved is None or moved[0] is not data:
            moved = self._device_data[id(data)] = (data, data_on_device(data, self.device, self.cfg.data_on_device))
        return moved[1]

    def _cached_fit(self, key: list[Any], model: nn.Module, fit: Callable[[], None]) -> None:
        # the task and its perturbations decide the data every cached phase trains on
        dump = json.dumps([self.cfg.task.model_dump(mode="json"), self.cfg.perturb.model_dump(mode="json"),
                           *[p.model_dump(mode="json") if hasattr(p, "model_dump") else p for p in key]],
                          sort_keys=True)
        if self.cache is not None and dump in self.cache:
            model.load_state_dict(self.cache[dump])
            return
        fit()
        if self.cache is not None:
            self.cache[dump] = copy.deepcopy(model.state_dict())

    def build_big(self) -> Approximator | None:
        """The big network, untrained (or loaded from its checkpoint), or None."""
        if self.big_spec is None:
            return None
        return build_network(self.big_spec, self.task, "big").to(self.device)

    def _train_big(self, seed: int, train: Dataset) -> Approximator | None:
        cfg = self.cfg
        with seeded_rng(phase_seed(seed, "big_init"), self.device):  # see seeded_rng: the cache relies on it
            big = self.build_big()
            if big is None:
                return None
            if Mode.WHITE_BOX in self.modes and not self.big_spec.given:
                cache = self._cache_slot(f"seed {seed} big", BIG, seed, self.big_spec, cfg.big_train) \
                    if cfg.big_cache else None
                self._cached_fit([BIG, seed, self.big_spec, cfg.big_train], big, lambda: self._fit(
                    big, SupervisedObjective(self.task.criterion, cfg.big_train.label_smoothing), train, cfg.big_train,
                    phase_seed(seed, "big"), f"seed {seed} big", cache=cache, checked="big_train"))
        return freeze(big)

    def _train_stages(self, seed: int, pre_data: Dataset, tune_data: Dataset) -> tuple[list, list]:
        """``(pre-trained, plain)`` routed stages."""
        cfg, crit = self.cfg, self.task.criterion
        pretrained = []
        for k, spec in enumerate(self.stage_specs):
            with seeded_rng(phase_seed(seed, "pretrain_init", stage=k), self.device):  # as the big network's
                net = build_network(spec, self.task, self._stage_key(k)).to(self.device)
                if not spec.given:
                    cache = self._cache_slot(f"{self._phase(seed, k, '')} pre-trained", stage_name(k), seed, spec,
                                             cfg.pretrain, stage=k, finetune_data=cfg.finetune_data,
                                             holdout_fraction=cfg.holdout_fraction) if cfg.pretrain_cache else None
                    self._cached_fit(["pretrain", seed, k, spec, cfg.pretrain, cfg.finetune_data, cfg.holdout_fraction],
                                     net, lambda net=net, k=k, cache=cache: self._fit(
                                         net, SupervisedObjective(crit, cfg.pretrain.label_smoothing), pre_data,
                                         cfg.pretrain, phase_seed(seed, "pretrain", stage=k),
                                         self._phase(seed, k, "pretrain"), cache=cache, checked="pretrain"))
            pretrained.append(net)
        plain = []
        for k, net in enumerate(pretrained):
            net = copy.deepcopy(net)
            # fairness: the post-hoc scores' stages train as long, on the same data, as any trained method
            self._fit(net, SupervisedObjective(crit, cfg.finetune.label_smoothing), tune_data, cfg.finetune,
                      phase_seed(seed, "plain", stage=k), self._phase(seed, k, ""), checked="finetune")
            plain.append(freeze(net))
        return pretrained, plain

    def _stage_key(self, k: int) -> str:
        return f"stages.{k}" if self.cfg.stages is not None else "little"

    def _phase(self, seed: int, k: int, what: str) -> str:
        name = "little" if len(self.stage_specs) == 1 else f"stage {k}"
        return " ".join(p for p in (f"seed {seed}", name, what) if p)

    def oracle(self, mode: Mode, big: Approximator | None, costs: dict[str, dict]) -> Oracle:
        """The cascade's last stage in ``mode``, with its cost."""
        if mode == Mode.WHITE_BOX:
            return WhiteBoxOracle(big, costs[BIG]["mflops"])
        mflops = self.cfg.oracle_mflops or self.task.oracle_mflops
        if mflops is None and BIG in costs:
            mflops = costs[BIG]["mflops"]
        return BlackBoxOracle(mflops)

    def context(self, seed: int, mode: Mode, job: int, pretrained: list, plain: list, oracle: Oracle,
                data: Dataset, method: str, costs: dict[str, dict]) -> CascadeContext:
        """What trained method number ``job`` gets; its phases are ``seed S <method> <mode> ...``."""
        calls = [0]

        def fit(model, objective, data, desc="", param_groups=None, hooks=()):
            name = " ".join(p for p in (f"seed {seed} {method}", mode.value, desc) if p)
            self._fit(model, objective, data, self.cfg.finetune,
                      phase_seed(seed, "trained", index=job, stage=calls[0]), name, tuple(hooks), param_groups)
            calls[0] += 1

        plain_costs = [costs[stage_name(k)]["mflops"] for k in range(len(plain))]
        return CascadeContext(
            task=self.task, mode=mode, pretrained=pretrained, plain=plain, oracle=oracle,
            stage_mflops=plain_costs + [oracle.cost_mflops], data=data, finetune=self.cfg.finetune,
            device=self.device, fit=fit,
            with_oracle_outputs=lambda d, o: with_oracle_outputs(d, o, self.cfg.evaluation.batch_size, self.device,
                                                                 augments=self.task.augments),
        )

    # -- the whole run ------------------------------------------------------------------

    def run(self, resume: bool = False) -> dict[str, Any]:
        """Check, train, evaluate every method, write the output folder; the metrics.

        Args:
            resume: continue an interrupted run in the same folder: finished phases are
                loaded instead of trained, the interrupted one continues where it stopped,
                and the metrics come out as an uninterrupted run's would.

        Under torchrun (:mod:`cascade.training.distributed`) every process trains; only rank 0
        evaluates and writes, and the others return ``{}``.

        Raises:
            CascadeError: the task, its data or networks fail the checks (before any
                training); checkpoints that do not fit (before any work); a NaN loss.
            KeyboardInterrupt: Ctrl-C, after the running phase saved its checkpoint.
        """
        with distributed.session(self.device) as self.device:
            cfg = self.cfg
            if cfg.big_cache or cfg.pretrain_cache:
                self.network_cache = NetworkCache(network_cache_dir(cfg.cache_dir))
            self.checkpoints = checkpoint_store(cfg, self.out, resume)
            distributed.barrier()  # every rank has checked the folder before rank 0 writes into it
            main = distributed.is_main()
            if main:  # before any write: from here until write_record the folder is unfinished
                clear_record(self.out)
            self.writer = RunWriter(self.out) if main else None
            try:
                with self.writer.logging_to_file(append=resume) if main else contextlib.nullcontext():
                    metrics = self._run()
                if main:
                    self.checkpoints.clear()  # the final weights are in checkpoints/
                    write_record(self.out, self.source)  # the run's last write: it finished
                return metrics
            finally:
                self.checkpoints = None
                self.network_cache = None

    def _run(self) -> dict[str, Any]:
        cfg, w = self.cfg, self.writer
        config = resolved_dict(cfg)
        # the methods as run: the task kind's defaults filled in, every option spelled out
        config["methods"] = [{"name": name, **m.options.model_dump(mode="json", by_alias=True, exclude_none=True)}
                             for m, name in zip(self.methods, self._method_names())]
        if w is not None:  # rank 0
            w.yaml("config.yaml", config)
        log.info("run %s: task %s, %d routed stage(s), modes %s, methods %s, device %s", self.source or "<config>",
                 cfg.task.name, len(self.stage_specs), [m.value for m in self.modes],
                 [m.label for m in self.methods], self.device)
        frames, costs, systems_meta, variants = [], {}, {}, []
        first_seed: dict[str, Any] = {}
        for seed in cfg.seeds:
            self._device_data.clear()
            with timed_phase(f"seed {seed} checks"):
                splits = self.check(seed, networks=seed == cfg.seeds[0])  # the networks once per run
            try:
                splits, big_data = perturb_splits(splits, cfg.perturb, self.task.num_outputs,
                                                  self.task.preprocessing, seed)
            except CascadeError as exc:  # the key is in the message; the config file is not
                raise CascadeError(f"{self.source or 'config'}: {exc}") from None
            torch.manual_seed(seed)
            self._cal = splits.cal
            pre_data, tune_data = splits.train, splits.train
            if cfg.finetune_data == "holdout":
                pre_data, tune_data = holdout_split(splits.train, cfg.holdout_fraction, seed)
            big = self._train_big(seed, big_data)
            pretrained, plain = self._train_stages(seed, pre_data, tune_data)
            if not costs:
                costs = self._network_costs(plain, big)
            systems = self._train_methods(seed, pretrained, plain, big, costs, tune_data)
            scorers = self._prepare_post_hoc(seed, splits, plain, big)
            if not distributed.is_main():  # the others only train
                continue
            self._save(seed, big, plain, systems)
            if not variants:
                variants, systems_meta = self._variants(systems, costs, plain)
            if not first_seed:
                first_seed = {"systems": systems, "test": splits.test}
            for split, ds in (("cal", splits.cal), ("test", splits.test)):
                with timed_phase(f"seed {seed} evaluate {split}", device=self.device.type, samples=len(ds)):
                    frames.append(self._samples(seed, split, ds, big, plain, scorers, systems))
        self._device_data.clear()
        if not distributed.is_main():
            return {}
        samples = pd.concat(frames, ignore_index=True)
        w.csv("samples.csv", samples)

        targets = {Mode.WHITE_BOX.value: cfg.evaluation.white_box_targets,
                   Mode.BLACK_BOX.value: cfg.evaluation.black_box_targets}
        budgets = cfg.evaluation.budgets if all(v.stage_mflops[-1] is not None for v in variants) else []
        rows = operating_points(samples, variants, targets, budgets, delta=cfg.evaluation.delta,
                                oracles=self._oracle_variants(costs, len(self.stage_specs)))
        w.csv("points.csv", pd.DataFrame([{**r, "exit_fractions": ";".join(f"{f:.6g}" for f in r["exit_fractions"])}
                                          for r in rows]))
        metrics = self._metrics(samples, costs, systems_meta, variants, rows)
        if cfg.evaluation.violation_resplits:
            with timed_phase("threshold violations", resplits=cfg.evaluation.violation_resplits):
                metrics["threshold_violations"] = threshold_violations(
                    samples, variants, targets, cfg.evaluation.delta, cfg.evaluation.violation_resplits)
        for system, seeds in metrics["predictor_collapsed"].items():
            if seeds:
                log.warning("%s: the predictor collapsed on seed(s) %s: all its test scores lie within %g of each "
                            "other, so its operating points route (nearly) everything alike "
                            "(metrics.json: predictor_collapsed)", system, ", ".join(map(str, seeds)), COLLAPSE_RANGE)
        w.json("metrics.json", metrics)

        from cascade import report

        with timed_phase("report"):
            report.write_tables(metrics, w)
            report.write_figures(samples, variants, metrics, w)
            self._task_figure(samples, rows, first_seed)
        return metrics

    def _method_names(self) -> list[str]:
        return [s.name for s in self.cfg.methods] if self.cfg.methods else [m.label for m in self.methods]

    def _network_costs(self, plain: list, big: nn.Module | None) -> dict[str, dict]:
        shape = self.task.input_shape
        costs = {stage_name(k): measure_cost(n, shape).as_dict() for k, n in enumerate(plain)}
        if big is not None:
            costs[BIG] = measure_cost(big, shape).as_dict()
        return costs

    def _train_methods(self, seed: int, pretrained: list, plain: list, big, costs, data) -> dict[str, RoutedSystem]:
        """``system name -> system`` of every trained method in every mode."""
        systems: dict[str, tuple[MethodEntry, Mode, RoutedSystem]] = {}
        job = 0
        for mode in self.modes:
            oracle = self.oracle(mode, big, costs)
            for entry in self.trained_methods:
                ctx = self.context(seed, mode, job, pretrained, plain, oracle, data, entry.label, costs)
                method = entry.instance()
                built = method.build(ctx)
                method.train(built, ctx)
                for s in built:
                    for stage in s.stages:
                        freeze(stage)
                    systems[system_name(entry.label, mode.value, s.variant)] = (entry, mode, s)
                job += 1
        return systems

    def _prepare_post_hoc(self, seed: int, splits: Splits, plain: list, big) -> dict[str, list]:
        """``scorer key -> one fitted scorer per plain routed stage`` (:func:`scorer_key`:
        a ``mode_dependent`` method has one per mode, told where appealed inputs go)."""
        out = {}
        for entry in self.post_hoc_methods:
            modes = self.modes if entry.cls.mode_dependent else [None]
            for mode in modes:
                per_stage = []
                for k, net in enumerate(plain):
                    def fit(model, objective, data, oc, desc, k=k):
                        self._fit(model, objective, data, oc, phase_seed(seed, "post_hoc", stage=k),
                                  f"{self._phase(seed, k, '')} {desc}")

                    nxt = plain[k + 1] if k + 1 < len(plain) else (big if mode == Mode.WHITE_BOX else None)
                    scorer = entry.instance()
                    scorer.prepare(net, MethodContext(task=self.task, train=splits.train, seed=seed, device=self.device,
                                                      fit=fit, cal=splits.cal, mode=mode, next_stage=nxt))
                    per_stage.append(scorer)
                out[scorer_key(entry, mode)] = per_stage
        return out

    def _save(self, seed: int, big, plain: list, systems: dict) -> None:
        if big is not None and Mode.WHITE_BOX in self.modes:
            self.writer.checkpoint(f"seed{seed}_{BIG}.pt", big.state_dict())
        for k, net in enumerate(plain):
            self.writer.checkpoint(f"seed{seed}_{stage_name(k)}.pt", net.state_dict())
        for name, (_, _, system) in systems.items():
            self.writer.checkpoint(f"seed{seed}_{name}.pt", system.module().state_dict())

    # -- evaluation ---------------------------------------------------------------------

    def _last_column(self, mode: Mode) -> str | None:
        return f"{BIG}_correct" if mode == Mode.WHITE_BOX else None

    def _last_cost(self, mode: Mode, costs: dict) -> float | None:
        return self.oracle(mode, None, costs).cost_mflops if mode == Mode.BLACK_BOX else costs[BIG]["mflops"]

    def _plain_variant(self, method: str, mode: Mode, costs: dict, r: int, key: str | None) -> Variant:
        """A system of the plain stages: their correctness and costs, and the scores of post-hoc
        method ``key`` (None: no score columns, the oracle router's)."""
        scores = () if key is None else tuple(f"{stage_name(k)}_score_{key}" for k in range(r))
        return Variant(method, mode.value, "", scores, (*(f"{stage_name(k)}_correct" for k in range(r)),
                                                         self._last_column(mode)),
                       (*(costs[stage_name(k)]["mflops"] for k in range(r)), self._last_cost(mode, costs)))

    def _oracle_variants(self, costs: dict, r: int) -> list[Variant]:
        """Per mode, the plain stages' correctness and costs: what the oracle router routes."""
        return [self._plain_variant(ORACLE, mode, costs, r, None) for mode in self.modes]

    def _variants(self, systems: dict, costs: dict, plain: list) -> tuple[list[Variant], dict[str, dict]]:
        shape = self.task.input_shape
        r = len(plain)
        variants, meta = [], {}
        for mode in self.modes:
            last, last_cost = self._last_column(mode), self._last_cost(mode, costs)
            for entry in self.methods:
                if entry.kind == MethodKind.POST_HOC:
                    variants.append(self._plain_variant(entry.label, mode, costs, r, scorer_key(entry, mode)))
                    continue
                for name, (e, m, system) in systems.items():
                    if e is not entry or m != mode:
                        continue
                    stage_costs = [measure_cost(s, shape) for s in system.stages]
                    variants.append(Variant(
                        entry.label, mode.value, system.variant, tuple(f"{name}_{stage_name(k)}_score" for k in range(r)),
                        (*(f"{name}_{stage_name(k)}_correct" for k in range(r)), last),
                        (*(c.mflops for c in stage_costs), last_cost), system.fixed_threshold))
                    params = sum(p.numel() for p in system.module().parameters())
                    plain_params = sum(costs[stage_name(k)]["params"] for k in range(r))
                    meta[name] = {"method": entry.label, "mode": mode.value, "variant": system.variant,
                                  "stage_mflops": [c.mflops for c in stage_costs],
                                  "head_mflops": [c.mflops - costs[stage_name(k)]["mflops"]
                                                  for k, c in enumerate(stage_costs)],
                                  "params": params, "head_params": params - plain_params, **system.info}
        return variants, meta

    @torch.no_grad()
    def _columns(self, prefix: str, module: nn.Module, dataset: Dataset,
                 scorers: dict[str, Any] | None = None) -> tuple[dict[str, np.ndarray], Tensor]:
        """One network's per-sample columns on one split: prediction, correctness, the
        criterion's errors, its own score ``q`` and each scorer's score; and the targets."""
        crit = self.task.criterion
        module.eval()
        parts: dict[str, list[Tensor]] = {}
        targets = []
        for x, y in make_loader(dataset, self.cfg.evaluation.batch_size, False, 0):
            x = x.to(self.device)
            out = module(x)
            output = out.output.float().cpu()
            cols = {"correct": crit.correct(output, y)}
            if crit.kind == TaskKind.CLASSIFICATION:
                cols["pred"] = crit.prediction(output)
            errors = crit.errors(output, y)
            self.error_names.update(errors)
            cols.update(errors)
            # scores stay float64 (samples.csv round-trips them exactly): a float32 MSP of a
            # confident network saturates at 1.0 and ties inputs its logits still separate
            if out.q is not None:
                cols["score"] = out.q.double().cpu()
            for name, scorer in (scorers or {}).items():
                cols[f"score_{name}"] = scorer.score_batch(module, x, out).double().cpu()
            for key, value in cols.items():
                parts.setdefault(f"{prefix}_{key}", []).append(value)
            targets.append(y)
        return {k: torch.cat(v).numpy() for k, v in parts.items()}, torch.cat(targets)

    def _samples(self, seed: int, split: str, dataset: Dataset, big, plain: list, scorers: dict,
                 systems: dict) -> pd.DataFrame:
        cols: dict[str, np.ndarray] = {}
        targets = None
        if big is not None and Mode.WHITE_BOX in self.modes:
            c, targets = self._columns(BIG, big, dataset)
            cols.update(c)
        for k, net in enumerate(plain):
            # a scorer fitted on the calibration split gives its out-of-sample scores of it instead
            fitted = {key: per_stage[k].cal_scores for key, per_stage in scorers.items()
                      if split == "cal" and per_stage[k].cal_scores is not None}
            c, targets = self._columns(stage_name(k), net, dataset,
                                       {key: per_stage[k] for key, per_stage in scorers.items() if key not in fitted})
            c.update({f"{stage_name(k)}_score_{key}": scores.double().numpy() for key, scores in fitted.items()})
            scored = [f"{stage_name(k)}_score_{key}" for key in scorers]  # the columns in the scorers' order
            cols.update({name: c[name] for name in [n for n in c if n not in scored] + scored})
        for name, (_, _, system) in systems.items():
            for k, stage in enumerate(system.stages):
                cols.update(self._columns(f"{name}_{stage_name(k)}", stage, dataset)[0])
        n = len(targets)
        head = {"seed": np.full(n, seed), "split": np.full(n, split), "index": np.arange(n),
                "target": targets.numpy() if targets.dim() == 1 else np.full(n, np.nan)}
        return pd.DataFrame({**head, **cols})

    def _metrics(self, samples: pd.DataFrame, costs: dict, systems: dict, variants: list[Variant],
                 rows: list[dict]) -> dict[str, Any]:
        test = samples[samples["split"] == "test"]
        acc_cols = [c for c in samples.columns if c.endswith("_correct")]
        by_seed = test.groupby("seed")[acc_cols].mean()
        strip = len("_correct")
        accuracy = {c[:-strip]: float(by_seed[c].mean()) for c in acc_cols}
        accuracy_std = {c[:-strip]: float(by_seed[c].std(ddof=1)) for c in acc_cols} if len(by_seed) > 1 else {}
        collapsed = {}
        for name in systems:
            col = f"{name}_{stage_name(0)}_score"
            spread = test.groupby("seed")[col].agg(lambda s: float(s.max() - s.min()))
            collapsed[name] = [int(s) for s, v in spread.items() if v < COLLAPSE_RANGE]
        points = aggregate(rows)
        trained = [m.label for m in self.trained_methods]
        post_hoc = [m.label for m in self.post_hoc_methods]
        oracle_cost = {m.value: self._last_cost(m, costs) for m in self.modes}
        return {
            "task": self.cfg.task.name,
            "kind": self.kind.value,
            "config": self.source,
            "workdir": os.getcwd(),
            "seeds": list(self.cfg.seeds),
            "modes": [m.value for m in self.modes],
            "num_stages": len(self.stage_specs) + 1,
            "flops_unit": "MFLOPs = millions of multiply-accumulates (the AppealNet paper's FLOPs)",
            # the big network is listed only where it runs (white-box); black-box runs may use its cost alone
            "networks": {k: v for k, v in costs.items() if k != BIG or Mode.WHITE_BOX in self.modes},
            "last_stage_mflops": oracle_cost,
            "methods": {m.label: {"kind": m.kind.value} for m in self.methods},
            "systems": systems,
            "accuracy": accuracy,
            "accuracy_std": accuracy_std,
            **_error_means(test, sorted(self.error_names)),
            "variants": [asdict(v) for v in variants],
            "operating_points": points,
            "comparisons": comparisons(points, trained, post_hoc),
            "gap_closed": gap_table(points, post_hoc),
            "predictor_collapsed": collapsed,
            "training": self.histories,
        }

    def _task_figure(self, samples: pd.DataFrame, rows: list[dict], first: dict) -> None:
        """Let the task draw routed test inputs (:meth:`Task.write_routing_figure`): the
        first trained system of the first mode, first seed, at the val-tuned threshold
        for the smallest target AD."""
        if not first.get("systems"):
            return
        name, (entry, mode, system) = next(iter(first["systems"].items()))
        seed = self.cfg.seeds[0]
        points = [r for r in rows if r["seed"] == seed and r["mode"] == mode.value and r["method"] == entry.label
                  and r["selection"] == "target_ad" and r["threshold_source"] == "val" and r["variant"] == system.variant]
        if not points:
            return
        point = min(points, key=lambda r: r["target_ad"])
        test = samples[(samples["seed"] == seed) & (samples["split"] == "test")]
        kept = test[f"{name}_{stage_name(0)}_score"].to_numpy() >= point["threshold"]
        caption = (f"{name}, seed {seed}, test: kept vs appealed at the val-tuned threshold for AD "
                   f"{point['target_ad'] * 100:g} % (SR {point['skipping_rate'] * 100:.3g} %); "
                   "green = truth, red = prediction")
        path = self.writer.path("figures") / f"routed_samples_{mode.value}.png"
        self.task.write_routing_figure(path, system.stages[0], first["test"], kept, caption)


def _construct_task(cfg: ExperimentConfig) -> Task:
    """The config's task, or a one-line error naming the class when its constructor fails."""
    from cascade.engine.checks import task_attribute_problems

    try:
        task = build_task(cfg)
    except CascadeError:
        raise
    except Exception as exc:
        raise CascadeError(f"task {cfg.task.name}: the constructor failed: {type(exc).__name__}: {exc}") from None
    problems = task_attribute_problems(task)  # before anything reads its criterion or shapes
    if problems:
        raise CascadeError(problems[0])
    return task


def _error_means(test: pd.DataFrame, names: list[str]) -> dict[str, dict]:
    """``errors[network][name]``: mean over seeds of each network's mean per-sample error
    on the test split (e.g. RMSE for regression), and ``errors_std`` across seeds."""
    errors: dict[str, dict[str, float]] = {}
    errors_std: dict[str, dict[str, float]] = {}
    for col in test.columns:
        for name in names:
            if col.endswith(f"_{name}"):
                by_seed = test.groupby("seed")[col].mean()
                net = col[: -len(name) - 1]
                errors.setdefault(net, {})[name] = float(by_seed.mean())
                if len(by_seed) > 1:
                    errors_std.setdefault(net, {})[name] = float(by_seed.std(ddof=1))
    return {"errors": errors, "errors_std": errors_std}


def run_experiment(cfg: ExperimentConfig, out_dir: str | Path, quiet: bool = False, source: str = "",
                   resume: bool = False) -> dict[str, Any]:
    """Run a config end to end; the metrics (also in ``<out_dir>/metrics.json``)."""
    return Experiment(cfg, out_dir, quiet=quiet, source=source).run(resume)
