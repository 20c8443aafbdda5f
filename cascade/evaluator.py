"""Evaluation: run each network once over a split, keep per-sample arrays, then compute
every operating point from those arrays (collect, then compute).

The per-sample table (``samples.csv``) is the single source of truth: operating points
are computed from it alone, so anyone can recompute them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from cascade.roles import StageOutput
from cascade.thresholds import apply_threshold, select_threshold, sweep


@torch.no_grad()
def collect_outputs(model: nn.Module, dataset: Dataset, batch_size: int, device: torch.device) -> tuple[StageOutput, torch.Tensor]:
    """Run ``model`` over ``dataset`` in eval mode; outputs and targets, on the CPU."""
    model.eval()
    outputs, qs, targets = [], [], []
    for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        out = model(x.to(device))
        if not isinstance(out, StageOutput):
            out = StageOutput(output=out)
        outputs.append(out.output.float().cpu())
        if out.q is not None:
            qs.append(out.q.float().cpu())
        targets.append(y)
    q = torch.cat(qs) if qs else None
    return StageOutput(output=torch.cat(outputs), q=q), torch.cat(targets)


@dataclass(frozen=True)
class Route:
    """Which ``samples.csv`` columns one (mode, method) pair routes with.

    Attributes:
        score: column of the score (higher = keep on the little network).
        little_correct: column saying whether the little side's answer is right.
        big_correct: column saying whether the big side is right (None: black-box, always).
        little_mflops: cost of the little side (with its predictor head, if any).
        big_mflops: cost of the big side (None when unknown).
    """

    score: str
    little_correct: str
    big_correct: str | None
    little_mflops: float
    big_mflops: float | None


def _big_correct(frame: pd.DataFrame, route: Route) -> np.ndarray:
    if route.big_correct is None:
        return np.ones(len(frame), dtype=bool)
    return frame[route.big_correct].to_numpy(dtype=bool)


def operating_points(
    samples: pd.DataFrame, routes: dict[tuple[str, str], Route], targets: dict[str, list[float]]
) -> pd.DataFrame:
    """Every operating point, per seed, from the per-sample table.

    For each seed, (mode, method) and target AD, the threshold is read off the test split
    (``threshold_source = test``, as the paper does) and off the calibration split
    (``val``); both are then applied to the test split.

    Args:
        samples: rows with ``seed``, ``split`` (``cal``/``test``) and the routes' columns.
        routes: ``(mode, method) -> Route``.
        targets: ``mode -> target ADs``.

    Returns:
        One row per (seed, mode, method, threshold_source, target_ad).
    """
    rows = []
    for seed, frame in samples.groupby("seed", sort=True):
        split = {name: part for name, part in frame.groupby("split")}
        test, cal = split["test"], split["cal"]
        for (mode, method), route in routes.items():
            test_score = test[route.score].to_numpy(dtype=np.float64)
            test_little = test[route.little_correct].to_numpy(dtype=bool)
            test_big = _big_correct(test, route)
            sweeps = {
                "test": sweep(test_score, test_little, test_big),
                "val": sweep(
                    cal[route.score].to_numpy(dtype=np.float64),
                    cal[route.little_correct].to_numpy(dtype=bool),
                    _big_correct(cal, route),
                ),
            }
            for target in targets[mode]:
                for source, sw in sweeps.items():
                    threshold = select_threshold(sw, target)
                    op = apply_threshold(
                        threshold, test_score, test_little, test_big, route.little_mflops, route.big_mflops
                    )
                    rows.append(
                        {"seed": seed, "mode": mode, "method": method, "threshold_source": source,
                         "target_ad": target, **op.as_dict()}
                    )
    return pd.DataFrame(rows)


_KEYS = ["mode", "method", "threshold_source", "target_ad"]
_VALUES = ["threshold", "skipping_rate", "appeal_rate", "system_accuracy", "ad", "cost_mflops"]


def aggregate(points: pd.DataFrame) -> list[dict]:
    """Mean over seeds of each operating point, plus ``*_std`` fields when several seeds.

    The standard deviation is the sample one (ddof=1).
    """
    n_seeds = points["seed"].nunique()
    out = []
    for key, group in points.groupby(_KEYS, sort=False):
        row = dict(zip(_KEYS, key))
        for v in _VALUES:
            col = group[v]
            if col.isna().all():
                row[v] = None
                continue
            row[v] = float(col.mean())
            if n_seeds > 1:
                row[f"{v}_std"] = float(col.std(ddof=1))
        out.append(row)
    return out
