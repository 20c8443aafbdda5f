"""Deployment: route each input down the cascade; each stage sees only the rows still travelling.

Stage 0 runs on the whole batch, stage ``k`` only on the inputs no earlier stage kept,
and the big network only on the rest, so the wall-clock speed-up approaches
``t_big / (t_little + AR * t_big)`` for two stages.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cascade.core.errors import CascadeError
from cascade.contracts.roles import Predictor, StageOutput


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
        # One host sync per routed stage, where the rows that go on are counted (the next
        # stage's batch size); the answered rows are written with torch.where over the
        # rows a stage saw, which needs none.
        n = len(x)
        last = self.num_stages - 1
        exit_stage = torch.full((n,), last, dtype=torch.long, device=x.device)
        output: Tensor | None = None
        active: Tensor | None = None  # rows still travelling down the cascade; None: all of them
        for k, stage in enumerate(self.stages):
            out = stage(x if active is None else x[active])
            if output is None:
                output = torch.full((n, *out.output.shape[1:]), float("nan"), device=x.device)
            # compared in float64, the precision the run stored its scores in and chose the
            # thresholds on
            stop = out.q.double() >= self.threshold  # [m]
            keep = stop.view(-1, *([1] * (out.output.dim() - 1)))
            answered = torch.where(keep, out.output.to(output.dtype), float("nan"))  # NaN: not answered yet
            here = torch.where(stop, k, last)
            rows = torch.arange(n, device=x.device) if active is None else active
            output[rows], exit_stage[rows] = answered, here
            active = rows[~stop]
            if len(active) == 0:
                break
        if self.big is not None and len(active):
            output[active] = self.big(x[active]).output.to(output.dtype)
        return RoutedOutput(output=output, exit_stage=exit_stage, num_stages=self.num_stages)

    @classmethod
    def from_run(
        cls, run_dir: str | Path, *, method: str | None = None, mode: str | None = None, target_ad: float = 0.005,
        threshold_source: str = "val", seed: int | None = None,
    ) -> Router:
        """The router of a finished run's method at one of its operating points.

        See :func:`load_run_point` for the arguments and errors.
        """
        return load_run_point(run_dir, method=method, mode=mode, target_ad=target_ad,
                              threshold_source=threshold_source, seed=seed).router


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
    task: Any
    run: Path
    metrics: dict
    point: dict
    method: str
    mode: str
    seed: int
    variant: str
    config_text: str


def load_run_point(
    run_dir: str | Path, *, method: str | None = None, mode: str | None = None, target_ad: float = 0.005,
    threshold_source: str = "val", seed: int | None = None,
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

    A method that trains several systems (a REINFORCE policy per alpha) has one point
    per target: the system the run chose there (``points.csv``'s ``variant``).

    Raises:
        CascadeError: a missing or unreadable run file (one line naming it), or no
            such method, mode, seed or operating point (naming what the run has).
    """
    from cascade.training.building import (
        BIG,
        build_network,
        build_task,
        resolve_specs,
        stage_name,
        system_name,
    )
    from cascade.evaluation import THRESHOLD_SOURCES
    from cascade.methods import CascadeContext, MethodKind, TrainedMethod, build_methods
    from cascade.contracts.roles import BlackBoxOracle, MethodContext, Mode, WhiteBoxOracle
    from cascade.runs.reader import check_present, load_weights, read_config, read_metrics, read_points

    run = Path(run_dir)
    check_present(run)
    metrics = read_metrics(run)
    for folder in (metrics.get("workdir"), str(Path.cwd())):  # where the run found the user's own modules
        if folder and folder not in sys.path:
            sys.path.insert(0, folder)
    config_text, cfg = read_config(run)
    seed = metrics["seeds"][0] if seed is None else seed
    _choose(seed, metrics["seeds"], "seed", run)
    mode = _choose(mode or metrics["modes"][0], metrics["modes"], "mode", run)
    kinds = metrics["methods"]
    if method is None:
        method = next((m for m, v in kinds.items() if v["kind"] == MethodKind.TRAINED.value), next(iter(kinds)))
    _choose(method, list(kinds), "method", run)
    if threshold_source not in THRESHOLD_SOURCES:
        raise CascadeError(f"threshold source {threshold_source!r}: use "
                           + ", ".join(f"{k} ({v})" for k, v in THRESHOLD_SOURCES.items()))

    points = read_points(run)
    points = points[(points["seed"] == seed) & (points["mode"] == mode) & (points["method"] == method)
                    & (points["selection"] == "target_ad")]
    row = points[(points["threshold_source"] == threshold_source)
                 & ((points["target_ad"] - target_ad).abs() < 1e-12)]
    if row.empty:
        have = sorted(points.loc[points["threshold_source"] == threshold_source, "target_ad"].unique())
        if not have:
            raise CascadeError(f"{run / 'points.csv'}: no {threshold_source} points of {method} ({mode}); "
                               f"the run has {', '.join(sorted(points['threshold_source'].unique()))}")
        raise CascadeError(f"{run / 'points.csv'}: no {threshold_source} point of {method} ({mode}) at target AD "
                           f"{target_ad:g}; the run has targets {', '.join(f'{t:g}' for t in have)}")
    point = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.iloc[0].to_dict().items()}
    threshold = float(point["threshold"])
    variant = point["variant"] if isinstance(point["variant"], str) else ""

    task = build_task(cfg)
    specs, big_spec = resolve_specs(cfg, task)

    def network(spec, name: str, role: str) -> nn.Module:
        net = build_network(spec.model_copy(update={"checkpoint": None}), task, role)
        return load_weights(net, run / "checkpoints" / f"seed{seed}_{name}.pt", f"{role} network")

    plain = [network(s, stage_name(k), f"stages.{k}") for k, s in enumerate(specs)]
    big = network(big_spec, BIG, "big") if mode == Mode.WHITE_BOX.value else None
    entry = next((e for e in build_methods(cfg.methods, task.criterion.kind) if e.label == method), None)
    if entry is None:
        raise CascadeError(f"{run / 'config.yaml'}: no method {method!r}, which metrics.json lists; the two files are "
                           "not of one run: run the experiment again")
    if issubclass(entry.cls, TrainedMethod):
        oracle = WhiteBoxOracle(big) if big is not None else BlackBoxOracle(metrics["last_stage_mflops"][mode])
        ctx = CascadeContext(task=task, mode=Mode(mode), pretrained=plain, plain=plain, oracle=oracle,
                             stage_mflops=[], data=None, finetune=cfg.finetune, device=torch.device("cpu"),
                             fit=None, with_oracle_outputs=None)
        systems = {s.variant: s for s in entry.instance().build(ctx)}
        if variant not in systems:
            raise CascadeError(f"{run / 'points.csv'}: system {variant!r} of {method} is not one config.yaml builds "
                               f"({', '.join(map(repr, systems))}); the files are not of one run")
        system = systems[variant]
        name = system_name(method, mode, variant)
        load_weights(system.module(), run / "checkpoints" / f"seed{seed}_{name}.pt", f"{method} system")
        stages = system.stages
    else:
        splits = None
        stages = []
        for k, net in enumerate(plain):
            scorer = entry.instance()
            if type(scorer).prepare is not Predictor.prepare:  # it fits itself: again, as the run did
                splits = splits or task.build_splits(seed)
                nxt = plain[k + 1] if k + 1 < len(plain) else big
                scorer.prepare(net, MethodContext(task=task, train=splits.train, seed=seed, device=torch.device("cpu"),
                                                  fit=_plain_fit(seed, task), cal=splits.cal, mode=Mode(mode),
                                                  next_stage=nxt))
            stages.append(ScoredStage(net, scorer))
    return RunPoint(router=Router(stages, threshold, big), task=task, run=run, metrics=metrics, point=point,
                    method=method, mode=mode, seed=seed, variant=variant, config_text=config_text)


def _choose(value: Any, known: list, what: str, run: Path) -> Any:
    if value not in known:
        raise CascadeError(f"{run / 'metrics.json'}: {what} {value!r} is not in this run; it has "
                           f"{', '.join(map(str, known))}")
    return value


def _plain_fit(seed: int, task):
    """``MethodContext.fit`` outside a run: the pipeline's trainer set-up on the CPU (the
    task's augmentation, per-step schedules), no checkpoints or progress."""
    from cascade.training.building import build_trainer, phase_seed

    def fit(model, objective, data, oc, desc):
        build_trainer(model, objective, data, oc, phase_seed(seed, "post_hoc"), desc, task=task,
                      device=torch.device("cpu")).train()

    return fit
