"""Deployment: route each input down the cascade; each stage sees only the rows still travelling.

Stage 0 runs on the whole batch, stage ``k`` only on the inputs no earlier stage kept,
and the big network only on the rest, so the wall-clock speed-up approaches
``t_big / (t_little + AR * t_big)`` for two stages.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from cascade.config.schema import ExperimentConfig
from cascade.contracts.methods import BuildContext, MethodContext, Predictor, TrainedMethod
from cascade.contracts.stages import BlackBoxOracle, StageOutput, WhiteBoxOracle
from cascade.contracts.task import Task
from cascade.core.enums import Mode, ThresholdSource
from cascade.core.errors import CascadeError
from cascade.deploy.kernel import route_rows
from cascade.engine.tasks import build_network, build_task, resolve_specs
from cascade.methods.catalogue import MethodEntry, build_methods
from cascade.nn.perturb import PerturbConfig, perturb_splits
from cascade.runs.layout import BIG, CONFIG, POINTS, checkpoint_path, stage_name, system_name
from cascade.runs.reader import (
    PointQuery,
    RunPoints,
    check_present,
    load_weights,
    point_query,
    read_config,
    read_metrics,
)
from cascade.training.phase import build_trainer
from cascade.training.seeds import phase_seed


@dataclass
class RoutedOutput:
    """The system's answers ``[B, ...]`` and ``exit_stage [B]``: which stage answered
    (``num_stages - 1`` is the big side; with a black-box oracle those rows hold NaN,
    the caller fetches the oracle's answers for them)."""

    output: Tensor
    exit_stage: Tensor
    num_stages: int

    @property
    def kept(self) -> Tensor:
        """Bool ``[B]``: answered before the big side."""
        return self.exit_stage < self.num_stages - 1

    @property
    def appeal_rate(self) -> float:
        return 1.0 - self.kept.float().mean().item()


class ScoredStage(nn.Module):
    """A plain stage with a post-hoc score: ``forward`` gives its output with ``q`` set."""

    def __init__(self, network: nn.Module, predictor: Predictor):
        super().__init__()
        self.network, self.predictor = network, predictor

    def forward(self, x: Tensor) -> StageOutput:
        out = self.network(x)
        out.q = self.predictor.score_batch(self.network, x, out)
        return out


class Router(nn.Module):
    """Routed stages, one threshold, and the big side.

    Args:
        stages: routed stages, cheapest first; each ``forward(x)`` returns a
            :class:`StageOutput` whose ``q`` is the score (higher = answer here).
        threshold: stage ``k`` answers where ``q >= threshold``.
        big: the big network; None for a black-box oracle.
    """

    def __init__(self, stages: list[nn.Module], threshold: float, big: nn.Module | None = None):
        super().__init__()
        self.stages = nn.ModuleList(stages).eval()
        self.big = None if big is None else big.eval()
        self.threshold = threshold

    @property
    def num_stages(self) -> int:
        return len(self.stages) + 1

    @torch.no_grad()
    def forward(self, x: Tensor) -> RoutedOutput:
        # the rule and the rows' bookkeeping are the kernel's (one host sync per routed
        # stage); the answered rows are written with torch.where over the rows a stage saw,
        # which needs none
        stages = [_output_and_score(s) for s in self.stages]
        routing = route_rows(x, stages, [self.threshold] * len(stages))
        # an empty batch runs no stage: the first one, on no rows, gives the outputs' shape
        shape = (routing.visits[0].output if routing.visits else self.stages[0](x).output).shape[1:]
        output = torch.full((len(x), *shape), float("nan"), device=x.device)
        for v in routing.visits:
            keep = v.stop.view(-1, *([1] * (v.output.dim() - 1)))
            output[v.rows] = torch.where(keep, v.output.to(output.dtype), float("nan"))  # NaN: not answered yet
        active = routing.remaining
        if self.big is not None and len(active):
            output[active] = self.big(x[active]).output.to(output.dtype)
        return RoutedOutput(output=output, exit_stage=routing.exit_stage, num_stages=self.num_stages)

    @classmethod
    def from_run(
        cls, run_dir: str | Path, *, method: str | None = None, mode: Mode | str | None = None,
        target_ad: float = 0.005, threshold_source: ThresholdSource | str = ThresholdSource.VAL, seed: int | None = None,
        appeal_budget: float | None = None,
    ) -> Router:
        """The router of a finished run's method at one of its operating points (at
        ``target_ad``, or at ``appeal_budget`` when given).

        See :func:`load_run_point` for the arguments and errors.
        """
        return load_run_point(run_dir, method=method, mode=mode, target_ad=target_ad,
                              threshold_source=threshold_source, seed=seed, appeal_budget=appeal_budget).router


@dataclass
class RunPoint:
    """A finished run's method at one operating point: what deployment needs.

    Attributes:
        router: the routed stages, the threshold and the big network (None: black box).
        task: the run's task (its input shape, preprocessing and output names).
        run: the run folder.
        metrics: its ``metrics.json``.
        point: the seed's row of ``points.csv`` (threshold, AD and skipping rate on test...).
        method, mode, seed, variant: which system of the run.
        config_text: its ``config.yaml``, verbatim.
    """

    router: Router
    task: Task
    run: Path
    metrics: dict
    point: dict
    method: str
    mode: Mode
    seed: int
    variant: str
    config_text: str


def load_run_point(
    run_dir: str | Path, *, method: str | None = None, mode: Mode | str | None = None, target_ad: float = 0.005,
    threshold_source: ThresholdSource | str = ThresholdSource.VAL, seed: int | None = None,
    appeal_budget: float | None = None,
) -> RunPoint:
    """A finished run's method at one of its operating points.

    The threshold is the one the run chose for that seed (``points.csv``; by default on
    the calibration split, the deployable choice); the weights come from
    ``checkpoints/``, loaded with ``weights_only=True``. A post-hoc method that fits
    itself (``error_head``) is fitted again on the seed's training split.

    Args:
        run_dir: the output folder of ``cascade run``.
        method: a method of the run (default: its first trained one, else its first).
        mode: ``white_box`` or ``black_box`` (default: the run's first).
        target_ad: the accuracy-degradation target of the operating point.
        threshold_source: ``val``, ``guaranteed`` or ``test``
            (:data:`cascade.evaluation.THRESHOLD_SOURCES`).
        seed: one of the run's seeds (default: its first).
        appeal_budget: the point at this appeal budget (``evaluation.appeal_budgets``;
            sources ``val`` and ``test``) instead of the target-AD one.

    A method that trains several systems (a REINFORCE policy per alpha) has one point
    per target: the system the run chose there (``points.csv``'s ``variant``).

    Raises:
        CascadeError: a missing or unreadable run file (one line naming it), or no
            such method, mode, seed or operating point (naming what the run has).
    """
    run = Path(run_dir)
    check_present(run)
    metrics = read_metrics(run)
    for folder in (metrics.get("workdir"), str(Path.cwd())):  # where the run found the user's own modules
        if folder and folder not in sys.path:
            sys.path.insert(0, folder)
    config_text, cfg = read_config(run)
    query = point_query(run, metrics, method=method, mode=mode, target_ad=target_ad,
                        threshold_source=threshold_source, seed=seed, appeal_budget=appeal_budget)
    point = RunPoints(run).point(query)
    variant = point["variant"] if isinstance(point["variant"], str) else ""
    task = build_task(cfg)
    plain, big = _networks(run, cfg, task, query)
    entry = next((e for e in build_methods(cfg.methods, task.criterion.kind) if e.label == query.method), None)
    if entry is None:
        raise CascadeError(f"{run / CONFIG}: no method {query.method!r}, which metrics.json lists; the two files "
                           "are not of one run: run the experiment again")
    if issubclass(entry.cls, TrainedMethod):
        oracle = WhiteBoxOracle(big) if big is not None else BlackBoxOracle(metrics["last_stage_mflops"][query.mode])
        ctx = BuildContext(task=task, mode=query.mode, pretrained=plain, oracle=oracle, device=torch.device("cpu"))
        stages = _trained_stages(run, entry, ctx, query, variant)
    else:
        stages = _scored_stages(entry, task, plain, big, query, cfg.perturb)
    return RunPoint(router=Router(stages, float(point["threshold"]), big), task=task, run=run, metrics=metrics,
                    point=point, method=query.method, mode=query.mode, seed=query.seed, variant=variant,
                    config_text=config_text)


def _networks(run: Path, cfg: ExperimentConfig, task: Task, query: PointQuery) -> tuple[list[nn.Module], nn.Module | None]:
    """The run's plain routed stages and (white-box) big network, with the seed's weights."""
    specs, big_spec = resolve_specs(cfg, task)

    def network(spec, name: str, role: str) -> nn.Module:
        net = build_network(spec.model_copy(update={"checkpoint": None}), task, role)
        return load_weights(net, checkpoint_path(run, query.seed, name), f"{role} network")

    plain = [network(s, stage_name(k), f"stages.{k}") for k, s in enumerate(specs)]
    big = network(big_spec, BIG, "big") if query.mode == Mode.WHITE_BOX else None
    return plain, big


def _trained_stages(run: Path, entry: MethodEntry, ctx: BuildContext, query: PointQuery,
                    variant: str) -> list[nn.Module]:
    """The routed stages of the trained system ``variant``, with the seed's weights."""
    systems = {s.variant: s for s in entry.instance().build(ctx)}
    if variant not in systems:
        raise CascadeError(f"{run / POINTS}: system {variant!r} of {query.method} is not one config.yaml builds "
                           f"({', '.join(map(repr, systems))}); the files are not of one run")
    system = systems[variant]
    name = system_name(query.method, query.mode, variant)
    load_weights(system.module(), checkpoint_path(run, query.seed, name), f"{query.method} system")
    return system.stages


def _scored_stages(entry: MethodEntry, task: Task, plain: list[nn.Module], big: nn.Module | None,
                   query: PointQuery, perturb: PerturbConfig) -> list[nn.Module]:
    """The plain stages, each with its post-hoc scorer (one that fits itself is fitted
    again, as the run did: on the seed's splits after the run's perturbations, e.g. a
    shifted calibration split)."""
    splits = None
    stages = []
    for k, net in enumerate(plain):
        scorer = entry.instance()
        if type(scorer).prepare is not Predictor.prepare:  # it fits itself: again, as the run did
            splits = splits or perturb_splits(task.build_splits(query.seed), perturb, task.num_outputs,
                                              task.preprocessing, query.seed)[0]
            nxt = plain[k + 1] if k + 1 < len(plain) else big
            mode = query.mode if entry.cls.mode_dependent else None  # as the run's _prepare_post_hoc
            scorer.prepare(net, MethodContext(task=task, train=splits.train, seed=query.seed, device=torch.device("cpu"),
                                              fit=_plain_fit(query.seed, task, k), cal=splits.cal, mode=mode,
                                              next_stage=nxt))
        stages.append(ScoredStage(net, scorer))
    return stages


def _output_and_score(stage: nn.Module):
    """A stage returning a :class:`StageOutput`, as the kernel's ``x -> (output, score)``."""

    def run(x: Tensor) -> tuple[Tensor, Tensor]:
        out = stage(x)
        return out.output, out.q

    return run


def _plain_fit(seed: int, task: Task, stage: int):
    """``MethodContext.fit`` outside a run: the pipeline's trainer set-up on the CPU (the
    task's augmentation, per-step schedules, the routed stage's data order), no
    checkpoints or progress."""

    def fit(model, objective, data, oc, desc):
        build_trainer(model, objective, data, oc, phase_seed(seed, "post_hoc", stage=stage), desc, task=task,
                      device=torch.device("cpu")).train()

    return fit
