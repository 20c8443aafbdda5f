"""``cascade calibrate``: thresholds from a table of a user's own models' outputs.

Known answers worked by hand on a 10-row file, every bad input's one line and exit 2, the
JSON file, a split column, agreement with a run's own selection (operating_points), and
the guarantee itself on draws from a known population.
"""

import json

import numpy as np
import pandas as pd
import pytest

from cascade.cli import main
from cascade.core.enums import Mode
from cascade.evaluation import Variant, operating_points
from cascade.evaluation.calibrate import (
    DEFAULT_DELTA,
    DEFAULT_RESPLITS,
    CalibrationTable,
    calibrate,
    rows_needed,
)

# 10 rows, sorted by score. The big model is right on 8 (AD reference 0.8).
# Keeping the little model's answer on the rows with score >= t, the system gets right:
#   t above 0.95: 8 | 0.95, 0.9, 0.8: 8 | 0.7: 7 (row 4: little wrong, big right) | 0.6: 7
#   0.5: 8 (row 6: little right, big wrong) | 0.4: 7 | 0.3: 7 | 0.2: 6 | 0.1: 6
# so the val threshold (the lowest with AD <= target): AD 0 -> 0.5 (skipping 6/10),
# AD 0.1 -> 0.3 (8/10), AD 0.3 -> 0.1 (10/10).
# Degradations (little wrong, big right): rows with scores 0.7, 0.4, 0.2.
TINY = pd.DataFrame({
    "conf": [0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1],
    "small_ok": [1, 1, 1, 0, 1, 1, 0, 1, 0, 0],
    "big_ok": [1, 1, 1, 1, 1, 0, 1, 1, 1, 0],
})


def _write(tmp_path, frame, name="log.csv"):
    path = tmp_path / name
    frame.to_csv(path, index=False)
    return str(path)


