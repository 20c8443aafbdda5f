"""The training phases of an experiment, per seed: the big network, the routed stages
(pre-trained, then fine-tuned alone: the plain stages), every trained method's systems
and every post-hoc method's scorers.

Each phase trains with the shared trainer (:func:`cascade.training.phase.build_trainer`),
checkpointed inside a run (:class:`~cascade.training.checkpoint.CheckpointStore`), on
every process under torchrun; the big network and the pre-trained stages are kept in
the network cache (:mod:`cascade.engine.cache`).
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from torch import nn
from torch.utils.data import Dataset

from cascade.config.schema import NetworkSpec, OptimConfig
from cascade.contracts.loggers import Logger
from cascade.contracts.methods import CascadeContext, MethodContext, RoutedSystem
from cascade.contracts.stages import (
    Approximator,
    BlackBoxOracle,
    Oracle,
    WhiteBoxOracle,
)
from cascade.contracts.task import Splits
from cascade.core.enums import Mode
from cascade.core.errors import CascadeError
from cascade.engine.cache import CacheSlot, PhaseCache, cache_slot
from cascade.engine.plan import Plan
from cascade.engine.tasks import build_network
from cascade.methods.catalogue import MethodEntry, scorer_key
from cascade.nn.objectives import Objective, SupervisedObjective
from cascade.runs.layout import BIG, stage_name, system_name
from cascade.runs.writer import timed_phase
from cascade.training import distributed
from cascade.training.checkpoint import CheckpointStore, NetworkCache
from cascade.training.checks import (
    constant_answer_problem,
    degenerate_training,
    loss_rise_problem,
)
from cascade.training.data import with_oracle_outputs
from cascade.training.devices import data_on_device
from cascade.training.hooks import HistoryHook, HookBase, ProgressHook
from cascade.training.loggers import LoggerHook
from cascade.training.phase import build_trainer, freeze
from cascade.training.seeds import phase_seed, seeded_rng
from cascade.training.trainer import Trainer

log = logging.getLogger(__name__)

#: ``system name -> (method, mode, system)``: a seed's trained systems
Systems = dict[str, tuple[MethodEntry, Mode, RoutedSystem]]


def build_oracle(plan: Plan, mode: Mode, big: Approximator | None, costs: dict[str, dict]) -> Oracle:
    """The cascade's last stage in ``mode``, with its cost: the big network (white-box), or
    answers costing the config's or the task's ``oracle_mflops``, else the big network's."""
    if mode == Mode.WHITE_BOX:
        return WhiteBoxOracle(big, costs[BIG]["mflops"])
    mflops = plan.cfg.oracle_mflops or plan.task.oracle_mflops
    if mflops is None and BIG in costs:
        mflops = costs[BIG]["mflops"]
    return BlackBoxOracle(mflops)


