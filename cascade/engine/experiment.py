"""The cascade pipeline: one recipe for every K >= 2, AppealNet's two stages included.

Per seed:

1. the big network (white-box last stage) is trained with ``big_train``, or loaded;
2. every routed stage (``little`` or ``stages``, cheapest first) is pre-trained with
   ``pretrain``, or loaded;
3. the *plain* stages: each pre-trained stage fine-tuned alone with ``finetune`` (as long,
   on the same data, as every trained method: the post-hoc scores read these);
4. every trained method (:class:`~cascade.methods.TrainedMethod`) builds and trains its
   systems from the pre-trained stages, once per mode (its oracle differs);
5. every post-hoc method (:class:`~cascade.contracts.methods.Predictor`) prepares itself on each
   plain stage;
6. every network runs once over the calibration and test splits into the per-sample
   table (``samples.csv``); every operating point is computed from it
   (:mod:`cascade.evaluation`), as is how often val-tuned and guaranteed thresholds miss
   their target on random re-splits of it, and the report is views of that one table.

Each training phase checkpoints after every epoch and on Ctrl-C into
``checkpoints/resume/``; ``run(resume=True)`` replays the run from there and the
results equal an uninterrupted run's.

The engine's pieces: :mod:`~cascade.engine.plan` (what a config runs, built once),
:mod:`~cascade.engine.checks` (the task, data and networks on one batch, before any
training), :mod:`~cascade.engine.phases` (steps 1-5) with
:mod:`~cascade.engine.cache` (the one network cache), :mod:`~cascade.engine.samples`
(step 6's table) and :mod:`~cascade.engine.metrics` (``metrics.json``). This module
is the recipe that strings them together and writes the run folder
(:mod:`cascade.runs.layout` names its files).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch.utils.data import Dataset

from cascade.config.schema import ExperimentConfig, resolved_dict
from cascade.contracts.task import Splits
from cascade.core.enums import Mode, Selection, ThresholdSource
from cascade.core.errors import CascadeError, CheckpointError
from cascade.engine.checks import check_task
from cascade.engine.metrics import (
    COLLAPSE_RANGE,
    build_metrics,
    build_variants,
    network_costs,
    oracle_variants,
)
from cascade.engine.phases import Systems, TrainingPhases
from cascade.engine.plan import build_plan
from cascade.engine.samples import split_samples
from cascade.evaluation import Variant, operating_points, threshold_violations
from cascade.nn.perturb import perturb_splits
from cascade.report import write_figures, write_tables
from cascade.runs import layout
from cascade.runs.layout import (
    BIG,
    checkpoint_name,
    column,
    stage_name,
    system_stage_name,
)
from cascade.runs.record import clear_record, write_record
from cascade.runs.writer import RunWriter, timed_phase
from cascade.training import distributed
from cascade.training.checkpoint import CheckpointStore, NetworkCache, network_cache_dir
from cascade.training.data import holdout_split
from cascade.training.loggers import build_loggers, close_loggers

log = logging.getLogger(__name__)

#: config keys that cannot change what training computes: a run may be resumed with them
#: changed (``seeds`` is not one: the files of the seeds left out would be lost at the end)
RESUME_IGNORES = ("name", "quick", "data_on_device", "big_cache", "pretrain_cache", "cache_dir", "checks", "loggers")


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
    store = CheckpointStore(Path(out_dir) / layout.RESUME, training_fingerprint(cfg), resume)
    if resume:
        store.verify()
        if not store.files():
            log.warning("%s: no checkpoint to resume from; starting from scratch", store.folder)
    elif store.files():
        raise CheckpointError(f"{store.folder}: an unfinished run (interrupted, or stopped by an error) left "
                              "checkpoints here; continue it with --resume, or delete that folder (or choose another "
                              "--out) to start over")
    return store


@dataclasses.dataclass
class _Seed:
    """One seed's trained networks."""

    seed: int
    splits: Splits
    big: Any
    plain: list
    systems: Systems
    scorers: dict[str, list]


@dataclasses.dataclass
class _Tables:
    """What the seeds add up to, for the evaluation."""

    frames: list[pd.DataFrame] = dataclasses.field(default_factory=list)
    costs: dict[str, dict] = dataclasses.field(default_factory=dict)
    systems: dict[str, dict] = dataclasses.field(default_factory=dict)  # metrics.json's
    variants: list[Variant] = dataclasses.field(default_factory=list)
    first: _Seed | None = None


