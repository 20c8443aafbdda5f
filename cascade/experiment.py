"""An AppealNet experiment end to end: train, evaluate every method, write the results.

Per seed: train the big network (white-box); pre-train the little network; give the
plain little network as many more epochs as AppealNet's fine-tuning (fairness: the
baselines' network is trained exactly as long); fine-tune a two-head AppealNet copy per
oracle mode; run every network once over the calibration and test splits into the
per-sample table; compute every operating point from that table.

Each training phase (``seed 0 big``, ``seed 0 pretrain``...) checkpoints after every epoch
and on Ctrl-C into ``checkpoints/resume/``; ``run(resume=True)`` replays the run from
there: finished phases are loaded with their RNG state, the interrupted one continues,
and the results equal an uninterrupted run's.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
from pathlib import Path
from typing import Callable, Any, Iterator

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler, Subset, TensorDataset

from cascade.config import ExperimentConfig, NetworkSpec, OptimConfig, resolved_dict
from cascade.cost import measure_cost
from cascade.errors import CascadeError, CheckpointError, DataError
from cascade.evaluator import Route, aggregate, collect_outputs, operating_points
from cascade.networks import FeatureNet, PredictorHead, TwoHeadNetwork
from cascade.objectives import AppealNetObjective, Objective, SupervisedObjective
from cascade.registry import METHODS, NETWORKS, TASKS
from cascade.roles import BlackBoxOracle, MethodContext, Oracle, Predictor, Splits, Task, WhiteBoxOracle
from cascade.checkpoint import CheckpointStore, atomic_path, atomic_save, atomic_write_text
from cascade.trainer import HistoryHook, HookBase, LambdaControllerHook, ProgressHook, Trainer

log = logging.getLogger("cascade")

#: a predictor whose scores on the test split all lie within this range has collapsed
COLLAPSE_RANGE = 1e-3

#: config keys that cannot change what training computes: a run may be resumed with them
#: changed (``seeds`` is not one: the files of the seeds left out would be lost at the end)
RESUME_IGNORES = ("name", "quick")


# ----------------------------------------------------------------------------- building


def build_task(cfg: ExperimentConfig) -> Task:
    task_cls = TASKS.get(cfg.task.name)
    return task_cls(task_cls.Options.model_validate(cfg.task.model_extra or {}))


def build_network(spec: NetworkSpec | dict[str, Any], task: Task) -> FeatureNet:
    spec = spec if isinstance(spec, NetworkSpec) else NetworkSpec.model_validate(spec)
    return NETWORKS.get(spec.name)(task.input_shape, task.num_outputs, **spec.kwargs())


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    """Batches of ``(x, y)``; in-memory tensor data is indexed a batch at a time.

    Training loaders (``shuffle``) drop a ragged last batch; evaluation loaders keep it.
    """
    generator = torch.Generator().manual_seed(seed)
    # training drops a ragged last batch (a batch of 1 breaks batch norm); evaluation keeps all
    drop_last = shuffle and len(dataset) > batch_size
    if isinstance(dataset, TensorDataset) or (isinstance(dataset, Subset) and isinstance(dataset.dataset, TensorDataset)):
        base = RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
        return DataLoader(dataset, sampler=BatchSampler(base, batch_size, drop_last=drop_last), batch_size=None)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, drop_last=drop_last)


def build_optimizer(params, oc: OptimConfig) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """SGD or Adam over ``params`` (tensors, or param-group dicts that may set their own lr)."""
    params = list(params)
    if params and not isinstance(params[0], dict):
        params = [p for p in params if p.requires_grad]
    if oc.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=oc.lr, momentum=oc.momentum, weight_decay=oc.weight_decay)
    else:
        opt = torch.optim.Adam(params, lr=oc.lr, weight_decay=oc.weight_decay)
    return opt, torch.optim.lr_scheduler.MultiStepLR(opt, milestones=oc.milestones, gamma=oc.gamma)


def training_fingerprint(cfg: ExperimentConfig) -> dict[str, Any]:
    """What a training checkpoint must have been written under to be resumed: the resolved
    config without :data:`RESUME_IGNORES`."""
    data = resolved_dict(cfg)
    for key in RESUME_IGNORES:
        data.pop(key, None)
    return data


def checkpoint_store(cfg: ExperimentConfig, out_dir: Path, resume: bool) -> CheckpointStore:
    """The run's resumable training checkpoints, ``<out>/checkpoints/resume/``, checked
    before any work.

    Without ``resume`` the folder must hold no checkpoint (an unfinished run's state is
    never overwritten by accident); with it, every file must fit the config.

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