class TrainingPhases:
    """Trains the networks of one plan, seed by seed (the base of
    :class:`~cascade.engine.experiment.Experiment`, which sets up the run around them).

    Args:
        plan: what to train.
        quiet: no progress bars.
        cache: trained networks shared between runs of one process (see :mod:`cascade.engine.cache`).
    """

    def __init__(self, plan: Plan, quiet: bool = False, cache: dict[str, dict] | None = None):
        self.plan = plan
        self.quiet = quiet
        self.cache = cache
        #: the on-disk network cache (set by run(): see big_cache, pretrain_cache)
        self.network_cache: NetworkCache | None = None
        #: the run's resumable checkpoints (inside run())
        self.checkpoints: CheckpointStore | None = None
        self.histories: dict[str, list[dict[str, float]]] = {}
        #: the config's loggers, fed by every phase's LoggerHook (set by run(), on rank 0)
        self.loggers: list[Logger] = []
        self._device_data: dict[int, tuple[Dataset, Dataset]] = {}
        #: the seed's calibration split, on which trained networks are checked (inside run())
        self._cal: Dataset | None = None

    @property
    def cfg(self):
        return self.plan.cfg

    @property
    def task(self):
        return self.plan.task

    @property
    def device(self):
        return self.plan.device

    @property
    def big_spec(self) -> NetworkSpec | None:
        return self.plan.big_spec

    # -- one phase ----------------------------------------------------------------------

    def _fit(self, model: nn.Module, objective: Objective, data: Dataset, oc: OptimConfig, seed: int, desc: str,
             hooks: tuple[HookBase, ...] = (), params=None, cache: CacheSlot | None = None,
             checked: str | None = None) -> None:
        """Train one phase: checkpointed inside a run, on every process under torchrun
        (each taking its share of every batch). With ``cache``, the network is loaded from
        the network cache when it holds it (:mod:`cascade.engine.cache`: from memory, the
        phase is not run at all), else trained and stored there. ``checked``: the
        config key of a supervised phase (``big_train``...), whose network is checked once
        trained (:mod:`cascade.training.checks`), before it is cached."""
        store = PhaseCache(self.network_cache, self.cache)
        if cache is not None and (weights := store.recall(cache)) is not None:
            model.load_state_dict(weights)  # trained earlier in this process: not again
            return
        world = distributed.world_size()
        if oc.batch_size % world:
            raise CascadeError(f"{desc}: batch_size {oc.batch_size} does not split evenly over {world} processes; "
                               f"use a multiple of {world}")
        train_data = self._on_device(data)
        history = HistoryHook()
        plan = self.plan
        trainer = build_trainer(model, objective, train_data, oc, seed, desc, task=plan.task, device=plan.device,
                                hooks=[*hooks, history, LoggerHook(desc, self.loggers, history),
                                       ProgressHook(desc, self.quiet or not distributed.is_main())],
                                params=params, amp_dtype=plan.amp, channels_last=plan.channels_last,
                                pin_memory=plan.device.type == "cuda" and train_data is data)
        cached = store.lookup(cache, model) if cache is not None else None
        with timed_phase(desc, device=plan.device.type, samples=len(data), epochs=oc.epochs) as facts:
            if cached is not None:
                log.info("%s network: loaded from cache %s", cache.what, cached[0])
                facts["cached"] = str(cached[0])
            self._train(trainer, history, cached[1] if cached is not None else None)
            facts["steps"] = trainer.step
        self.histories[desc] = history.history
        if checked is not None and oc.epochs > 0:
            self._check_phase(desc, checked, oc, model, history)
        if cache is not None:
            if cached is None:
                store.store(cache, model, trainer.step, history.state_dict())
            store.remember(cache, model)

    def _train(self, trainer: Trainer, history: HistoryHook, entry: dict | None) -> None:
        """Run ``trainer``, or mark it finished with a cached ``entry``; resumable inside a run."""
        finished = None
        if entry is not None:
            def finished(t: Trainer) -> None:
                t.load_finished(entry["model"], entry["steps"], {history: entry["history"]})

        if self.checkpoints is not None:  # inside run(): checkpointed, resumable
            self.checkpoints.fit(trainer, finished)
        else:
            if finished is not None:
                finished(trainer)
            trainer.train()

    def _check_phase(self, desc: str, key: str, oc: OptimConfig, model: nn.Module, history: HistoryHook) -> None:
        """Stop the run when a supervised phase's loss rose or training left its network worse
        than a constant answer on the calibration split (see :mod:`cascade.training.checks`)."""
        problem = loss_rise_problem(history.history)
        if problem is None and self._cal is not None:
            problem = constant_answer_problem(model, self.task.criterion, self._cal, self.cfg.evaluation.batch_size,
                                              self.device, start_loss=history.first_loss)
        degenerate_training(desc, key, oc.lr, [problem], self.cfg.checks.allow_degenerate)

    def _cache_slot(self, what: str, label: str, seed: int, spec: NetworkSpec, oc: OptimConfig,
                    disk: bool = True, **extra: Any) -> CacheSlot:
        """The cache slot of a phase (:func:`cascade.engine.cache.cache_slot`)."""
        return cache_slot(self.plan, what, label, seed, spec, oc, disk, **extra)

    def _on_device(self, data: Dataset) -> Dataset:
        """``data`` moved to the GPU per the config's ``data_on_device`` (once per seed)."""
        if self.device.type != "cuda" or self.cfg.data_on_device is False:
            return data
        moved = self._device_data.get(id(data))
        if moved is None or moved[0] is not data:
            moved = self._device_data[id(data)] = (data, data_on_device(data, self.device, self.cfg.data_on_device))
        return moved[1]

    # -- the networks -------------------------------------------------------------------

    def _train_big(self, seed: int, train: Dataset) -> Approximator | None:
        """The big network, trained (or given, or loaded from the cache), or None."""
        cfg = self.cfg
        if self.big_spec is None:
            return None
        with seeded_rng(phase_seed(seed, "big_init"), self.device):  # see seeded_rng: the cache relies on it
            big = build_network(self.big_spec, self.task, BIG).to(self.device)
            if Mode.WHITE_BOX in self.plan.modes and not self.big_spec.given:
                cache = self._cache_slot(f"seed {seed} big", BIG, seed, self.big_spec, cfg.big_train,
                                         disk=cfg.big_cache)
                self._fit(big, SupervisedObjective(self.task.criterion, cfg.big_train.label_smoothing), train,
                          cfg.big_train, phase_seed(seed, "big"), f"seed {seed} big", cache=cache, checked="big_train")
        return freeze(big)

    def _pretrain_stage(self, seed: int, k: int, spec: NetworkSpec, data: Dataset) -> nn.Module:
        cfg = self.cfg
        with seeded_rng(phase_seed(seed, "pretrain_init", stage=k), self.device):  # as the big network's
            net = build_network(spec, self.task, self.plan.stage_key(k)).to(self.device)
            if not spec.given:
                cache = self._cache_slot(f"{self._phase(seed, k, '')} pre-trained", stage_name(k), seed, spec,
                                         cfg.pretrain, disk=cfg.pretrain_cache, stage=k,
                                         finetune_data=cfg.finetune_data, holdout_fraction=cfg.holdout_fraction)
                self._fit(net, SupervisedObjective(self.task.criterion, cfg.pretrain.label_smoothing), data,
                          cfg.pretrain, phase_seed(seed, "pretrain", stage=k), self._phase(seed, k, "pretrain"),
                          cache=cache, checked="pretrain")
        return net

    def _train_stages(self, seed: int, pre_data: Dataset, tune_data: Dataset) -> tuple[list, list]:
        """``(pre-trained, plain)`` routed stages."""
        cfg = self.cfg
        pretrained = [self._pretrain_stage(seed, k, spec, pre_data) for k, spec in enumerate(self.plan.stage_specs)]
        plain = []
        for k, net in enumerate(pretrained):
            net = copy.deepcopy(net)
            # fairness: the post-hoc scores' stages train as long, on the same data, as any trained method
            self._fit(net, SupervisedObjective(self.task.criterion, cfg.finetune.label_smoothing), tune_data,
                      cfg.finetune, phase_seed(seed, "plain", stage=k), self._phase(seed, k, ""), checked="finetune")
            plain.append(freeze(net))
        return pretrained, plain

    def _phase(self, seed: int, k: int, what: str) -> str:
        name = "little" if len(self.plan.stage_specs) == 1 else f"stage {k}"
        return " ".join(p for p in (f"seed {seed}", name, what) if p)

    # -- the methods --------------------------------------------------------------------

    def _context(self, seed: int, mode: Mode, job: int, pretrained: list, plain: list, oracle: Oracle,
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

    def _train_methods(self, seed: int, pretrained: list, plain: list, big, costs, data) -> Systems:
        """``system name -> (method, mode, system)`` of every trained method in every mode."""
        systems: Systems = {}
        job = 0
        for mode in self.plan.modes:
            oracle = build_oracle(self.plan, mode, big, costs)
            for entry in self.plan.trained_methods:
                ctx = self._context(seed, mode, job, pretrained, plain, oracle, data, entry.label, costs)
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
        for entry in self.plan.post_hoc_methods:
            modes = self.plan.modes if entry.cls.mode_dependent else [None]
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
