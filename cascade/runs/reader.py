"""Readers of a run folder's files for deployment, each failure one line naming the file.

``metrics.json``, ``config.yaml``, ``points.csv`` and the checkpoints are read by
:func:`cascade.deploy.router.load_run_point` (and through it by export and serve); a
truncated, byte-flipped or hand-broken file is a :class:`~cascade.core.errors.CascadeError`
naming it (and its key or line), never a traceback. Which operating point is a typed
:class:`PointQuery` (:func:`point_query` fills in the run's defaults), looked up in
``points.csv`` with :class:`RunPoints`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from cascade.config.validation import validate
from cascade.contracts.methods import MethodKind
from cascade.core.enums import Mode, Selection, ThresholdSource
from cascade.core.errors import CascadeError, ConfigError, first_line
from cascade.core.files import load_checkpoint
from cascade.evaluation.points import THRESHOLD_SOURCES
from cascade.runs.layout import CONFIG, METRICS, POINTS

#: the run files a deployment reads (checkpoints aside)
RUN_FILES = (CONFIG, METRICS, POINTS)
#: ``points.csv``'s columns a deployment reads, and which must be numbers
POINT_COLUMNS = ("seed", "mode", "method", "selection", "threshold_source", "target_ad", "threshold", "variant")
NUMERIC_POINT_COLUMNS = ("seed", "target_ad", "threshold", "system_accuracy", "ad", "skipping_rate", "appeal_rate",
                         "cost_mflops", "relative_cost", "delta")


class _MethodInfo(BaseModel):
    kind: str


class RunMetrics(BaseModel):
    """The keys of ``metrics.json`` a deployment reads (others are kept, unchecked)."""

    model_config = ConfigDict(extra="allow")

    task: str
    seeds: list[int]
    modes: list[Mode]
    methods: dict[str, _MethodInfo]
    last_stage_mflops: dict[str, float | None]
    workdir: str | None = None
    config: str | None = None


def check_present(run: Path) -> None:
    """Raises:
        CascadeError: a file of :data:`RUN_FILES` is missing."""
    for name in RUN_FILES:
        if not (run / name).is_file():
            raise CascadeError(f"{run / name}: not found; is {run} the output folder of a finished `cascade run`?")


def read_metrics(run: Path) -> dict[str, Any]:
    """``metrics.json`` as a dict, its deployment keys checked (:class:`RunMetrics`)."""
    path = run / METRICS
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise CascadeError(f"{path}: not valid JSON ({first_line(exc)}); the file is "
                           "damaged: run the experiment again") from None
    try:
        RunMetrics.model_validate(data)
    except ValidationError as exc:
        e = exc.errors()[0]
        key = ".".join(map(str, e["loc"])) or "<root>"
        raise CascadeError(f"{path}: {key}: {e['msg']}; the file is damaged: run the experiment again") from None
    return data


def read_config(run: Path):
    """``(text, validated config)`` of ``config.yaml``."""
    path = run / CONFIG
    try:
        text = path.read_text()
        data = yaml.safe_load(text)
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        raise CascadeError(f"{path}: not readable YAML ({first_line(exc)}); the run's resolved config is "
                           "damaged: run the experiment again") from None
    try:
        return text, validate(data, str(path))
    except ConfigError as exc:  # one line: the first problem, and how many more
        more = f" (and {len(exc.errors) - 1} more)" if len(exc.errors) > 1 else ""
        raise CascadeError(f"{path}: {exc.errors[0]}{more}; the run's resolved config is damaged") from None


def read_points(run: Path):
    """``points.csv`` as a frame, its columns checked: numbers where numbers belong."""
    path = run / POINTS
    try:
        points = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as exc:
        raise CascadeError(f"{path}: not a readable CSV ({first_line(exc)}); the file is "
                           "damaged") from None
    missing = [c for c in POINT_COLUMNS if c not in points.columns]
    if missing:
        raise CascadeError(f"{path}: no column {', '.join(missing)}; the file is damaged")
    for col in NUMERIC_POINT_COLUMNS:
        if col not in points.columns:
            continue
        numbers = pd.to_numeric(points[col], errors="coerce")
        bad = numbers.isna() & points[col].notna()
        if bad.any():
            line = int(bad.to_numpy().nonzero()[0][0]) + 2  # the header is line 1
            raise CascadeError(f"{path}: line {line}: {col} {points[col][bad].iloc[0]!r} is not a number; the file "
                               "is damaged")
        points[col] = numbers
    for col in ("mode", "method", "selection", "threshold_source"):
        points[col] = points[col].astype(str)
    return points


def load_weights(net, path: Path, what: str):
    """``net`` with the state dict of checkpoint ``path`` (``weights_only``), evaluating.

    Raises:
        CascadeError: a missing or unreadable file, or weights that do not fit ``what``.
    """
    state = load_checkpoint(path)
    try:
        net.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:  # torch: size mismatches, missing keys; not a dict
        raise CascadeError(f"{path}: does not fit the {what} of config.yaml ({first_line(exc)})") from None
    return net.eval()




@dataclass(frozen=True)
class PointQuery:
    """Which operating point of a finished run: the target-AD point of one method, mode
    and seed, its threshold from one source; or, with ``appeal_budget``, its point at
    that appeal budget (``selection: appeal_budget``) instead."""

    method: str
    mode: Mode
    target_ad: float
    threshold_source: ThresholdSource
    seed: int
    appeal_budget: float | None = None


def point_query(run: Path, metrics: dict[str, Any], *, method: str | None, mode: str | None, target_ad: float,
                threshold_source: str, seed: int | None, appeal_budget: float | None = None) -> PointQuery:
    """The :class:`PointQuery` of a run's ``metrics.json`` (:func:`read_metrics`), its
    defaults filled in: the first seed, the first mode, the first trained method (else
    the first method).

    Raises:
        CascadeError: a seed, mode or method the run does not have, or a threshold
            source that is not one of :data:`~cascade.evaluation.points.THRESHOLD_SOURCES`.
    """
    seed = metrics["seeds"][0] if seed is None else seed
    _choose(seed, metrics["seeds"], "seed", run)
    mode = _choose(mode or metrics["modes"][0], metrics["modes"], "mode", run)
    kinds = metrics["methods"]
    if method is None:
        method = next((m for m, v in kinds.items() if v["kind"] == MethodKind.TRAINED), next(iter(kinds)))
    _choose(method, list(kinds), "method", run)
    if threshold_source not in THRESHOLD_SOURCES:
        raise CascadeError(f"threshold source {threshold_source!r}: use "
                           + ", ".join(f"{k} ({v})" for k, v in THRESHOLD_SOURCES.items()))
    return PointQuery(method=method, mode=Mode(mode), target_ad=target_ad,
                      threshold_source=ThresholdSource(threshold_source), seed=seed, appeal_budget=appeal_budget)


def _choose(value: Any, known: list, what: str, run: Path) -> Any:
    if value not in known:
        raise CascadeError(f"{run / METRICS}: {what} {value!r} is not in this run; it has "
                           f"{', '.join(map(str, known))}")
    return value


class RunPoints:
    """A run's ``points.csv``, read once (:func:`read_points`), with typed lookups."""

    def __init__(self, run: Path):
        self.path = run / POINTS
        self.frame = read_points(run)

    def point(self, query: PointQuery) -> dict[str, Any]:
        """The row of ``query``'s point, as a dict (NaN cells None).

        Raises:
            CascadeError: no such point (naming the sources, targets or budgets the run has).
        """
        p = self.frame
        q, source = query, query.threshold_source
        by_budget = q.appeal_budget is not None
        key, value, what, plural = (("appeal_budget", q.appeal_budget, "appeal budget", "budgets") if by_budget
                                    else ("target_ad", q.target_ad, "target AD", "targets"))
        if key not in p.columns:  # a run made before appeal budgets
            raise CascadeError(f"{self.path}: no appeal-budget points (the run predates them): run it again")
        p = p[(p["seed"] == q.seed) & (p["mode"] == q.mode) & (p["method"] == q.method)
              & (p["selection"] == (Selection.APPEAL_BUDGET if by_budget else Selection.TARGET_AD))]
        row = p[(p["threshold_source"] == source) & ((p[key] - value).abs() < 1e-12)]
        if row.empty:
            have = sorted(p.loc[p["threshold_source"] == source, key].unique())
            if not have:
                raise CascadeError(f"{self.path}: no {source} {what} points of {q.method} ({q.mode}); the run has "
                                   f"{', '.join(sorted(p['threshold_source'].unique())) or 'none'}")
            raise CascadeError(f"{self.path}: no {source} point of {q.method} ({q.mode}) at {what} "
                               f"{value:g}; the run has {plural} {', '.join(f'{t:g}' for t in have)}")
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.iloc[0].to_dict().items()}

    def white_box_points(self) -> list[tuple[str, float, str]]:
        """One ``(method, target AD, threshold source)`` per method with a white-box
        target-AD point, ``val`` points first.

        Raises:
            CascadeError: the run has none.
        """
        p = self.frame
        p = p[(p["mode"] == Mode.WHITE_BOX) & (p["selection"] == Selection.TARGET_AD)]
        if p.empty:
            raise CascadeError(f"{self.path}: no {Mode.WHITE_BOX} operating point to export the big network from")
        p = p.assign(_val=(p["threshold_source"] != ThresholdSource.VAL)).sort_values("_val", kind="stable")
        p = p.drop_duplicates("method")
        return [(str(m), float(t), str(s)) for m, t, s in zip(p["method"], p["target_ad"], p["threshold_source"])]
