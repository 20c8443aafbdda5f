"""Readers of a run folder's files for deployment, each failure one line naming the file.

``metrics.json``, ``config.yaml``, ``points.csv`` and the checkpoints are read by
:func:`cascade.deploy.router.load_run_point`; a truncated, byte-flipped or hand-broken file is a
:class:`~cascade.core.errors.CascadeError` naming it (and its key or line), never a traceback.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from cascade.core.errors import CascadeError, ConfigError, first_line
from cascade.core.files import load_checkpoint

#: the run files a deployment reads (checkpoints aside)
RUN_FILES = ("config.yaml", "metrics.json", "points.csv")
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
    modes: list[str]
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
    path = run / "metrics.json"
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
    from cascade.config import validate

    path = run / "config.yaml"
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
    import pandas as pd

    path = run / "points.csv"
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


