"""Reading a routed system's columns of the per-sample table (``samples.csv``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from cascade.core.enums import Mode


@dataclass(frozen=True)
class Variant:
    """One routed system of one method in one mode: the ``samples.csv`` columns it reads.

    Attributes:
        method: the method's label (``msp``, ``appealnet``...).
        mode: the :class:`Mode` (a plain string is converted).
        variant: names one of several systems a method trained (``a0.01``), else ``""``.
        score_columns: ``[K-1]`` the score column after each routed stage.
        correct_columns: ``[K]`` each stage's correctness column; None for a black-box
            oracle (always right).
        stage_mflops: ``[K]`` each stage's cost (routed ones with their heads).
        fixed_threshold: the method's own threshold (REINFORCE's greedy 0.5), else None.
    """

    method: str
    mode: Mode
    variant: str
    score_columns: tuple[str, ...]
    correct_columns: tuple[str | None, ...]
    stage_mflops: tuple[float, ...]
    fixed_threshold: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", Mode(self.mode))


def by_method(variants: Sequence[Variant]) -> dict[tuple[Mode, str], list[Variant]]:
    """``(mode, method) -> its variants``, in the order first seen."""
    out: dict[tuple[Mode, str], list[Variant]] = {}
    for v in variants:
        out.setdefault((v.mode, v.method), []).append(v)
    return out


def correct_array(frame: pd.DataFrame, v: Variant) -> np.ndarray:
    """``correct [N, K]`` of one variant from the per-sample table (a black-box oracle: all True)."""
    n = len(frame)
    return np.stack([np.ones(n, bool) if c is None else frame[c].to_numpy(bool) for c in v.correct_columns], axis=1)


def variant_arrays(frame: pd.DataFrame, v: Variant) -> tuple[np.ndarray, np.ndarray]:
    """``scores [N, K-1]`` and ``correct [N, K]`` of one variant from the per-sample table."""
    scores = np.stack([frame[c].to_numpy(np.float64) for c in v.score_columns], axis=1)
    return scores, correct_array(frame, v)


def sweep_costs(v: Variant) -> tuple[float, ...]:
    """The costs to sweep with: an unknown oracle cost (None, only ever the last stage) is
    taken as 1, which ranks a two-stage system's points exactly as any positive cost
    would; the points' costs are then reported as unknown."""
    return tuple(1.0 if c is None else c for c in v.stage_mflops)
