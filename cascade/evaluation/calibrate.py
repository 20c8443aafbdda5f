"""``cascade calibrate``: thresholds for models a user already has, from a table of their outputs.

One row per calibration input: the little model's confidence (higher = keep its answer)
and whether each model was right. No training, no task class: any pair of models (LLMs
included) whose per-input log has those columns. The thresholds are chosen exactly as a
run chooses them on its calibration split (:func:`select_by_accuracy` for ``val``,
:func:`select_guaranteed`, Learn then Test, for ``guaranteed``), and
:func:`threshold_violations` simulates how often each misses its target on new data.

Several routed stages: one score and one correctness column per stage, in stage order,
before the last model's; the threshold is shared by every stage, as in runs.
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cascade.core.enums import Mode, ThresholdSource
from cascade.core.errors import CascadeError, described
from cascade.core.files import atomic_write_text
from cascade.evaluation.columns import Variant
from cascade.config.schema import EvaluationConfig
from cascade.evaluation.guarantee import (
    binomial_p_value,
    degradation_scores,
    select_guaranteed,
)
from cascade.evaluation.selection import select_by_accuracy
from cascade.evaluation.sweep import cascade_point, cascade_sweep
from cascade.evaluation.violations import threshold_violations

#: the defaults of a run's ``evaluation:`` section, read from its schema
DEFAULT_DELTA = EvaluationConfig.model_fields["delta"].default
DEFAULT_RESPLITS = EvaluationConfig.model_fields["violation_resplits"].default

_TRUE, _FALSE = {"1", "1.0", "true"}, {"0", "0.0", "false"}
_PARQUET = (".parquet", ".pq")
_SIMULATED = ("violation_rate", "pool_violation_rate", "mean_ad", "resplits")  # threshold_violations' fields


@dataclass(frozen=True)
class CalibrationTable:
    """The columns ``cascade calibrate`` reads, checked.

    Attributes:
        scores: ``[N, K-1]`` each routed stage's confidence (higher = stop there).
        correct: ``[N, K]`` bool, each stage's correctness; the last column all True for a
            black-box oracle (no ``--big-correct``).
        test: ``[N]`` bool, the rows of a ``split`` column's ``test`` (all False without one).
        mode: white-box (the last model's correctness given) or black-box.
    """

    scores: np.ndarray
    correct: np.ndarray
    test: np.ndarray
    mode: Mode


def read_table(path: str | Path) -> pd.DataFrame:
    """A CSV or (``.parquet``, ``.pq``) Parquet file as a frame.

    Raises:
        CascadeError: a missing or unreadable file, or Parquet without pyarrow.
    """
    path = Path(path)
    try:
        if path.suffix.lower() in _PARQUET:
            return pd.read_parquet(path)
        return pd.read_csv(path)
    except ImportError:
        raise CascadeError(f"{path}: reading Parquet needs pyarrow: pip install pyarrow (or give a CSV)") from None
    except FileNotFoundError:
        raise CascadeError(f"{path}: no such file") from None
    except (OSError, ValueError, UnicodeDecodeError, pd.errors.ParserError) as exc:  # EmptyDataError is a ValueError
        raise CascadeError(f"{path}: cannot read it as {'Parquet' if path.suffix.lower() in _PARQUET else 'CSV'}: "
                           f"{described(exc)}") from None


def _column(frame: pd.DataFrame, name: str, flag: str, path: Path) -> pd.Series:
    if name not in frame.columns:
        near = difflib.get_close_matches(name, [str(c) for c in frame.columns], n=1, cutoff=0.5)
        hint = f" (did you mean {near[0]!r}?)" if near else f"; its columns: {', '.join(map(str, frame.columns))}"
        raise CascadeError(f"{path}: {flag} {name!r}: no such column{hint}")
    return frame[name]


def _shown(value: object) -> str:
    """A cell as a user wrote it: strings quoted, numbers plain (not ``np.int64(2)``)."""
    return repr(value) if isinstance(value, str) else str(value)


def _scores(col: pd.Series, flag: str, path: Path) -> np.ndarray:
    """``[N]`` float64; every value a finite number, else the first bad row (counted from 1 after the header)."""
    values = pd.to_numeric(col, errors="coerce").to_numpy(np.float64)
    bad = np.flatnonzero(~np.isfinite(values))
    if len(bad):
        i = int(bad[0])
        what = "empty (NaN)" if pd.isna(col.iloc[i]) else f"{_shown(col.iloc[i])}, not a finite number"
        raise CascadeError(f"{path}: {flag} {col.name!r}: row {i + 1} is {what}")
    return values


def _correct(col: pd.Series, flag: str, path: Path) -> np.ndarray:
    """``[N]`` bool from 0/1 or true/false values, else the first bad row."""
    text = col.astype(str).str.strip().str.lower()
    yes, no = text.isin(_TRUE).to_numpy(), text.isin(_FALSE).to_numpy()
    bad = np.flatnonzero(~(yes | no) | col.isna().to_numpy())
    if len(bad):
        i = int(bad[0])
        what = "empty (NaN)" if pd.isna(col.iloc[i]) else _shown(col.iloc[i])
        raise CascadeError(f"{path}: {flag} {col.name!r}: row {i + 1} is {what}, not 0/1 or true/false")
    return yes


def _test_rows(frame: pd.DataFrame, path: Path) -> np.ndarray:
    """``[N]`` bool: the ``test`` rows of a ``split`` column (cal|test), none without one."""
    if "split" not in frame.columns:
        return np.zeros(len(frame), bool)
    split = frame["split"].astype(str).str.strip()
    bad = np.flatnonzero(~split.isin(["cal", "test"]).to_numpy())
    if len(bad):
        i = int(bad[0])
        raise CascadeError(f"{path}: column 'split': row {i + 1} is {_shown(frame['split'].iloc[i])}, not cal or test")
    test = (split == "test").to_numpy()
    if test.all():
        raise CascadeError(f"{path}: column 'split' has no cal rows to calibrate on")
    return test


def load_calibration(path: str | Path, score: Sequence[str], little_correct: Sequence[str],
                     big_correct: str | None = None) -> CalibrationTable:
    """Read and check the columns of a calibration file.

    Args:
        path: CSV or Parquet, one row per input.
        score: each routed stage's confidence column, in stage order.
        little_correct: each routed stage's correctness column (0/1 or true/false).
        big_correct: the last model's correctness column; None: a black-box oracle, always right.

    Raises:
        CascadeError: an unreadable file, a missing column, a bad value (the row named),
            mismatched counts of score and correctness columns, or no rows.
    """
    path = Path(path)
    if len(score) != len(little_correct) or not score:
        raise CascadeError(f"give one --little-correct per --score, in stage order (got {len(score)} --score, "
                           f"{len(little_correct)} --little-correct)")
    frame = read_table(path)
    if frame.empty:
        raise CascadeError(f"{path}: no rows")
    scores = np.stack([_scores(_column(frame, c, "--score", path), "--score", path) for c in score], axis=1)
    columns = [(c, "--little-correct") for c in little_correct]
    columns += [(big_correct, "--big-correct")] if big_correct else []
    correct = [_correct(_column(frame, c, flag, path), flag, path) for c, flag in columns]
    if big_correct is None:
        correct.append(np.ones(len(frame), bool))
    mode = Mode.WHITE_BOX if big_correct else Mode.BLACK_BOX
    return CalibrationTable(scores, np.stack(correct, axis=1), _test_rows(frame, path), mode)


def rows_needed(target: float, delta: float) -> int | None:
    """The fewest calibration rows with which Learn then Test can certify anything at
    ``target`` (zero losses: ``(1 - target)^n <= delta``); None at ``target = 0``, which no
    count certifies."""
    if target <= 0:
        return None
    n = max(1, math.ceil(math.log(delta) / math.log1p(-target)))
    while binomial_p_value(0, n, target) > delta:  # float rounding in the logarithms
        n += 1
    return n


def _check(n_cal: int, targets: Sequence[float], delta: float) -> None:
    if not 0 < delta < 1:
        raise CascadeError(f"--delta {delta:g}: must lie strictly between 0 and 1")
    for t in targets:
        if not 0 <= t < 1:
            raise CascadeError(f"--target-ad {t:g}: must lie in [0, 1) (a fraction: 0.01 is 1 %)")
        need = rows_needed(t, delta)
        if need is not None and n_cal < need:
            raise CascadeError(f"--target-ad {t:g}: certifying it at delta {delta:g} needs at least {need} calibration "
                               f"rows, the file has {n_cal}: add rows, or raise the target or --delta")


def _simulation(table: CalibrationTable, targets: Sequence[float], delta: float, resplits: int,
                seed: int) -> dict[tuple[float, str], dict]:
    """:func:`threshold_violations` on the rows: its cal/test parts as given by the
    ``split`` column, else the rows cut in two halves (calibrating on half of them)."""
    k = table.correct.shape[1]
    test = table.test if table.test.any() else np.arange(len(table.test)) >= (len(table.test) + 1) // 2
    if not test.any():
        return {}  # a single row: nothing to re-split
    frame = pd.DataFrame({"seed": 0, "split": np.where(test, "test", "cal")})
    for j in range(k - 1):
        frame[f"score_{j}"] = table.scores[:, j]
    for j in range(k):
        frame[f"correct_{j}"] = table.correct[:, j]
    last = f"correct_{k - 1}" if table.mode == Mode.WHITE_BOX else None
    variant = Variant("calibrate", table.mode, "", tuple(f"score_{j}" for j in range(k - 1)),
                      (*(f"correct_{j}" for j in range(k - 1)), last), (1.0,) * k)
    rows = threshold_violations(frame, [variant], {table.mode: list(targets)}, delta, resplits, seed)
    return {(r["target_ad"], r["threshold_source"]): r for r in rows}


def _measure(threshold: float, scores: np.ndarray, correct: np.ndarray) -> tuple[float, float]:
    """``(AD, skipping rate)`` of ``threshold`` on some rows (AD against the last model alone)."""
    p = cascade_point(threshold, scores, correct, (1.0,) * correct.shape[1])
    return float(correct[:, -1].mean()) - p.system_accuracy, 1.0 - p.exit_fractions[-1]


def calibrate(table: CalibrationTable, targets: Sequence[float], delta: float = DEFAULT_DELTA,
              resplits: int = DEFAULT_RESPLITS, seed: int = 0) -> list[dict]:
    """The ``val`` and ``guaranteed`` thresholds at each target, as a run picks them.

    Every stage is costed 1 (the file has no costs): the cheapest point is then the one
    that stops the most inputs early, which any positive costs would pick too.

    Args:
        table: the checked columns; thresholds are chosen on its non-test rows.
        targets: AD targets (fractions), against the last model alone.
        delta: the guaranteed thresholds' allowed probability of missing.
        resplits: random re-splits for the violation simulation (0: none).
        seed: seeds those re-splits.

    Returns:
        One dict per (target, source): ``target_ad``, ``source``, ``threshold`` (None when
        nothing is certified: every input goes to the last model), ``skipping_rate`` and
        ``ad`` on the calibration rows, ``n_cal``, ``delta``; ``violation_rate``,
        ``pool_violation_rate``, ``mean_ad``, ``resplits`` with a simulation; ``test_ad``,
        ``test_skipping_rate`` and ``n_test`` with test rows.

    Raises:
        CascadeError: a target or delta out of range, or too few rows for a target.
    """
    cal = ~table.test
    scores, correct = table.scores[cal], table.correct[cal]
    _check(len(scores), targets, delta)
    sweep = cascade_sweep(scores, correct, (1.0,) * correct.shape[1])
    ref = float(correct[:, -1].mean())
    degradations = degradation_scores(scores, correct)
    sim = _simulation(table, targets, delta, resplits, seed) if resplits else {}
    points = []
    for t in targets:
        picks = {ThresholdSource.VAL: select_by_accuracy([sweep], sweep.n * (ref - t)),
                 ThresholdSource.GUARANTEED: select_guaranteed([sweep], [degradations], t, delta)}
        for source, pick in picks.items():
            ad, skipping = _measure(pick.threshold, scores, correct)
            row = {"target_ad": t, "source": str(source),
                   "threshold": pick.threshold if math.isfinite(pick.threshold) else None,
                   "skipping_rate": skipping, "ad": ad, "n_cal": len(scores), "delta": delta}
            if (t, source) in sim:
                row |= {k: sim[(t, source)][k] for k in _SIMULATED}
            if table.test.any():
                test_ad, test_skipping = _measure(pick.threshold, table.scores[table.test], table.correct[table.test])
                row |= {"test_ad": test_ad, "test_skipping_rate": test_skipping, "n_test": int(table.test.sum())}
            points.append(row)
    return points


def _fmt(value: float | None, digits: int = 4) -> str:
    return "none" if value is None else f"{value:.{digits}g}"


def render_points(points: list[dict], path: str | Path, mode: Mode) -> str:
    """The points as an aligned text table, with a header saying what was measured where."""
    first = points[0]
    oracle = "the big model's correctness" if mode == Mode.WHITE_BOX else "a black-box oracle (always right)"
    lines = [f"{path}: {first['n_cal']} calibration rows; AD against {oracle}; delta {first['delta']:g}"]
    header = ["target AD", "source", "threshold", "skipping", "AD (cal)"]
    if "violation_rate" in first:
        header += ["miss (test part)", "miss (pool)"]
    if "n_test" in first:
        header += ["AD (test)", "skipping (test)"]
    rows = []
    for p in points:
        row = [f"{p['target_ad']:g}", p["source"], _fmt(p["threshold"], 6), _fmt(p["skipping_rate"]), _fmt(p["ad"])]
        if "violation_rate" in p:
            row += [_fmt(p["violation_rate"], 3), _fmt(p["pool_violation_rate"], 3)]
        if "n_test" in p:
            row += [_fmt(p["test_ad"]), _fmt(p["test_skipping_rate"])]
        rows.append(row)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    if "violation_rate" in first:
        where = (f"the {first['n_cal']} cal + {first['n_test']} test rows" if "n_test" in first
                 else "halves of the rows (calibrating on half of them)")
        lines.append(f"miss: share of {first['resplits']} random re-splits of {where} where the threshold chosen on "
                     "the cal part exceeds the target on the test part / on all rows")
    if "n_test" in first:
        lines.append(f"test: the thresholds applied to the file's {first['n_test']} test rows")
    return "\n".join(lines)


def calibrate_command(args) -> int:
    """``cascade calibrate``: print the points, and write them to ``--json`` when given."""
    table = load_calibration(args.file, args.score, args.little_correct, args.big_correct)
    delta = DEFAULT_DELTA if args.delta is None else args.delta
    points = calibrate(table, args.target_ad, delta)
    print(render_points(points, args.file, table.mode))
    if args.json:
        atomic_write_text(args.json, json.dumps({"file": str(args.file), "mode": str(table.mode),
                                                 "stages": table.correct.shape[1], "points": points}, indent=2) + "\n")
        print(f"points written to {args.json}")
    return 0
