"""A multi-stage cascade experiment end to end: train, evaluate every method, write results.

Per seed:

1. pre-train every stage network alone (``pretrain``);
2. *plain* stages: each pre-trained stage fine-tuned alone for as long as the REINFORCE
   cascade is fine-tuned (``cascade.reinforce.finetune``), so that the stage-alone
   accuracies and the baseline-score cascades get exactly as much training;
3. *appealnet* cascade (``cascade.appealnet_cascade``): each stage but the last gets an
   AppealNet predictor head and is fine-tuned with :class:`AppealNetObjective`
   (``appealnet:`` settings), with the **next** plain stage as its white-box oracle (the
   stage an appealed input actually goes to; a black-box oracle when the next stage is
   one); the last stage is the plain one;
4. *reinforce* cascades: one per ``cascade.reinforce.alphas`` value, the pre-trained
   stages plus a fresh stopping policy trained jointly by :class:`ReinforceObjective`;
5. every system's stages run once over the calibration and test splits into the
   per-sample table (``samples.csv``); every operating point is computed from it.

Methods (the ``method`` of each operating point): ``reinforce`` (the policy; greedy at
``cascade.reinforce.threshold`` and with that threshold swept), ``<m>_cascade`` for each
per-stage score ``m`` in ``evaluation.methods`` (MSP, Gap, Entropy... computed on the
plain stages, one threshold shared by all stages, swept), ``appealnet_cascade``.

Selections (the ``selection`` field):

- ``greedy``: the policy as trained, threshold fixed (``threshold_source = fixed``);
- ``matched_cost``: every other method at the mean cost of each greedy REINFORCE point:
  its most accurate threshold whose cost is at most the policy's, chosen on the test
  split (``test``) or on the calibration split against the policy's calibration cost
  (``val``), then applied to test;
- ``budget``: every method's most accurate point with cost <= ``budget_fraction`` of the
  last stage's cost (REINFORCE: the best over all alphas' policies and thresholds);
- ``target_ad``: every method's cheapest point with accuracy degradation
  ``acc(last stage alone) - acc(system)`` at or under ``target_ad``
  (``evaluation.white_box_targets``; with a black-box oracle, ``black_box_targets`` and
  ``AD = 1 - acc``).
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from cascade.config import ExperimentConfig, OptimConfig, resolved_dict
from cascade.cost import measure_cost
from cascade.errors import CascadeError
from cascade.experiment import (
    build_network,
    build_optimizer,
    build_task,
    check_splits,
    run_checkpointed,
    make_loader,
    resolve_device,
)
from cascade.multistage import MultiStageCascade, ReinforceObjective, ReinforceStopScore, StoppingPolicy, stage_costs
from cascade.multistage_eval import (
    CascadeSweep,
    Selection,
    Variant,
    cascade_point,
    cascade_sweep,
    select_by_accuracy,
    select_by_cost,
    variant_arrays,
)
from cascade.networks import AppealNetScore, PredictorHead, TwoHeadNetwork
from cascade.objectives import AppealNetObjective, Objective, SupervisedObjective
from cascade.registry import METHODS
from cascade.roles import BlackBoxOracle, MethodContext, Oracle, Predictor, Splits, StageOutput, WhiteBoxOracle
from cascade.checkpoint import CheckpointStore, atomic_save
from cascade.trainer import HistoryHook, HookBase, LambdaControllerHook, ProgressHook, Trainer

#: a stage-score function: (stage index, the stage's output, the batch's inputs) -> [B]
ScoreFn = Callable[[int, StageOutput, Tensor], Tensor]


def alpha_key(alpha: float) -> str:
    """The system name of the REINFORCE cascade trained with ``alpha``."""
    return f"reinforce_a{alpha:g}"


class MultiStageExperiment:
    """Runs one ``cascade:`` config over all its seeds and writes the output folder.

    Args:
        cfg: a validated config whose ``cascade`` section is set.
        out_dir: where results go (created).
        quiet: no progress bars.
        source: the config file's path, for ``metrics.json``.

    Raises:
        CascadeError: the config has no ``cascade:`` section, or the oracle's cost is unknown.
    """

    def __init__(self, cfg: ExperimentConfig, out_dir: str | Path, quiet: bool = False, source: str = ""):
        if cfg.cascade is None:
            raise CascadeError("MultiStageExperiment needs a config with a cascade: section")
        self.cfg = cfg
        self.cc = cfg.cascade
        self.out = Path(out_dir)
        self.quiet = quiet
        self.source = source
        self.device = resolve_device(cfg.device)
        self.task = build_task(cfg)
        self.mode = "black_box" if self.cc.oracle == "black_box" else "white_box"
        self.oracle_mflops = None
        if self.mode == "black_box":
            self.oracle_mflops = self.cc.oracle_mflops if self.cc.oracle_mflops is not None else self.task.oracle_mflops
            if self.oracle_mflops is None:
                raise CascadeError(
                    f"{source or 'config'}: cascade.oracle_mflops: the black-box oracle's cost is unknown")
        self.num_stages = len(self.cc.stages) + (self.mode == "black_box")
        self.histories: dict[str, list[dict[str, float]]] = {}
        self.checkpoints: CheckpointStore | None = None  # set while run() trains

    # -- training ---------------------------------------------------------------------

    def _fit(self, model: nn.Module, objective: Objective, data: Dataset, oc: OptimConfig, seed: int, desc: str,
             extra_hooks: tuple[HookBase, ...] = (), head: nn.Module | None = None,
             head_lr: float | None = None) -> None:
        """Train ``model`` with the shared trainer; ``head`` (a policy or predictor head
        that starts from scratch) may learn at its own rate ``head_lr``."""
        if head is None or head_lr is None or head_lr == oc.lr:
            opt, sched = build_optimizer(model.parameters(), oc)
        else:
            in_head = {id(p) for p in head.parameters()}
            opt, _ = build_optimizer([p for p in model.parameters() if id(p) not in in_head], oc)
            opt.add_param_group({"params": [p for p in head.parameters() if p.requires_grad], "lr": head_lr})
            sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=oc.milestones, gamma=oc.gamma)
        history = HistoryHook()
        hooks = [*extra_hooks, history, ProgressHook(desc, disable=self.quiet)]
        loader = make_loader(data, oc.batch_size, shuffle=True, seed=seed)
        trainer = Trainer(model, objective, opt, loader, oc.epochs, hooks, sched, self.device, name=desc)
        if self.checkpoints is not None:  # inside run(): checkpointed after each epoch, resumable
            self.checkpoints.fit(trainer)
        else:
            trainer.train()
        self.histories[desc] = history.history

    def _oracle(self) -> BlackBoxOracle | None:
        return BlackBoxOracle(self.oracle_mflops) if self.mode == "black_box" else None

    def build_cascade(self, stages: list[nn.Module]) -> MultiStageCascade:
        """The pre-trained ``stages`` (copied) behind a fresh stopping policy."""
        pc = self.cc.policy
        oracle = self._oracle()
        deciding = stages if oracle is not None else stages[:-1]
        policy = StoppingPolicy(
            [s.feature_dim for s in deciding], self.task.num_outputs, pc.inputs, pc.hidden, pc.shared, pc.detach,
            classification=self.task.criterion.kind == "classification",
        )
        return MultiStageCascade([copy.deepcopy(s) for s in stages], policy, oracle).to(self.device)

    def _train_seed(self, seed: int, splits: Splits) -> dict[str, list[nn.Module]]:
        """Every system's stage networks: ``plain``, ``appealnet`` and one per alpha."""
        cfg, cc, task = self.cfg, self.cc, self.task
        crit = task.criterion
        torch.manual_seed(seed)
        pre_data, tune_data = self._fit_data(seed, splits)
        pre = []
        for k, spec in enumerate(cc.stages):
            net = build_network(spec, task).to(self.device)
            self._fit(net, SupervisedObjective(crit), pre_data, cfg.pretrain, seed * 100 + k,
                      f"seed {seed} stage {k} pretrain")
            pre.append(net)
        finetune = cc.reinforce.finetune
        plain = [copy.deepcopy(n) for n in pre]
        for k, net in enumerate(plain):  # fairness: as long as, and on the data of, the REINFORCE fine-tuning
            self._fit(net, SupervisedObjective(crit), tune_data, finetune, seed * 100 + 20 + k,
                      f"seed {seed} stage {k}")
        systems: dict[str, list[nn.Module]] = {"plain": plain}

        if cc.appealnet_cascade:
            ac, pc = cfg.appealnet, cfg.appealnet.predictor
            heads: list[nn.Module] = []
            deciding = len(pre) if self.mode == "black_box" else len(pre) - 1
            for k in range(deciding):
                oracle: Oracle = WhiteBoxOracle(plain[k + 1]) if k + 1 < len(pre) else self._oracle()
                head = PredictorHead(pre[k].feature_dim, task.num_outputs, pc.inputs, pc.hidden, pc.detach,
                                     classification=crit.kind == "classification", normalize=pc.normalize)
                net = TwoHeadNetwork(copy.deepcopy(pre[k]), head).to(self.device)
                objective = AppealNetObjective(crit, oracle, ac.lambda_.init, ac.approximator_loss, ac.predictor_target)
                lc = ac.lambda_
                hooks = (LambdaControllerHook(objective, lc.budget, lc.up, lc.down),) if lc.dynamic else ()
                self._fit(net, objective, tune_data, ac.finetune, seed * 100 + 40 + k,
                          f"seed {seed} appealnet stage {k}", hooks, head=net.predictor,
                          head_lr=ac.finetune.lr * pc.lr_scale)
                heads.append(net)
            systems["appealnet"] = heads + plain[deciding:]

        rc = cc.reinforce
        for i, alpha in enumerate(rc.alphas):
            model = self.build_cascade(pre)
            objective = ReinforceObjective(crit, stage_costs(model, task.input_shape), alpha, rc.reward, rc.baseline,
                                           rc.momentum, rc.samples, rc.aux_weight, rc.entropy_weight)
            self._fit(model, objective, tune_data, rc.finetune, seed * 100 + 60 + i,
                      f"seed {seed} {alpha_key(alpha)}", head=model.policy, head_lr=rc.policy_lr)
            systems[alpha_key(alpha)] = [model]
        return systems

    def _fit_data(self, seed: int, splits: Splits) -> tuple[Dataset, Dataset]:
        """``(pre-training data, fine-tuning data)``: the training split twice, or split in two.

        With ``finetune_data: holdout`` the policy learns on inputs the stages were not
        pre-trained on, where their confidence and their mistakes look as they will on
        new data (on their own training inputs the stages are nearly always right, and a
        policy trained there learns that stopping early never costs accuracy).
        """
        rc = self.cc.reinforce
        if rc.finetune_data == "train":
            return splits.train, splits.train
        n = len(splits.train)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
        n_hold = max(1, int(round(rc.holdout_fraction * n)))
        if n_hold >= n:
            raise CascadeError(f"cascade.reinforce.holdout_fraction leaves no training data ({n} inputs)")
        return Subset(splits.train, sorted(perm[n_hold:])), Subset(splits.train, sorted(perm[:n_hold]))

    def _costs(self, systems: dict[str, list[nn.Module]]) -> dict[str, list[float]]:
        """Per-stage MFLOPs of every system, first to last (oracle included)."""
        shape = self.task.input_shape
        tail = [float(self.oracle_mflops)] if self.mode == "black_box" else []
        costs = {}
        for name, nets in systems.items():
            if isinstance(nets[0], MultiStageCascade):
                costs[name] = stage_costs(nets[0], shape)
            else:
                costs[name] = [measure_cost(n, shape).mflops for n in nets] + tail
        return costs

    # -- evaluation -------------------------------------------------------------------

    def _score_fns(
        self, seed: int, splits: Splits, name: str, nets: list[nn.Module]
    ) -> tuple[list[nn.Module], dict[str, ScoreFn]]:
        """The stage networks of one system and the stop scores it routes with."""
        if isinstance(nets[0], MultiStageCascade):
            model = nets[0]
            policy_score = ReinforceStopScore()

            def reinforce(k: int, out: StageOutput, x: Tensor) -> Tensor:
                out.q = model.policy(k, out)
                return policy_score.score(out)

            return list(model.stages), {"reinforce": reinforce}
        if name == "appealnet":
            score = AppealNetScore()
            return nets, {"appealnet": lambda k, out, x: score.score(out)}

        def fit(model, objective, data, oc, desc):
            self._fit(model, objective, data, oc, seed * 100 + 80, f"seed {seed} {desc}")

        ctx = MethodContext(task=self.task, train=splits.train, seed=seed, device=self.device, fit=fit)
        fns: dict[str, ScoreFn] = {}
        for method_name in self.cfg.evaluation.methods:
            per_stage: list[Predictor] = []
            for k in range(self.num_stages - 1):
                method = METHODS.get(method_name)()
                method.prepare(nets[k], ctx)
                per_stage.append(method)
            fns[method_name] = lambda k, out, x, per_stage=per_stage: per_stage[k].score_batch(nets[k], x)
        return nets, fns

    @torch.no_grad()
    def _collect(
        self, name: str, stages: list[nn.Module], fns: dict[str, ScoreFn], dataset: Dataset
    ) -> dict[str, np.ndarray]:
        """One system's per-sample columns on one split."""
        crit = self.task.criterion
        bs = self.cfg.evaluation.batch_size
        for s in stages:
            s.eval()
        deciding = self.num_stages - 1
        cols: dict[str, list[Tensor]] = {}
        for x, y in DataLoader(dataset, batch_size=bs, shuffle=False):
            x = x.to(self.device)
            for k, stage in enumerate(stages):
                out = stage(x)
                out = out if isinstance(out, StageOutput) else StageOutput(output=out)
                output = out.output.float().cpu()
                parts = {"correct": crit.correct(output, y)}
                if crit.kind == "classification":
                    parts["pred"] = crit.prediction(output)
                parts.update(crit.errors(output, y))
                if k < deciding:
                    for score_name, fn in fns.items():
                        parts[f"score_{score_name}"] = fn(k, out, x).float().cpu()
                for key, value in parts.items():
                    cols.setdefault(f"{name}_s{k}_{key}", []).append(value)
        out_cols = {key: torch.cat(v).numpy() for key, v in cols.items()}
        if self.mode == "black_box":  # the oracle is always right, by definition
            n = len(next(iter(out_cols.values())))
            out_cols[f"{name}_s{self.num_stages - 1}_correct"] = np.ones(n, dtype=bool)
        return out_cols

    def _samples(self, seed: int, splits: Splits, systems: dict[str, list[nn.Module]]) -> pd.DataFrame:
        frames = []
        prepared = {name: self._score_fns(seed, splits, name, nets) for name, nets in systems.items()}
        for split, ds in (("cal", splits.cal), ("test", splits.test)):
            cols: dict[str, Any] = {}
            for name, (stages, fns) in prepared.items():
                cols.update(self._collect(name, stages, fns, ds))
            targets = torch.cat([y for _, y in DataLoader(ds, batch_size=len(ds))])
            n = len(targets)
            head = {"seed": np.full(n, seed), "split": np.full(n, split), "index": np.arange(n),
                    "target": targets.numpy() if targets.dim() == 1 else np.full(n, np.nan)}
            frames.append(pd.DataFrame({**head, **cols}))
        return pd.concat(frames, ignore_index=True)

    def variants(self, costs: dict[str, list[float]]) -> dict[str, list[Variant]]:
        """``method -> the trained cascades it routes with`` (several for REINFORCE: one per alpha)."""
        out = {"reinforce": [Variant(alpha_key(a), "reinforce", tuple(costs[alpha_key(a)]), a)
                             for a in self.cc.reinforce.alphas]}
        for m in self.cfg.evaluation.methods:
            out[f"{m}_cascade"] = [Variant("plain", m, tuple(costs["plain"]))]
        if self.cc.appealnet_cascade:
            out["appealnet_cascade"] = [Variant("appealnet", "appealnet", tuple(costs["appealnet"]))]
        return out

    # -- the whole run ----------------------------------------------------------------

    def run(self, resume: bool = False) -> dict[str, Any]:
        """Train and evaluate every seed, write every output file; the metrics dict.

        Every training phase is checkpointed after each epoch and on Ctrl-C, as in the
        AppealNet experiment (:meth:`cascade.experiment.Experiment.run`); ``resume``
        continues an interrupted run in the same folder.

        Raises:
            CheckpointError: checkpoints that do not fit, or an unfinished run's
                checkpoints when ``resume`` is off; raised before any work.
        """
        return run_checkpointed(self, resume, self._run)

    def _run(self) -> dict[str, Any]:
        import yaml

        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "checkpoints").mkdir(exist_ok=True)
        (self.out / "config.yaml").write_text(yaml.safe_dump(resolved_dict(cfg), sort_keys=False))
        frames, costs, params = [], {}, {}
        for seed in cfg.seeds:
            splits = self.task.build_splits(seed)
            check_splits(self.task, splits, f"task {cfg.task.name}, seed {seed}")  # NaN/inf inputs, bad labels
            systems = self._train_seed(seed, splits)
            if not costs:
                costs = self._costs(systems)
                params = {f"stage_{k}": sum(p.numel() for p in n.parameters()) for k, n in enumerate(systems["plain"])}
                policy = systems[alpha_key(self.cc.reinforce.alphas[0])][0].policy
                params["policy"] = sum(p.numel() for p in policy.parameters())
            for name, nets in systems.items():
                state = (nets[0].state_dict() if len(nets) == 1
                         else {f"stage_{k}": n.state_dict() for k, n in enumerate(nets)})
                atomic_save(state, self.out / "checkpoints" / f"seed{seed}_{name}.pt")
            frames.append(self._samples(seed, splits, systems))
        samples = pd.concat(frames, ignore_index=True)
        samples.to_csv(self.out / "samples.csv", index=False)

        variants = self.variants(costs)
        rows = operating_points(samples, variants, self.cc.reinforce.threshold, self.cc.budgets,
                                self._ad_targets(), self.mode, self.num_stages)
        metrics = self._metrics(samples, costs, params, variants, rows)
        (self.out / "metrics.json").write_text(json.dumps(metrics, indent=2))

        from cascade import multistage_report

        multistage_report.write_tables(metrics, self.out)
        multistage_report.write_figures(samples, variants, metrics, self.out)
        return metrics

    def _ad_targets(self) -> list[float]:
        ev = self.cfg.evaluation
        return list(ev.white_box_targets if self.mode == "white_box" else ev.black_box_targets)

    def _metrics(self, samples: pd.DataFrame, costs: dict[str, list[float]], params: dict[str, int],
                 variants: dict[str, list[Variant]], rows: list[dict]) -> dict[str, Any]:
        k_last = self.num_stages - 1
        test = samples[samples["split"] == "test"]
        acc_cols = [c for c in samples.columns if c.endswith("_correct")]
        by_seed = test.groupby("seed")[acc_cols].mean()

        def name(col: str) -> str:  # plain_s0_correct -> stage_0; reinforce_a0.1_s0_correct -> reinforce_a0.1_stage_0
            system, _, rest = col[: -len("_correct")].rpartition("_s")
            return f"stage_{rest}" if system == "plain" else f"{system}_stage_{rest}"

        accuracy = {name(c): float(by_seed[c].mean()) for c in acc_cols}
        accuracy_std = {name(c): float(by_seed[c].std(ddof=1)) for c in acc_cols} if len(by_seed) > 1 else {}
        networks = {f"stage_{k}": {"mflops": costs["plain"][k], "params": params.get(f"stage_{k}")}
                    for k in range(self.num_stages)}
        policy_mflops = [r - p for r, p in zip(costs[alpha_key(self.cc.reinforce.alphas[0])], costs["plain"])]
        points = aggregate(rows)
        return {
            "task": self.cfg.task.name,
            "config": self.source,
            "seeds": list(self.cfg.seeds),
            "modes": [self.mode],
            "flops_unit": "MFLOPs = millions of multiply-accumulates (the AppealNet paper's FLOPs)",
            "num_stages": self.num_stages,
            "greedy_threshold": self.cc.reinforce.threshold,
            "stage_costs": list(costs["plain"]),
            "networks": networks,
            "policy": {"mflops_per_stage": policy_mflops[:-1], "params": params.get("policy")},
            "system_stage_costs": costs,
            "accuracy": accuracy,
            "accuracy_std": accuracy_std,
            "reference": {"stage": k_last, "accuracy": accuracy[f"stage_{k_last}"], "mflops": costs["plain"][k_last]},
            "variants": {m: [asdict(v) for v in vs] for m, vs in variants.items()},
            "operating_points": points,
            "comparison": comparison(points, [m for m in variants if m != "reinforce"]),
            "training": self.histories,
        }