def run_checkpointed(experiment: Any, resume: bool, body: Callable[[], Any]) -> Any:
    """Run ``body()`` with ``experiment.checkpoints`` set to the run's checkpoint store.

    The store is checked before ``body`` writes anything; once ``body`` has finished the
    resumable checkpoints are removed (the final weights are in ``checkpoints/``). If it
    stops (error, Ctrl-C) they stay, for ``--resume``.
    """
    experiment.checkpoints = checkpoint_store(experiment.cfg, experiment.out, resume)
    try:
        result = body()
        experiment.checkpoints.clear()
        return result
    finally:
        experiment.checkpoints = None


def check_splits(task: Task, splits: Splits, what: str) -> None:
    """Refuse data that training would choke on, before any training.

    Inputs must be finite; classification labels integers in ``[0, num_outputs)``;
    regression targets may be NaN (a missing target, masked out of the loss) but not
    infinite. Only in-memory splits (tensors) are checked: others meet the trainer's
    non-finite-loss check, which says when a batch's inputs hold NaN/inf.

    Args:
        task: the task (its ``criterion.kind`` and ``num_outputs``).
        splits: what ``task.build_splits`` returned.
        what: names the data in messages (e.g. ``"task digits, seed 0"``).

    Raises:
        DataError: the first bad sample of each kind, by split and index, with how many.
    """
    for split in ("train", "cal", "test"):
        tensors = _tensors(getattr(splits, split))
        if tensors is None:
            continue
        x, y = tensors[0], tensors[1]
        n = len(x)
        if n == 0:
            raise DataError(f"{what}: the {split} split is empty; the data set is too small for the requested splits")
        problems: list[tuple[torch.Tensor, str]] = []
        if x.is_floating_point():
            problems.append((~torch.isfinite(x.reshape(n, -1)).all(dim=1), "input holds NaN or infinite values"))
        if task.criterion.kind == "classification":
            integral = torch.ones_like(y, dtype=torch.bool)
            if y.is_floating_point():  # float labels must still be whole class numbers
                integral = torch.isfinite(y) & (y == y.round())
            in_range = integral & (y >= 0) & (y < task.num_outputs)
            problems.append((~in_range.reshape(n, -1).all(dim=1),
                             f"label outside the classes 0..{task.num_outputs - 1}"))
        elif y.is_floating_point():
            problems.append((torch.isinf(y.reshape(n, -1)).any(dim=1), "target is infinite (NaN marks a missing one)"))
        for bad, why in problems:
            if bool(bad.any()):
                i = int(bad.nonzero()[0])
                value = f" ({y[i].tolist()})" if "label" in why and y[i].numel() == 1 else ""
                raise DataError(f"{what}: {split} split, sample {i}: {why}{value}; {int(bad.sum())} of {n} samples")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CascadeError("device: cuda requested but no CUDA device is available")
    return torch.device(name)


# ----------------------------------------------------------------------------- running