def _run(capsys, *args):
    code = main(["calibrate", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def _points(tmp_path, capsys, frame, *args):
    out_json = tmp_path / "points.json"
    code, out, err = _run(capsys, _write(tmp_path, frame), *args, "--json", out_json)
    assert code == 0, err
    return json.loads(out_json.read_text())["points"], out


def _by(points):
    return {(p["target_ad"], p["source"]): p for p in points}


def test_defaults_are_the_runs():
    from cascade.config import EvaluationConfig

    assert DEFAULT_DELTA == EvaluationConfig().delta
    assert DEFAULT_RESPLITS == EvaluationConfig().violation_resplits


def test_val_thresholds_known_answers(tmp_path, capsys):
    points, out = _points(tmp_path, capsys, TINY, "--score", "conf", "--little-correct", "small_ok",
                          "--big-correct", "big_ok", "--target-ad", "0", "0.3")
    p = _by(points)
    assert p[(0.0, "val")]["threshold"] == 0.5 and p[(0.0, "val")]["skipping_rate"] == pytest.approx(0.6)
    assert p[(0.0, "val")]["ad"] == pytest.approx(0.0)
    assert p[(0.3, "val")]["threshold"] == 0.1 and p[(0.3, "val")]["skipping_rate"] == pytest.approx(1.0)
    assert p[(0.3, "val")]["ad"] == pytest.approx(0.2)
    # nothing certifies AD 0: every input to the big model
    assert p[(0.0, "guaranteed")]["threshold"] is None and p[(0.0, "guaranteed")]["skipping_rate"] == 0.0
    # AD 0.3, delta 0.1: P(Binom(10, 0.3) <= 0) = 0.028 <= 0.1 < P(<= 1) = 0.149: no degradation
    # allowed, so down to 0.8 (the first degradation is at 0.7)
    assert p[(0.3, "guaranteed")]["threshold"] == 0.8
    assert p[(0.3, "guaranteed")]["skipping_rate"] == pytest.approx(0.3)
    assert all(q["delta"] == 0.1 and q["n_cal"] == 10 for q in points)
    for q in points:  # the violation simulation ran on halves of the rows
        assert q["resplits"] == 200 and 0 <= q["violation_rate"] <= 1 and 0 <= q["pool_violation_rate"] <= 1
    assert "target AD" in out and "miss (test part)" in out and "halves of the rows" in out


def test_guaranteed_known_answers_with_delta(tmp_path, capsys):
    points, _ = _points(tmp_path, capsys, TINY, "--score", "conf", "--little-correct", "small_ok",
                        "--big-correct", "big_ok", "--target-ad", "0.1", "0.3", "--delta", "0.5")
    p = _by(points)
    assert p[(0.1, "val")]["threshold"] == 0.3 and p[(0.1, "val")]["skipping_rate"] == pytest.approx(0.8)
    # AD 0.1, delta 0.5: P(Binom(10, 0.1) <= 0) = 0.349 <= 0.5 < P(<= 1) = 0.736: none allowed
    assert p[(0.1, "guaranteed")]["threshold"] == 0.8
    # AD 0.3: P(<= 2) = 0.383 <= 0.5 < P(<= 3) = 0.650: two allowed, the third is at 0.2
    assert p[(0.3, "guaranteed")]["threshold"] == 0.3
    assert p[(0.3, "guaranteed")]["skipping_rate"] == pytest.approx(0.8)
    assert all(q["delta"] == 0.5 for q in points)


def test_black_box_oracle_without_big_correct(tmp_path, capsys):
    # the oracle is always right: keeping rows down to 0.2 loses rows 0.7, 0.4, 0.2 (AD 0.3)
    points, out = _points(tmp_path, capsys, TINY, "--score", "conf", "--little-correct", "small_ok",
                          "--target-ad", "0.3")
    val = _by(points)[(0.3, "val")]
    assert val["threshold"] == 0.2 and val["skipping_rate"] == pytest.approx(0.9) and val["ad"] == pytest.approx(0.3)
    assert "black-box oracle" in out


def test_true_false_columns(tmp_path, capsys):
    frame = TINY.assign(small_ok=TINY["small_ok"].map({1: "true", 0: "False"}), big_ok=TINY["big_ok"].astype(bool))
    points, _ = _points(tmp_path, capsys, frame, "--score", "conf", "--little-correct", "small_ok",
                        "--big-correct", "big_ok", "--target-ad", "0")
    assert _by(points)[(0.0, "val")]["threshold"] == 0.5


def test_split_column_reports_test_rows(tmp_path, capsys):
    test = pd.DataFrame({"conf": [0.9, 0.6, 0.35, 0.05], "small_ok": [0, 1, 1, 0], "big_ok": [1, 1, 0, 1]})
    frame = pd.concat([TINY.assign(split="cal"), test.assign(split="test")], ignore_index=True)
    points, out = _points(tmp_path, capsys, frame, "--score", "conf", "--little-correct", "small_ok",
                          "--big-correct", "big_ok", "--target-ad", "0.1", "--delta", "0.5")
    p = _by(points)
    val, guaranteed = p[(0.1, "val")], p[(0.1, "guaranteed")]
    assert (val["threshold"], guaranteed["threshold"]) == (0.3, 0.8)  # calibrated on the cal rows only
    assert val["n_cal"] == 10 and val["n_test"] == 4
    # on the test rows (big right on 3 of 4): threshold 0.3 keeps 0.9 (wrong), 0.6, 0.35 (right):
    # 3 right, AD 0; 0.8 keeps only 0.9: 0 + 1 + 0 + 1 = 2 right, AD 0.25
    assert val["test_ad"] == pytest.approx(0.0) and val["test_skipping_rate"] == pytest.approx(0.75)
    assert guaranteed["test_ad"] == pytest.approx(0.25) and guaranteed["test_skipping_rate"] == pytest.approx(0.25)
    assert "AD (test)" in out and "10 cal + 4 test rows" in out


def test_json_contents(tmp_path, capsys):
    out_json = tmp_path / "sub" / "points.json"
    out_json.parent.mkdir()
    code, out, _ = _run(capsys, _write(tmp_path, TINY), "--score", "conf", "--little-correct", "small_ok",
                        "--big-correct", "big_ok", "--target-ad", "0", "0.3", "--json", out_json)
    assert code == 0 and f"points written to {out_json}" in out
    doc = json.loads(out_json.read_text())
    assert doc["mode"] == "white_box" and doc["stages"] == 2
    assert [(p["target_ad"], p["source"]) for p in doc["points"]] == [
        (0.0, "val"), (0.0, "guaranteed"), (0.3, "val"), (0.3, "guaranteed")]
    for p in doc["points"]:
        assert {"target_ad", "source", "threshold", "skipping_rate", "ad", "delta", "violation_rate",
                "pool_violation_rate"} <= set(p)
    assert doc["points"][1]["threshold"] is None  # not certified: null, not Infinity
    assert list(out_json.parent.iterdir()) == [out_json]  # no temporary file left beside it


def test_three_stages(tmp_path, capsys):
    # stage 0 keeps rows with s0 >= t, stage 1 the rest with s1 >= t; the last model is right everywhere
    frame = pd.DataFrame({"s0": [0.9, 0.2, 0.2, 0.2], "c0": [1, 0, 0, 0], "s1": [0.1, 0.8, 0.7, 0.1],
                          "c1": [0, 1, 0, 0], "big": [1, 1, 1, 1]})
    points, _ = _points(tmp_path, capsys, frame, "--score", "s0", "--little-correct", "c0", "--score", "s1",
                        "--little-correct", "c1", "--big-correct", "big", "--target-ad", "0", "0.25",
                        "--delta", "0.9")
    p = _by(points)
    # t = 0.8: row 0 at stage 0, row 1 at stage 1 (both right), AD 0; t = 0.7 adds row 2 (wrong): AD 0.25
    assert p[(0.0, "val")]["threshold"] == 0.8 and p[(0.0, "val")]["skipping_rate"] == pytest.approx(0.5)
    assert p[(0.25, "val")]["threshold"] == 0.7 and p[(0.25, "val")]["skipping_rate"] == pytest.approx(0.75)


BAD = [
    (["--score", "confidence"], "no such column (did you mean 'conf'?)"),
    (["--big-correct", "zzz"], "--big-correct 'zzz': no such column; its columns: conf, small_ok, big_ok"),
    (["--little-correct", "smal_ok"], "'smal_ok': no such column (did you mean 'small_ok'?)"),
    (["--target-ad", "0.2"], ("--target-ad 0.2: certifying it at delta 0.1 needs at least 11 calibration rows, "
                              "the file has 10")),
    (["--target-ad", "1.5"], "--target-ad 1.5: must lie in [0, 1)"),
    (["--delta", "0"], "--delta 0: must lie strictly between 0 and 1"),
]


@pytest.mark.parametrize("change, message", BAD)
def test_bad_arguments_one_line_exit_2(tmp_path, capsys, change, message):
    args = {"--score": "conf", "--little-correct": "small_ok", "--big-correct": "big_ok", "--target-ad": "0"}
    args |= dict(zip(change[::2], change[1::2]))
    code, _, err = _run(capsys, _write(tmp_path, TINY), *[x for kv in args.items() for x in kv])
    assert code == 2 and message in err and err.count("\n") == 1, err


BAD_VALUES = [
    ("conf", "abc", "--score 'conf': row 3 is 'abc', not a finite number"),
    ("conf", None, "--score 'conf': row 3 is empty (NaN)"),
    ("conf", "inf", "--score 'conf': row 3 is inf, not a finite number"),
    ("small_ok", 2, "--little-correct 'small_ok': row 3 is 2, not 0/1 or true/false"),
    ("big_ok", "yes", "--big-correct 'big_ok': row 3 is 'yes', not 0/1 or true/false"),
    ("big_ok", None, "--big-correct 'big_ok': row 3 is empty (NaN), not 0/1 or true/false"),
    ("split", "train", "column 'split': row 3 is 'train', not cal or test"),
]


@pytest.mark.parametrize("column, value, message", BAD_VALUES)
def test_bad_values_name_the_row(tmp_path, capsys, column, value, message):
    frame = TINY.assign(split="cal").astype(object)
    frame.loc[2, column] = value
    code, _, err = _run(capsys, _write(tmp_path, frame), "--score", "conf", "--little-correct", "small_ok",
                        "--big-correct", "big_ok", "--target-ad", "0")
    assert code == 2 and message in err and err.count("\n") == 1, err


def test_unreadable_files(tmp_path, capsys):
    args = ["--score", "conf", "--little-correct", "small_ok", "--target-ad", "0"]
    cases = {"missing.csv": (None, "no such file"), "empty.csv": (b"", "cannot read it as CSV"),
             "binary.csv": (bytes(range(256)) * 4, "cannot read it as CSV"),
             "header_only.csv": (b"conf,small_ok\n", "no rows"),
             "cal_free.csv": (b"conf,small_ok,split\n0.5,1,test\n", "no cal rows")}
    for name, (content, message) in cases.items():
        if content is not None:
            (tmp_path / name).write_bytes(content)
        code, _, err = _run(capsys, tmp_path / name, *args)
        assert code == 2 and message in err and err.count("\n") == 1, (name, err)


def test_parquet(tmp_path, capsys):
    path = tmp_path / "log.parquet"
    try:
        import pyarrow  # noqa: F401
    except ImportError:  # the one-line error names the package to install
        path.write_bytes(b"PAR1")
        code, _, err = _run(capsys, path, "--score", "conf", "--little-correct", "small_ok", "--target-ad", "0")
        assert code == 2 and "needs pyarrow: pip install pyarrow" in err and err.count("\n") == 1, err
        return
    TINY.to_parquet(path)
    code, out, err = _run(capsys, path, "--score", "conf", "--little-correct", "small_ok", "--big-correct", "big_ok",
                          "--target-ad", "0")
    assert code == 0 and "0.5" in out, err


def test_rows_needed():
    # (1 - t)^n <= delta: 0.8^11 = 0.086 <= 0.1 < 0.8^10 = 0.107
    assert rows_needed(0.2, 0.1) == 11 and rows_needed(0.3, 0.1) == 7 and rows_needed(0.0, 0.1) is None


@pytest.mark.parametrize("stages", [2, 3])
def test_agrees_with_a_runs_selection(stages):
    """The same thresholds as operating_points on the same cal rows (a run's own val and
    guaranteed points), whatever the stage costs (positive)."""
    rng = np.random.default_rng(stages)
    n = 400
    scores = rng.random((n, stages - 1))
    correct = np.column_stack([rng.random(n) < 0.3 + 0.6 * scores[:, j] for j in range(stages - 1)]
                              + [rng.random(n) < 0.9])
    split = np.where(np.arange(n) < 300, "cal", "test")
    samples = pd.DataFrame({"seed": 0, "split": split} | {f"s{j}": scores[:, j] for j in range(stages - 1)}
                           | {f"c{j}": correct[:, j] for j in range(stages)})
    variant = Variant("m", "white_box", "", tuple(f"s{j}" for j in range(stages - 1)),
                      tuple(f"c{j}" for j in range(stages)), tuple(np.linspace(0.1, 2.0, stages)))
    targets = [0.0, 0.02, 0.05, 0.1]
    run = {(p["target_ad"], p["threshold_source"]): p["threshold"]
           for p in operating_points(samples, [variant], {"white_box": targets}, delta=0.1)
           if p["selection"] == "target_ad" and p["threshold_source"] != "test"}
    table = CalibrationTable(scores, correct, split == "test", Mode.WHITE_BOX)
    mine = {(p["target_ad"], p["source"]): p["threshold"] for p in calibrate(table, targets, 0.1, resplits=0)}
    assert mine == {k: (None if v == np.inf else v) for k, v in run.items()}


def test_guarantee_holds_on_a_known_population():
    """Draws of n calibration rows from a known population: the guaranteed threshold's
    AD on the whole population exceeds the target in at most delta of the draws (val's,
    chosen to just meet the target on the draw, about half the time).

    The big model is right wherever the little one is (no rescues), so the AD *is* the
    degradation rate Learn then Test controls and the bound is nearly tight: 14 of 200
    draws miss here (14 to 19 with seeds 1 to 3), against a bound of 20."""
    rng = np.random.default_rng(0)
    pop = 50_000
    score = rng.random(pop)
    little = rng.random(pop) < 0.5 + 0.5 * score  # more confident, more often right
    big = little | (rng.random(pop) < 0.8)
    correct = np.column_stack([little, big])
    target, delta, n, draws = 0.05, 0.1, 500, 200
    misses = {"val": 0, "guaranteed": 0}
    for _ in range(draws):
        rows = rng.integers(0, pop, n)
        table = CalibrationTable(score[rows, None], correct[rows], np.zeros(n, bool), Mode.WHITE_BOX)
        for p in calibrate(table, [target], delta, resplits=0):
            t = np.inf if p["threshold"] is None else p["threshold"]
            kept = score >= t
            true_ad = big.mean() - np.where(kept, little, big).mean()
            misses[p["source"]] += true_ad > target + 1e-12
    print("misses out of", draws, misses)
    assert misses["guaranteed"] <= delta * draws
    assert misses["val"] > 3 * max(misses["guaranteed"], 1)  # the test can tell a guarantee from none