# --------------------------------------------------------------------------- operating points


def operating_points(samples: pd.DataFrame, variants: dict[str, list[Variant]], greedy_threshold: float,
                     budgets: list[float], ad_targets: list[float], mode: str, num_stages: int) -> list[dict]:
    """Every operating point, per seed, from the per-sample table (see the module docstring).

    Args:
        samples: ``samples.csv`` as a frame.
        variants: ``method -> variants`` (:meth:`MultiStageExperiment.variants`).
        greedy_threshold: the policy's test-time threshold.
        budgets: mean-cost budgets as fractions of the last plain stage's cost.
        ad_targets: accuracy-degradation targets.
        mode: ``white_box`` (reference = the last plain stage) or ``black_box`` (the oracle).
        num_stages: K.

    Returns:
        One dict per (seed, method, selection, threshold source, alpha / budget / target).
    """
    k = num_stages
    ref_col = f"plain_s{k - 1}_correct"
    last_cost = variants["reinforce"][0].stage_mflops[-1]  # the last stage has no policy head: as the plain one
    rows: list[dict] = []
    for seed, frame in samples.groupby("seed", sort=True):
        split = {name: part for name, part in frame.groupby("split")}
        arrays = {s: {m: [variant_arrays(split[s], v, k) for v in vs] for m, vs in variants.items()}
                  for s in ("cal", "test")}
        sweeps: dict[str, dict[str, list[CascadeSweep]]] = {
            s: {m: [cascade_sweep(sc, co, v.stage_mflops) for (sc, co), v in zip(arrays[s][m], vs)]
                for m, vs in variants.items()} for s in ("cal", "test")}
        ref_acc = {s: float(split[s][ref_col].mean()) for s in ("cal", "test")}

        def point(method: str, sel: Selection, **fields: Any) -> dict:
            v = variants[method][sel.variant]
            sc, co = arrays["test"][method][sel.variant]
            p = cascade_point(sel.threshold, sc, co, v.stage_mflops)
            return {
                "seed": int(seed), "mode": mode, "method": method, **fields,
                "chosen_alpha": v.alpha, "feasible": sel.feasible, "threshold": p.threshold,
                "system_accuracy": p.system_accuracy, "cost_mflops": p.cost_mflops,
                "relative_cost": p.cost_mflops / last_cost,
                "ad": (ref_acc["test"] if mode == "white_box" else 1.0) - p.system_accuracy,
                "skipping_rate": 1.0 - p.exit_fractions[-1], "appeal_rate": p.exit_fractions[-1],
                "exit_fractions": p.exit_fractions,
            }

        base = {"alpha": None, "budget_fraction": None, "target_ad": None, "target_mflops": None}
        for i, v in enumerate(variants["reinforce"]):
            greedy = Selection(i, greedy_threshold, True)
            g = point("reinforce", greedy, selection="greedy", threshold_source="fixed", **(base | {"alpha": v.alpha}))
            rows.append(g)
            sc, co = arrays["cal"]["reinforce"][i]
            cal_cost = cascade_point(greedy_threshold, sc, co, v.stage_mflops).cost_mflops
            for method in variants:
                if method == "reinforce":
                    continue
                for source, budget in (("test", g["cost_mflops"]), ("val", cal_cost)):
                    sel = select_by_cost(sweeps["cal" if source == "val" else "test"][method], budget)
                    rows.append(point(method, sel, selection="matched_cost", threshold_source=source,
                                      **(base | {"alpha": v.alpha, "target_mflops": budget})))
        for method in variants:
            for source in ("test", "val"):
                sw = sweeps["cal" if source == "val" else "test"][method]
                for b in budgets:
                    sel = select_by_cost(sw, b * last_cost)
                    rows.append(point(method, sel, selection="budget", threshold_source=source,
                                      **(base | {"budget_fraction": b, "target_mflops": b * last_cost})))
                for t in ad_targets:
                    ref = ref_acc["cal" if source == "val" else "test"] if mode == "white_box" else 1.0
                    sel = select_by_accuracy(sw, sw[0].n * (ref - t))
                    rows.append(point(method, sel, selection="target_ad", threshold_source=source,
                                      **(base | {"target_ad": t})))
    return rows