class Experiment:
    """Runs one config over all its seeds and writes the output folder.

    Args:
        cfg: a validated config.
        out_dir: where results go (created).
        quiet: no progress bars.
        source: the config file's path, for messages and ``metrics.json``.
    """

    def __init__(
        self, cfg: ExperimentConfig, out_dir: str | Path, quiet: bool = False, source: str = "",
        cache: dict[str, dict] | None = None,
    ):
        self.cfg = cfg
        # trained weights shared between runs of one process that differ only downstream
        # (the ablation reuses the big and the pre-trained little network across variants)
        self.cache = cache
        self.out = Path(out_dir)
        self.quiet = quiet
        self.source = source
        self.device = resolve_device(cfg.device)
        self.task = build_task(cfg)
        self.little_spec = cfg.little or NetworkSpec.model_validate(self.task.default_little)
        big_spec = cfg.big or self.task.default_big
        self.big_spec = NetworkSpec.model_validate(big_spec) if big_spec and "white_box" in cfg.modes else None
        # one AppealNet per oracle mode, trained with that mode's objective
        self.appealnet_keys = {m: ("appealnet" if i == 0 else f"appealnet_{m}") for i, m in enumerate(cfg.modes)}
        self.histories: dict[str, list[dict[str, float]]] = {}
        #: names of the criterion's extra per-sample errors (``rmse``...), columns ``<net>_<name>``
        self.error_names: list[str] = []
        #: per-phase training checkpoints, set by :meth:`run`
        self.checkpoints: CheckpointStore | None = None

    # -- training ---------------------------------------------------------------------

    def _fit(self, model: nn.Module, objective: Objective, data: Dataset, oc: OptimConfig, seed: int, desc: str,
             extra_hooks: tuple[HookBase, ...] = (), params=None) -> None:
        opt, sched = build_optimizer(model.parameters() if params is None else params, oc)
        history = HistoryHook()
        hooks = [*extra_hooks, history, ProgressHook(desc, disable=self.quiet)]
        loader = make_loader(data, oc.batch_size, shuffle=True, seed=seed)
        trainer = Trainer(model, objective, opt, loader, oc.epochs, hooks, sched, self.device, name=desc)
        if self.checkpoints is not None:  # inside run(): checkpointed, resumable
            self.checkpoints.fit(trainer)
        else:
            trainer.train()
        self.histories[desc] = history.history

    def _train_seed(self, seed: int, splits: Splits) -> dict[str, nn.Module]:
        cfg, task = self.cfg, self.task
        crit = task.criterion
        torch.manual_seed(seed)
        nets: dict[str, nn.Module] = {}
        if self.big_spec is not None:
            big = build_network(self.big_spec, task).to(self.device)
            key = self._cache_key("big", seed, self.big_spec, cfg.big_train)
            self._cached_fit(key, big, lambda: self._fit(
                big, SupervisedObjective(crit), splits.train, cfg.big_train, seed * 100 + 1, f"seed {seed} big"))
            nets["big"] = big

        finetune = cfg.appealnet.finetune
        pre_data, tune_data = splits.train, splits.train
        if cfg.appealnet.finetune_data == "holdout":
            n = len(splits.train)
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
            n_hold = max(1, int(round(cfg.appealnet.holdout_fraction * n)))
            pre_data, tune_data = Subset(splits.train, sorted(perm[n_hold:])), Subset(splits.train, sorted(perm[:n_hold]))

        little = build_network(self.little_spec, task).to(self.device)
        key = self._cache_key("pretrain", seed, self.little_spec, cfg.pretrain, cfg.appealnet.finetune_data,
                              cfg.appealnet.holdout_fraction)
        self._cached_fit(key, little, lambda: self._fit(
            little, SupervisedObjective(crit), pre_data, cfg.pretrain, seed * 100 + 2, f"seed {seed} pretrain"))
        pretrained = copy.deepcopy(little)
        # fairness: the baselines' network trains as long, on the same data, as AppealNet
        self._fit(little, SupervisedObjective(crit), tune_data, finetune, seed * 100 + 3, f"seed {seed} little")
        nets["little"] = little

        pc = cfg.appealnet.predictor
        for i, (mode, key) in enumerate(self.appealnet_keys.items()):
            oracle: Oracle = WhiteBoxOracle(nets["big"]) if mode == "white_box" else BlackBoxOracle()
            head = PredictorHead(
                pretrained.feature_dim, task.num_outputs, pc.inputs, pc.hidden, pc.detach,
                classification=crit.kind == "classification", normalize=pc.normalize,
            )
            net = TwoHeadNetwork(copy.deepcopy(pretrained), head).to(self.device)
            lc = cfg.appealnet.lambda_
            objective = AppealNetObjective(
                crit, oracle, lc.init, cfg.appealnet.approximator_loss, cfg.appealnet.predictor_target
            )
            hooks = (LambdaControllerHook(objective, lc.budget, lc.up, lc.down),) if lc.dynamic else ()
            data = tune_data
            if mode == "white_box":
                data = _with_outputs(tune_data, oracle, self.cfg.evaluation.batch_size, self.device)
            groups = [{"params": list(net.base.parameters())},
                      {"params": list(net.predictor.parameters()), "lr": finetune.lr * pc.lr_scale}]
            self._fit(net, objective, data, finetune, seed * 100 + 10 + i, f"seed {seed} {key}", hooks, groups)
            nets[key] = net
        return nets

    def _cache_key(self, *parts: Any) -> str:
        dump = [p.model_dump(mode="json") if hasattr(p, "model_dump") else p for p in parts]
        return json.dumps([self.cfg.task.model_dump(mode="json"), *dump], sort_keys=True)

    def _cached_fit(self, key: str, model: nn.Module, fit) -> None:
        if self.cache is not None and key in self.cache:
            model.load_state_dict(self.cache[key])
            return
        fit()
        if self.cache is not None:
            self.cache[key] = copy.deepcopy(model.state_dict())

    # -- evaluation -------------------------------------------------------------------

    def _samples(
        self, seed: int, split: str, dataset: Dataset, nets: dict[str, nn.Module], methods: dict[str, Predictor]
    ) -> pd.DataFrame:
        crit = self.task.criterion
        bs = self.cfg.evaluation.batch_size
        cols: dict[str, Any] = {}
        targets = None
        for key, net in nets.items():
            out, y = collect_outputs(net, dataset, bs, self.device)
            targets = y
            if crit.kind == "classification":
                cols[f"{key}_pred"] = crit.prediction(out.output).numpy()
            cols[f"{key}_correct"] = crit.correct(out.output, y).numpy()
            for name, err in crit.errors(out.output, y).items():
                cols[f"{key}_{name}"] = err.numpy()
                if name not in self.error_names:
                    self.error_names.append(name)
            if key == "little":
                for name, method in methods.items():
                    cols[f"score_{name}"] = _score_dataset(method, net, dataset, bs, self.device)
            elif key.startswith("appealnet"):
                cols[f"score_{key}"] = out.q.numpy()
        n = len(targets)
        head = {"seed": np.full(n, seed), "split": np.full(n, split), "index": np.arange(n)}
        head["target"] = targets.numpy() if targets.dim() == 1 else np.full(n, np.nan)
        return pd.DataFrame({**head, **cols})

    def _prepare_methods(self, seed: int, splits: Splits, little: nn.Module) -> dict[str, Predictor]:
        """Instantiate each baseline method and let it fit itself on the plain little network."""

        def fit(model, objective, data, oc, desc):
            self._fit(model, objective, data, oc, seed * 100 + 50, f"seed {seed} {desc}")

        ctx = MethodContext(task=self.task, train=splits.train, seed=seed, device=self.device, fit=fit)
        methods = {}
        for name in self.cfg.evaluation.methods:
            method = METHODS.get(name)()
            method.prepare(little, ctx)
            methods[name] = method
        return methods

    def routes(self, costs: dict[str, dict[str, float]]) -> dict[tuple[str, str], Route]:
        """``(mode, method) -> Route`` for every method evaluated in every mode."""
        big_cost = costs["big"]["mflops"] if "big" in costs else self.task.oracle_mflops
        out = {}
        for mode, key in self.appealnet_keys.items():
            big_col = "big_correct" if mode == "white_box" else None
            for method in self.cfg.evaluation.methods:
                out[(mode, method)] = Route(f"score_{method}", "little_correct", big_col, costs["little"]["mflops"], big_cost)
            out[(mode, "appealnet")] = Route(f"score_{key}", f"{key}_correct", big_col, costs["appealnet"]["mflops"], big_cost)
        return out

    # -- the whole run ----------------------------------------------------------------

    def run(self, resume: bool = False) -> dict[str, Any]:
        """Train, evaluate every method, write the output folder; return the metrics.

        Every training phase writes a checkpoint after each epoch and on Ctrl-C
        (``checkpoints/resume/``, removed once the run has finished); the run's log goes to
        ``run.log``.

        Args:
            resume: continue an interrupted run in the same folder: finished phases are
                loaded instead of trained, the interrupted one continues where it stopped,
                and the metrics come out as an uninterrupted run's would.

        Raises:
            CheckpointError: checkpoints that do not fit (another config or network), or an
                unfinished run's checkpoints when ``resume`` is off; raised before any work.
            DataError: missing or malformed data.
            TrainingError: the loss became NaN or infinite (the step and the last good
                checkpoint are named; the checkpoints are kept).
            KeyboardInterrupt: Ctrl-C, after the running phase saved its checkpoint.
        """

        def body() -> dict[str, Any]:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "checkpoints").mkdir(exist_ok=True)
            with _log_to(self.out / "run.log", append=resume):
                return self._run()

        return run_checkpointed(self, resume, body)

    def _run(self) -> dict[str, Any]:
        import yaml

        cfg = self.cfg
        atomic_write_text(self.out / "config.yaml", yaml.safe_dump(resolved_dict(cfg), sort_keys=False))
        frames, costs, first = [], {}, None
        for seed in cfg.seeds:
            splits = self.task.build_splits(seed)
            check_splits(self.task, splits, f"task {cfg.task.name}, seed {seed}")
            nets = self._train_seed(seed, splits)
            if first is None:
                first = (nets, splits.test)  # for the task's own figure, if it draws one
            if not costs:
                costs = {k: measure_cost(n, self.task.input_shape).as_dict() for k, n in nets.items()}
                costs["appealnet"] = costs[self.appealnet_keys[cfg.modes[0]]]
            for key, net in nets.items():
                atomic_save(net.state_dict(), self.out / "checkpoints" / f"seed{seed}_{key}.pt")
            methods = self._prepare_methods(seed, splits, nets["little"])
            for split, ds in (("cal", splits.cal), ("test", splits.test)):
                frames.append(self._samples(seed, split, ds, nets, methods))
        samples = pd.concat(frames, ignore_index=True)
        with atomic_path(self.out / "samples.csv") as tmp:
            samples.to_csv(tmp, index=False)

        routes = self.routes(costs)
        targets = {"white_box": cfg.evaluation.white_box_targets, "black_box": cfg.evaluation.black_box_targets}
        per_seed = operating_points(samples, routes, targets)
        metrics = self._metrics(samples, costs, routes, per_seed)
        for key, seeds in metrics["predictor_collapsed"].items():
            if seeds:
                log.warning("%s: the predictor collapsed on seed(s) %s: all its test scores lie within %g of each "
                            "other, so its operating points route (nearly) everything alike "
                            "(metrics.json: predictor_collapsed)", key, ", ".join(map(str, seeds)), COLLAPSE_RANGE)
        atomic_write_text(self.out / "metrics.json", json.dumps(metrics, indent=2))

        from cascade import report

        report.write_tables(metrics, self.out)
        report.write_figures(samples, routes, metrics, self.out)
        self._task_figure(samples, per_seed, *first)
        return metrics

    def _task_figure(self, samples: pd.DataFrame, per_seed: pd.DataFrame, nets: dict[str, nn.Module],
                     test: Dataset) -> None:
        """Let the task draw routed test inputs, if it defines the optional hook
        ``write_routing_figure(path, network, dataset, kept, caption)`` (e.g. faces with
        their keypoints). Routing: the first seed's AppealNet of the first mode, at the
        val-tuned threshold for the smallest target AD."""
        draw = getattr(self.task, "write_routing_figure", None)
        if draw is None:
            return
        seed, mode = self.cfg.seeds[0], self.cfg.modes[0]
        key = self.appealnet_keys[mode]
        points = per_seed[(per_seed["seed"] == seed) & (per_seed["mode"] == mode)
                          & (per_seed["method"] == "appealnet") & (per_seed["threshold_source"] == "val")]
        point = points.sort_values("target_ad").iloc[0]
        score = samples[(samples["seed"] == seed) & (samples["split"] == "test")][f"score_{key}"].to_numpy()
        caption = (f"{key} ({mode.replace('_', '-')}), seed {seed}, test: kept vs appealed at the val-tuned "
                   f"threshold for AD {point['target_ad'] * 100:g} % (SR {point['skipping_rate'] * 100:.1f} %); "
                   "green = truth, red = prediction")
        draw(self.out / "figures" / f"routed_samples_{mode}.png", nets[key], test, score >= point["threshold"], caption)

    def _metrics(self, samples: pd.DataFrame, costs: dict, routes: dict, per_seed: pd.DataFrame) -> dict[str, Any]:
        test = samples[samples["split"] == "test"]
        acc_cols = [c for c in samples.columns if c.endswith("_correct")]
        by_seed = test.groupby("seed")[acc_cols].mean()
        accuracy = {c[: -len("_correct")]: float(by_seed[c].mean()) for c in acc_cols}
        accuracy_std = {c[: -len("_correct")]: float(by_seed[c].std(ddof=1)) for c in acc_cols} if len(by_seed) > 1 else {}
        little = costs["little"]
        head_mflops = costs["appealnet"]["mflops"] - little["mflops"]
        collapsed = {}
        for key in self.appealnet_keys.values():
            spread = test.groupby("seed")[f"score_{key}"].agg(lambda s: float(s.max() - s.min()))
            collapsed[key] = [int(s) for s, v in spread.items() if v < COLLAPSE_RANGE]
        metrics = {
            "task": self.cfg.task.name,
            "config": self.source,
            "seeds": list(self.cfg.seeds),
            "modes": list(self.cfg.modes),
            "flops_unit": "MFLOPs = millions of multiply-accumulates (the AppealNet paper's FLOPs)",
            "networks": costs,
            "predictor_head": {
                "mflops": head_mflops,
                "params": costs["appealnet"]["params"] - little["params"],
                "relative_mflops": head_mflops / little["mflops"],
            },
            "accuracy": accuracy,
            "accuracy_std": accuracy_std,
            **self._error_means(test, [c[: -len("_correct")] for c in acc_cols]),
            "score_columns": {
                mode: {method: {"score": r.score, "little_correct": r.little_correct, "big_correct": r.big_correct}
                       for (m, method), r in routes.items() if m == mode}
                for mode in self.cfg.modes
            },
            "operating_points": aggregate(per_seed),
            "predictor_collapsed": collapsed,
            "training": self.histories,
        }
        metrics["savings"] = savings(metrics["operating_points"], self.cfg.evaluation.methods)
        return metrics

    def _error_means(self, test: pd.DataFrame, networks: list[str]) -> dict[str, dict]:
        """``errors[network][name]``: mean over seeds of each network's mean per-sample error
        on the test split (e.g. RMSE for regression), and ``errors_std`` across seeds."""
        errors: dict[str, dict[str, float]] = {}
        errors_std: dict[str, dict[str, float]] = {}
        for net in networks:
            for name in self.error_names:
                col = f"{net}_{name}"
                if col not in test.columns:
                    continue
                by_seed = test.groupby("seed")[col].mean()
                errors.setdefault(net, {})[name] = float(by_seed.mean())
                if len(by_seed) > 1:
                    errors_std.setdefault(net, {})[name] = float(by_seed.std(ddof=1))
        return {"errors": errors, "errors_std": errors_std}