class Experiment(TrainingPhases):
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
        super().__init__(build_plan(cfg, source), quiet, cache)
        self.out = Path(out_dir)
        self.source = source
        #: names of the criterion's extra per-sample errors (``rmse``...), columns ``<network>_<name>``
        self.error_names: set[str] = set()
        self.writer: RunWriter | None = None

    def check(self, seed: int | None = None, networks: bool = True) -> Splits:
        """Check the task, its data and (with ``networks``) its networks on one batch of
        each split, before any training (:func:`cascade.engine.checks.check_task`); the seed's splits.

        Raises:
            CascadeError: the first problem, in one line naming the class, key or split.
        """
        return check_task(self.plan, self.cfg.seeds[0] if seed is None else seed, networks)

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
                training); checkpoints that do not fit, or a logger that cannot work here
                (before any work); a NaN loss.
            KeyboardInterrupt: Ctrl-C, after the running phase saved its checkpoint.
        """
        with distributed.session(self.plan.device) as device:
            self.plan = dataclasses.replace(self.plan, device=device)
            cfg = self.cfg
            if cfg.big_cache or cfg.pretrain_cache:
                self.network_cache = NetworkCache(network_cache_dir(cfg.cache_dir))
            self.checkpoints = checkpoint_store(cfg, self.out, resume)
            distributed.barrier()  # every rank has checked the folder before rank 0 writes into it
            main = distributed.is_main()
            self.loggers[:] = build_loggers(cfg.loggers, self.out) if main else []  # rank 0 writes the curves
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
                close_loggers(self.loggers)
                self.loggers.clear()
                self.checkpoints = None
                self.network_cache = None

    def _run(self) -> dict[str, Any]:
        plan = self.plan
        if self.writer is not None:  # rank 0
            self.writer.yaml(layout.CONFIG, self._config_as_run())
        log.info("run %s: task %s, %d routed stage(s), modes %s, methods %s, device %s", self.source or "<config>",
                 self.cfg.task.name, len(plan.stage_specs), [m.value for m in plan.modes],
                 [m.label for m in plan.methods], plan.device)
        tables = _Tables()
        for seed in self.cfg.seeds:
            trained = self._train_seed(seed, tables)
            if distributed.is_main():  # the others only train
                self._evaluate_seed(trained, tables)
        self._device_data.clear()
        if not distributed.is_main():
            return {}
        return self._evaluate(tables)

    def _config_as_run(self) -> dict[str, Any]:
        """The resolved config, with the methods as run: the task kind's defaults filled in,
        every option spelled out."""
        config = resolved_dict(self.cfg)
        config["methods"] = [{"name": name, **m.options.model_dump(mode="json", by_alias=True, exclude_none=True)}
                             for m, name in zip(self.plan.methods, self.plan.method_names())]
        return config

    def _train_seed(self, seed: int, tables: _Tables) -> _Seed:
        """Check the seed's data and train every network of it (the first seed also sets the networks' costs)."""
        cfg = self.cfg
        self._device_data.clear()
        with timed_phase(f"seed {seed} checks"):
            splits = self.check(seed, networks=seed == cfg.seeds[0])  # the networks once per run
        try:
            splits, big_data = perturb_splits(splits, cfg.perturb, self.task.num_outputs,
                                              self.task.preprocessing, seed)
        except CascadeError as exc:  # the key is in the message; the config file is not
            raise CascadeError(f"{self.plan.where}: {exc}") from None
        torch.manual_seed(seed)
        self._cal = splits.cal
        pre_data, tune_data = splits.train, splits.train
        if cfg.finetune_data == "holdout":
            pre_data, tune_data = holdout_split(splits.train, cfg.holdout_fraction, seed)
        big = self._train_big(seed, big_data)
        pretrained, plain = self._train_stages(seed, pre_data, tune_data)
        if not tables.costs:
            tables.costs = network_costs(self.plan, plain, big)
        systems = self._train_methods(seed, pretrained, plain, big, tables.costs, tune_data)
        scorers = self._prepare_post_hoc(seed, splits, plain, big)
        return _Seed(seed, splits, big, plain, systems, scorers)

    def _evaluate_seed(self, s: _Seed, tables: _Tables) -> None:
        """Save the seed's networks and add its rows of the per-sample table (rank 0)."""
        self._save(s.seed, s.big, s.plain, s.systems)
        if not tables.variants:
            tables.variants, tables.systems = build_variants(self.plan, s.systems, tables.costs, s.plain)
        if tables.first is None:
            tables.first = s
        for split, ds in (("cal", s.splits.cal), ("test", s.splits.test)):
            with timed_phase(f"seed {s.seed} evaluate {split}", device=self.device.type, samples=len(ds)):
                tables.frames.append(self._samples(s.seed, split, ds, s.big, s.plain, s.scorers, s.systems))

    def _save(self, seed: int, big, plain: list, systems: Systems) -> None:
        if big is not None and Mode.WHITE_BOX in self.plan.modes:
            self.writer.checkpoint(checkpoint_name(seed, BIG), big.state_dict())
        for k, net in enumerate(plain):
            self.writer.checkpoint(checkpoint_name(seed, stage_name(k)), net.state_dict())
        for name, (_, _, system) in systems.items():
            self.writer.checkpoint(checkpoint_name(seed, name), system.module().state_dict())

    def _samples(self, seed: int, split: str, dataset: Dataset, big, plain: list, scorers: dict,
                 systems: Systems) -> pd.DataFrame:
        """One seed's split of ``samples.csv`` (:func:`cascade.engine.samples.split_samples`)."""
        return split_samples(self.plan, seed, split, dataset, big, plain, scorers, systems, self.error_names)

    # -- evaluation ---------------------------------------------------------------------

    def _evaluate(self, tables: _Tables) -> dict[str, Any]:
        """Write ``samples.csv``, ``points.csv``, ``metrics.json`` and the report; the metrics."""
        w, ev = self.writer, self.cfg.evaluation
        samples = pd.concat(tables.frames, ignore_index=True)
        w.csv(layout.SAMPLES, samples)
        variants = tables.variants
        targets = {Mode.WHITE_BOX.value: ev.white_box_targets, Mode.BLACK_BOX.value: ev.black_box_targets}
        budgets = ev.budgets if all(v.stage_mflops[-1] is not None for v in variants) else []
        rows = operating_points(samples, variants, targets, budgets, delta=ev.delta,
                                oracles=oracle_variants(self.plan, tables.costs, len(self.plan.stage_specs)),
                                appeal_budgets=ev.appeal_budgets)
        w.csv(layout.POINTS, pd.DataFrame([{**r, "exit_fractions": ";".join(f"{f:.6g}" for f in r["exit_fractions"])}
                                           for r in rows]))
        metrics = build_metrics(self.plan, samples, tables.costs, tables.systems, variants, rows, self.error_names,
                                self.histories)
        if ev.violation_resplits:
            with timed_phase("threshold violations", resplits=ev.violation_resplits):
                metrics["threshold_violations"] = threshold_violations(samples, variants, targets, ev.delta,
                                                                       ev.violation_resplits)
        for system, seeds in metrics["predictor_collapsed"].items():
            if seeds:
                log.warning("%s: the predictor collapsed on seed(s) %s: all its test scores lie within %g of each "
                            "other, so its operating points route (nearly) everything alike "
                            "(metrics.json: predictor_collapsed)", system, ", ".join(map(str, seeds)), COLLAPSE_RANGE)
        w.json(layout.METRICS, metrics)
        with timed_phase("report"):
            write_tables(metrics, w)
            write_figures(samples, variants, metrics, w)
            self._task_figure(samples, rows, tables.first)
        return metrics

    def _task_figure(self, samples: pd.DataFrame, rows: list[dict], first: _Seed | None) -> None:
        """Let the task draw routed test inputs (:meth:`Task.write_routing_figure`): the
        first trained system of the first mode, first seed, at the val-tuned threshold
        for the smallest target AD."""
        if first is None or not first.systems:
            return
        name, (entry, mode, system) = next(iter(first.systems.items()))
        seed = self.cfg.seeds[0]
        points = [r for r in rows if r["seed"] == seed and r["mode"] == mode.value and r["method"] == entry.label
                  and r["selection"] == Selection.TARGET_AD and r["threshold_source"] == ThresholdSource.VAL
                  and r["variant"] == system.variant]
        if not points:
            return
        point = min(points, key=lambda r: r["target_ad"])
        test = samples[(samples["seed"] == seed) & (samples["split"] == "test")]
        kept = test[column(system_stage_name(name, 0), "score")].to_numpy() >= point["threshold"]
        caption = (f"{name}, seed {seed}, test: kept vs appealed at the val-tuned threshold for AD "
                   f"{point['target_ad'] * 100:g} % (SR {point['skipping_rate'] * 100:.3g} %); "
                   "green = truth, red = prediction")
        path = self.writer.path(layout.FIGURES) / f"routed_samples_{mode.value}.png"
        self.task.write_routing_figure(path, system.stages[0], first.splits.test, kept, caption)