_KEYS = ("mode", "method", "selection", "threshold_source", "alpha", "budget_fraction", "target_ad")
_VALUES = ("threshold", "target_mflops", "system_accuracy", "cost_mflops", "relative_cost", "ad", "skipping_rate",
           "appeal_rate")


def aggregate(rows: list[dict]) -> list[dict]:
    """Mean over seeds of each operating point, ``*_std`` (ddof=1) when several seeds.

    ``exit_fractions`` is averaged stage by stage; ``chosen_alpha`` lists each seed's
    choice; ``feasible`` is True only if it held for every seed.
    """
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in _KEYS), []).append(r)
    n_seeds = len({r["seed"] for r in rows})
    out = []
    for key, group in groups.items():
        row: dict[str, Any] = dict(zip(_KEYS, key))
        for v in _VALUES:
            vals = [g[v] for g in group if g[v] is not None]
            row[v] = float(np.mean(vals)) if vals else None
            if n_seeds > 1 and vals:
                row[f"{v}_std"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
        exits = np.array([g["exit_fractions"] for g in group])  # [seeds, K]
        row["exit_fractions"] = exits.mean(axis=0).tolist()
        if n_seeds > 1:
            row["exit_fractions_std"] = exits.std(axis=0, ddof=1).tolist() if len(group) > 1 else [0.0] * exits.shape[1]
        row["chosen_alpha"] = [g["chosen_alpha"] for g in group]
        row["feasible"] = all(g["feasible"] for g in group)
        out.append(row)
    return out


def comparison(points: list[dict], others: list[str]) -> list[dict]:
    """Each greedy REINFORCE point beside every other method at matched cost.

    Returns:
        One dict per (alpha, threshold source): the policy's accuracy and cost, and per
        method its accuracy and cost at the matched budget and the accuracy difference
        ``reinforce - method`` (> 0: the policy is more accurate for no more cost).
    """
    greedy = {p["alpha"]: p for p in points if p["selection"] == "greedy"}
    matched = {(p["alpha"], p["threshold_source"], p["method"]): p for p in points if p["selection"] == "matched_cost"}
    out = []
    for alpha, g in greedy.items():
        for source in ("val", "test"):
            row = {"alpha": alpha, "threshold_source": source, "reinforce_accuracy": g["system_accuracy"],
                   "reinforce_mflops": g["cost_mflops"], "reinforce_relative_cost": g["relative_cost"], "methods": {}}
            for m in others:
                p = matched.get((alpha, source, m))
                if p is not None:
                    row["methods"][m] = {"accuracy": p["system_accuracy"], "mflops": p["cost_mflops"],
                                         "accuracy_gain": g["system_accuracy"] - p["system_accuracy"],
                                         "feasible": p["feasible"]}
            out.append(row)
    return out


def run_multistage(
    cfg: ExperimentConfig, out_dir: str | Path, quiet: bool = False, source: str = "", resume: bool = False
) -> str:
    """Run a ``cascade:`` config; the markdown summary (also written to ``table.md``)."""
    from cascade.multistage_report import render_markdown

    return render_markdown(MultiStageExperiment(cfg, out_dir, quiet=quiet, source=source).run(resume))