@contextlib.contextmanager
def _log_to(path: Path, append: bool) -> Iterator[None]:
    """Copy the ``cascade`` logger's records (INFO and up) into ``path`` while the block runs."""
    handler = logging.FileHandler(path, mode="a" if append else "w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    handler.setLevel(logging.INFO)
    level = log.level
    if log.getEffectiveLevel() > logging.INFO:
        log.setLevel(logging.INFO)  # the file gets INFO; other handlers keep their own levels
    log.addHandler(handler)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        handler.close()


def _tensors(dataset: Dataset) -> tuple[torch.Tensor, ...] | None:
    """The tensors of an in-memory dataset (a TensorDataset or a Subset of one), else None."""
    if isinstance(dataset, TensorDataset):
        return dataset.tensors
    if isinstance(dataset, Subset) and isinstance(dataset.dataset, TensorDataset):
        idx = torch.as_tensor(dataset.indices)
        return tuple(t[idx] for t in dataset.dataset.tensors)
    return None


def _with_outputs(dataset: Dataset, oracle: WhiteBoxOracle, batch_size: int, device: torch.device) -> Dataset:
    """``(x, y, big_output)``: the frozen big network's outputs, computed once.

    Falls back to ``dataset`` (outputs computed at every step) for data not held in memory.
    """
    tensors = _tensors(dataset)
    if tensors is None:
        return dataset
    outs = [oracle.output(x.to(device)).cpu() for x, _ in make_loader(TensorDataset(*tensors[:2]), batch_size, False, 0)]
    return TensorDataset(tensors[0], tensors[1], torch.cat(outs))


@torch.no_grad()
def _score_dataset(method: Predictor, network: nn.Module, dataset: Dataset, batch_size: int, device: torch.device) -> np.ndarray:
    network.eval()
    scores = [method.score_batch(network, x.to(device)).float().cpu() for x, _ in make_loader(dataset, batch_size, False, 0)]
    return torch.cat(scores).numpy()


def savings(points: list[dict], baselines: list[str]) -> list[dict]:
    """AppealNet's relative saving over each baseline at each operating point.

    White-box: ``cost(baseline) / cost(appealnet)`` (Table 1's "x"); black-box:
    ``AR(baseline) / AR(appealnet)`` (Table 2). > 1 means AppealNet is cheaper.
    """
    index = {(p["mode"], p["method"], p["threshold_source"], p["target_ad"]): p for p in points}
    out = []
    for (mode, method, source, target), p in index.items():
        if method != "appealnet":
            continue
        field = "cost_mflops" if mode == "white_box" else "appeal_rate"
        for base in baselines:
            b = index.get((mode, base, source, target))
            if b is None or p[field] is None or b[field] is None:
                continue
            ratio = b[field] / p[field] if p[field] > 0 else (1.0 if b[field] == 0 else float("inf"))
            out.append({"mode": mode, "threshold_source": source, "target_ad": target, "baseline": base,
                        "field": field, "ratio": ratio if np.isfinite(ratio) else None})
    return out
