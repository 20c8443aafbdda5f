"""Export only what a finished run measured, and ``cascade route`` done right (issue 16,
build items 3 and 4): the completion record, the operating point recomputed from
``samples.csv``, one-line errors for damaged run files, CSV headers, atomic output,
the image pixel limit and errors naming the absolute input index."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cascade import Bundle
from cascade.cli import main
from cascade.deploy.export import export_bundle
from cascade.runs.record import RECORD, check_finished, write_record
from tests.conftest import REPO
from tests.test_new_user import one_line_error

#: a second `cascade run` into a finished folder, killed with SIGKILL as it starts
#: evaluating the test split (after its new weights are saved, before its points are)
KILLED_DURING_EVALUATE_TEST = """
import os, signal, sys
from cascade.cli import main
from cascade.engine.experiment import Experiment

samples = Experiment._samples

def killed(self, seed, split, *args, **kwargs):
    if split == "test":
        os.kill(os.getpid(), signal.SIGKILL)
    return samples(self, seed, split, *args, **kwargs)

Experiment._samples = killed
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture
def run(quick_digits_run, tmp_path) -> Path:
    """A copy of a finished quick digits run, ours to damage."""
    return Path(shutil.copytree(quick_digits_run, tmp_path / "run"))


@pytest.fixture(scope="module")
def bundle(quick_digits_run, tmp_path_factory) -> Path:
    return export_bundle(quick_digits_run, tmp_path_factory.mktemp("bundle") / "b", method="msp", onnx=False)


def _export(capsys, run: Path, out: Path, *args: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["export", str(run), "--out", str(out), "--method", "msp", "--no-onnx", *args])
    return code, capsys.readouterr().err


def _refused(capsys, run: Path, tmp_path: Path, *args: str) -> str:
    code, err = _export(capsys, run, tmp_path / "bundle", *args)
    assert not (tmp_path / "bundle").exists()
    return one_line_error(code, err)


def _point_row(run: Path, method="msp", mode="white_box", source="val", target=0.005) -> int:
    p = pd.read_csv(run / "points.csv")
    rows = p.index[(p["method"] == method) & (p["mode"] == mode) & (p["selection"] == "target_ad")
                   & (p["threshold_source"] == source) & ((p["target_ad"] - target).abs() < 1e-12) & (p["seed"] == 0)]
    (row,) = rows
    return int(row)


# ============================================================================ the completion record


def test_a_finished_run_records_the_sha256_of_what_export_reads(quick_digits_run):
    record = json.loads((quick_digits_run / RECORD).read_text())
    files = record["files"]
    for name in ("config.yaml", "metrics.json", "points.csv", "samples.csv", "checkpoints/seed0_stage0.pt",
                 "checkpoints/seed0_big.pt"):
        assert files[name] == hashlib.sha256((quick_digits_run / name).read_bytes()).hexdigest()
    assert not any(name.startswith("checkpoints/resume") for name in files)
    assert record["config"].endswith("digits.yaml")
    # the last write of the run: nothing in the folder is newer
    newest = max(p.stat().st_mtime_ns for p in quick_digits_run.rglob("*") if p.is_file())
    assert (quick_digits_run / RECORD).stat().st_mtime_ns == newest
    assert check_finished(quick_digits_run).files == files


@pytest.mark.slow
def test_a_second_run_killed_during_evaluate_test_is_not_exported(run, tmp_path, capsys):
    """The issue's case, with a real SIGKILL: the old points.csv would pair with new weights."""
    before = {p.name: p.read_bytes() for p in (run / "checkpoints").glob("*.pt")}
    old_record = (run / RECORD).read_bytes()
    script = tmp_path / "killed.py"
    script.write_text(KILLED_DURING_EVALUATE_TEST)
    done = subprocess.run([sys.executable, str(script), "run", str(REPO / "configs" / "digits.yaml"), "--quick",
                           "--quiet", "--out", str(run), "--set", "finetune.lr=0.01"],
                          cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == -9, done.stderr
    assert not (run / RECORD).exists()  # removed before the second run wrote anything
    assert any((run / "checkpoints" / "resume").glob("*.pt"))
    changed = [n for n, b in before.items() if (run / "checkpoints" / n).read_bytes() != b]
    assert "seed0_stage0.pt" in changed  # the new weights, beside the old points.csv

    line = _refused(capsys, run, tmp_path)
    assert f"{run / 'checkpoints' / 'resume'}: an unfinished run left its resume state here" in line
    assert f"`cascade run CONFIG --out {run} --resume`" in line
    shutil.rmtree(run / "checkpoints" / "resume")  # the user deletes the resume state: still no record
    line = _refused(capsys, run, tmp_path)
    assert f"{run / RECORD}: not found: the run in {run} did not finish" in line and "--resume" in line
    (run / RECORD).write_bytes(old_record)  # the first run's record back: it does not fit the new weights
    line = _refused(capsys, run, tmp_path)
    assert f"{run / 'config.yaml'}: changed since the run finished" in line  # the second run's config


def test_resume_state_left_behind_is_refused_and_a_stray_temporary_file_is_not(run, tmp_path, capsys):
    resume = run / "checkpoints" / "resume"
    resume.mkdir()
    (resume / ".seed_0_big.pt.x1.tmp").write_bytes(b"half")  # a save a kill cut short: not state
    code, err = _export(capsys, run, tmp_path / "ok")
    assert code == 0, err
    (resume / "seed_0_big.pt").write_bytes(b"state")
    assert "an unfinished run left its resume state here" in _refused(capsys, run, tmp_path)


def test_a_run_or_resume_removes_the_record_before_it_writes_anything(run, tmp_path, monkeypatch):
    from cascade.config import load_config
    from cascade.engine.experiment import Experiment
    from cascade.runs.writer import RunWriter

    seen = []
    init = RunWriter.__init__
    monkeypatch.setattr(RunWriter, "__init__", lambda self, out: (seen.append((Path(out) / RECORD).exists()),
                                                                   init(self, out))[1])
    monkeypatch.setattr(Experiment, "_run", lambda self: (_ for _ in ()).throw(RuntimeError("stopped")))
    cfg = load_config(REPO / "configs" / "digits.yaml", quick=True)
    with pytest.raises(RuntimeError, match="stopped"):
        Experiment(cfg, run, quiet=True).run()
    assert seen == [False] and not (run / RECORD).exists()


# ============================================================================ the point, from samples.csv


def test_the_exported_point_is_recomputed_from_samples_csv(quick_digits_run, tmp_path):
    out = export_bundle(quick_digits_run, tmp_path / "b", method="msp", onnx=False)
    m = json.loads((out / "manifest.json").read_text())
    (t,) = m["thresholds"]
    s = pd.read_csv(quick_digits_run / "samples.csv")
    test = s[(s["seed"] == 0) & (s["split"] == "test")]
    kept = test["stage0_score_msp"].to_numpy() >= t  # the rule, worked out here from the table
    system = np.where(kept, test["stage0_correct"], test["big_correct"]).mean()
    e = m["operating_point"]["expected"]
    assert e["skipping_rate"] == pytest.approx(kept.mean(), abs=1e-12)
    assert e["appeal_rate"] == pytest.approx(1 - kept.mean(), abs=1e-12)
    assert e["system_accuracy"] == pytest.approx(system, abs=1e-12)
    assert e["ad"] == pytest.approx(test["big_correct"].mean() - system, abs=1e-12)
    row = pd.read_csv(quick_digits_run / "points.csv").iloc[_point_row(quick_digits_run)]
    assert t == pytest.approx(row["threshold"], rel=1e-12)
    assert e["skipping_rate"] == pytest.approx(row["skipping_rate"], abs=1e-9)
    assert e["ad"] == pytest.approx(row["ad"], abs=1e-9)


@pytest.mark.parametrize("threshold", [-5.0, 1e308, float("inf"), 0.5])
def test_a_wrong_threshold_in_points_csv_is_refused(run, tmp_path, capsys, threshold):
    p = pd.read_csv(run / "points.csv")
    row = _point_row(run)
    true = float(p.loc[row, "threshold"])
    p.loc[row, "threshold"] = threshold
    p.to_csv(run / "points.csv", index=False)
    # edited after the run finished: the record catches it
    line = _refused(capsys, run, tmp_path)
    assert f"{run / 'points.csv'}: changed since the run finished" in line
    # a points.csv that was wrong when the run finished (as if the record were rewritten): samples.csv catches it
    write_record(run)
    line = _refused(capsys, run, tmp_path)
    assert f"{run / 'points.csv'}: the val point of msp (white_box, seed 0, target AD 0.005) has threshold " \
           f"{threshold!r}, but samples.csv gives {true!r}" in line


def test_a_point_whose_figures_samples_csv_does_not_give_is_refused(run, tmp_path, capsys):
    p = pd.read_csv(run / "points.csv")
    p.loc[_point_row(run), "skipping_rate"] = 0.752  # the manifest figure, not this run's
    p.to_csv(run / "points.csv", index=False)
    write_record(run)
    assert "has skipping_rate 0.752, but samples.csv gives" in _refused(capsys, run, tmp_path)


# ============================================================================ damaged run files


def _flip_number(run: Path) -> None:
    lines = (run / "points.csv").read_text().splitlines(keepends=True)
    lines[_point_row(run) + 1] = lines[_point_row(run) + 1].replace(".", "x", 1)  # a byte flip in a number
    (run / "points.csv").write_text("".join(lines))


def _bad_bytes(run: Path) -> None:
    data = bytearray((run / "points.csv").read_bytes())
    data[200:204] = b"\xff\xfe\x00\xff"
    (run / "points.csv").write_bytes(bytes(data))


def _truncate(run: Path) -> None:
    data = (run / "metrics.json").read_bytes()
    (run / "metrics.json").write_bytes(data[: len(data) // 2])


def _truncate_samples(run: Path) -> None:
    data = (run / "samples.csv").read_bytes()
    (run / "samples.csv").write_bytes(data[: data.rindex(b"\n", 0, -1) + 12])  # the last row cut short


@pytest.mark.parametrize("damage, file, message", [
    (_flip_number, "points.csv", "line {line}: target_ad '0x005' is not a number"),
    (_bad_bytes, "points.csv", "not a readable CSV"),
    (_truncate, "metrics.json", "not valid JSON"),
    (lambda r: (r / "metrics.json").write_text('{"task": "digits", "seeds": "all"}'), "metrics.json",
     "seeds: Input should be a valid list"),
    (lambda r: (r / "config.yaml").write_text("task: [digits\n"), "config.yaml", "not readable YAML"),
    (_truncate_samples, "samples.csv", "column big_correct holds values that are not True/False"),
    (lambda r: pd.read_csv(r / "samples.csv").drop(columns="stage0_score_msp").to_csv(r / "samples.csv", index=False),
     "samples.csv", "no column stage0_score_msp (metrics.json's variants of msp read it)"),
    (lambda r: (r / "config.yaml").write_text("task: {name: digits}\nlittel: 3\n"), "config.yaml", "littel"),
    (lambda r: (r / "checkpoints" / "seed0_stage0.pt").unlink(), "checkpoints/seed0_stage0.pt",
     "checkpoint not found"),
    (lambda r: (r / "checkpoints" / "seed0_stage0.pt").write_bytes(b"PK\x03\x04 garbage"),
     "checkpoints/seed0_stage0.pt", "not a readable checkpoint"),
    (lambda r: shutil.copy(r / "checkpoints" / "seed0_big.pt", r / "checkpoints" / "seed0_stage0.pt"),
     "checkpoints/seed0_stage0.pt", "does not fit the stages.0 network of config.yaml"),
])
def test_a_damaged_run_file_is_one_line_naming_it(run, tmp_path, capsys, damage, file, message):
    line_of_row = _point_row(run) + 2
    damage(run)
    missing = not (run / file).exists()
    line = _refused(capsys, run, tmp_path)
    assert f"{run / file}: " + ("missing, though" if missing else "changed since the run finished") in line
    write_record(run)  # past the record: the reader itself names the file
    line = _refused(capsys, run, tmp_path)
    assert f"{run / file}: " in line and message.format(line=line_of_row) in line, line


# ============================================================================ cascade route: CSV headers


def _route(capsys, bundle: Path, inputs: Path, out: Path, *args: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["route", str(bundle), str(inputs), "--out", str(out), *args])
    return code, capsys.readouterr().err


def _digits(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 17, (n, 64)).astype(np.float32)


def test_a_pandas_csv_with_its_numeric_header_gives_one_aligned_prediction_per_input(bundle, tmp_path, capsys):
    x = _digits(5)
    pd.DataFrame(x).to_csv(tmp_path / "x.csv", index=False)  # header 0,1,...,63
    assert (tmp_path / "x.csv").read_text().startswith("0,1,2,")
    code, err = _route(capsys, bundle, tmp_path / "x.csv", tmp_path / "p.csv")
    assert code == 0, err
    got = pd.read_csv(tmp_path / "p.csv")
    direct = Bundle.load(bundle)
    r = direct.route(x.reshape(5, 1, 8, 8))
    assert len(got) == 5 and got["input"].tolist() == [0, 1, 2, 3, 4]
    assert got["prediction"].astype(str).tolist() == direct.predictions(r.output)
    assert got["stage"].tolist() == r.stage.tolist()
    np.testing.assert_allclose(got["score"].to_numpy(), r.score.numpy(), rtol=1e-12, atol=0)
    # --no-header: the first row is an input, as asked
    code, err = _route(capsys, bundle, tmp_path / "x.csv", tmp_path / "p6.csv", "--no-header")
    assert code == 0, err
    assert len(pd.read_csv(tmp_path / "p6.csv")) == 6


def test_header_flags_and_the_default_on_named_and_headerless_csvs(bundle, tmp_path, capsys):
    x = _digits(4)
    pd.DataFrame(x, columns=[f"px{i}" for i in range(64)]).to_csv(tmp_path / "named.csv", index=False)
    pd.DataFrame(x).to_csv(tmp_path / "bare.csv", index=False, header=False)
    for name, args, rows in [("named.csv", (), 4), ("bare.csv", (), 4), ("bare.csv", ("--header",), 3),
                             ("named.csv", ("--header",), 4)]:
        code, err = _route(capsys, bundle, tmp_path / name, tmp_path / "p.csv", *args)
        assert code == 0, err
        assert len(pd.read_csv(tmp_path / "p.csv")) == rows, (name, args)
    code, err = _route(capsys, bundle, tmp_path / "named.csv", tmp_path / "p.csv", "--no-header")
    assert "named.csv: line 1: a cell that is not a finite number (input 0, column 1: 'px0')" in \
        one_line_error(code, err)
    (tmp_path / "mixed.csv").write_text("id," + ",".join(["1"] * 63) + "\n" + ",".join(["1"] * 64) + "\n")
    code, err = _route(capsys, bundle, tmp_path / "mixed.csv", tmp_path / "p.csv")
    assert "mixed.csv: line 1 mixes numbers and text: pass --header" in one_line_error(code, err)


# ============================================================================ cascade route: errors name the input


def test_a_nan_in_input_300_is_named_as_input_300(bundle, tmp_path, capsys):
    x = _digits(600)
    x[300, 17] = np.nan
    np.save(tmp_path / "x.npy", x.reshape(600, 1, 8, 8))
    code, err = _route(capsys, bundle, tmp_path / "x.npy", tmp_path / "p.csv", "--batch", "256")
    assert one_line_error(code, err) == f"error: {tmp_path / 'x.npy'}: input 300 has NaN or infinite values"
    pd.DataFrame(x).to_csv(tmp_path / "x.csv", index=False)
    code, err = _route(capsys, bundle, tmp_path / "x.csv", tmp_path / "p.csv", "--batch", "256")
    assert f"{tmp_path / 'x.csv'}: line 302: a cell that is not a finite number (input 300, column 18: '')" in \
        one_line_error(code, err)
    x[300, 17] = np.inf
    np.save(tmp_path / "x.npy", x.reshape(600, 1, 8, 8))
    code, err = _route(capsys, bundle, tmp_path / "x.npy", tmp_path / "p.csv", "--batch", "256")
    assert "x.npy: input 300 has NaN or infinite values" in one_line_error(code, err)
    assert not (tmp_path / "p.csv").exists()


def test_a_npy_of_flattened_rows_routes_as_its_csv_does_and_a_wrong_shape_names_the_file(bundle, tmp_path, capsys):
    x = _digits(7)
    pd.DataFrame(x).to_csv(tmp_path / "x.csv", index=False)
    np.save(tmp_path / "flat.npy", x)  # [7, 64], as the CSV holds them
    np.save(tmp_path / "grey.npy", x.reshape(7, 8, 8))  # no channel axis
    got = {}
    for name in ("x.csv", "flat.npy", "grey.npy"):
        code, _ = _route(capsys, bundle, tmp_path / name, tmp_path / f"{name}.out.csv")
        assert code == 0
        got[name] = pd.read_csv(tmp_path / f"{name}.out.csv")
    assert len(got["flat.npy"]) == 7
    for name in ("flat.npy", "grey.npy"):
        pd.testing.assert_frame_equal(got[name].drop(columns="input"), got["x.csv"].drop(columns="input"))
    np.save(tmp_path / "wrong.npy", np.zeros((600, 10), np.float32))
    code, err = _route(capsys, bundle, tmp_path / "wrong.npy", tmp_path / "p.csv", "--batch", "256")
    assert one_line_error(code, err) == (f"error: {tmp_path / 'wrong.npy'}: an array of shape [600, 10]; this bundle "
                                         "takes [N, 1, 8, 8] (or [N, 64], each row flattened)")


def test_a_npy_header_claiming_more_rows_than_the_file_holds_is_one_line(bundle, tmp_path, capsys):
    with open(tmp_path / "x.npy", "wb") as f:  # claims 1e13 inputs, holds two
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False,
                                                 "shape": (10**13, 1, 8, 8)})
        f.write(_digits(2).tobytes())
    code, err = _route(capsys, bundle, tmp_path / "x.npy", tmp_path / "p.csv")
    assert "x.npy: not a numpy array file" in one_line_error(code, err)


# ============================================================================ cascade route: atomic output


def test_a_full_disk_leaves_no_partial_predictions_and_an_earlier_file_as_it_was(bundle, tmp_path, capsys,
                                                                                monkeypatch):
    np.save(tmp_path / "x.npy", _digits(50).reshape(50, 1, 8, 8))
    out = tmp_path / "preds" / "predictions.csv"

    def full_disk(frame, path, **kwargs):  # writes part of the file, then the disk is full
        Path(path).write_text("input,prediction\n0,3\n")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    with monkeypatch.context() as mp:
        mp.setattr(pd.DataFrame, "to_csv", full_disk)
        code, err = _route(capsys, bundle, tmp_path / "x.npy", out)
    assert f"{out}: cannot write it (No space left on device); nothing was written" in one_line_error(code, err)
    assert not out.parent.exists() or list(out.parent.iterdir()) == []
    code, err = _route(capsys, bundle, tmp_path / "x.npy", out)
    assert code == 0, err
    before = out.read_bytes()
    assert len(pd.read_csv(out)) == 50
    with monkeypatch.context() as mp:
        mp.setattr(pd.DataFrame, "to_csv", full_disk)
        code, err = _route(capsys, bundle, tmp_path / "x.npy", out)
    assert f"{out}: cannot write it (No space left on device); nothing was written" in one_line_error(code, err)
    assert out.read_bytes() == before and list(out.parent.iterdir()) == [out]


# ============================================================================ cascade route: the pixel limit


def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims ``width x height`` grey pixels: a header and one tiny data chunk."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("size, args, message", [
    ((20000, 20000), (), "over the pixel limit"),  # PIL refuses it as a decompression bomb: still one line
    ((8000, 8000), (), "8000x8000 pixels, over the limit of 50,000,000 (--max-pixels)"),
    ((16, 16), ("--max-pixels", "100"), "16x16 pixels, over the limit of 100 (--max-pixels)"),
])
def test_an_image_over_the_pixel_limit_is_refused_before_it_is_decoded(bundle, tmp_path, capsys, size, args,
                                                                       message):
    folder = tmp_path / "images"
    folder.mkdir()
    if size == (16, 16):
        from PIL import Image

        Image.fromarray(np.zeros((16, 16), np.uint8)).save(folder / "a.png")
    else:
        (folder / "a.png").write_bytes(_png_header(*size))
    code, err = _route(capsys, bundle, folder, tmp_path / "p.csv", *args)
    assert f"{folder / 'a.png'}: " in (line := one_line_error(code, err)) and message in line
    assert not (tmp_path / "p.csv").exists()


def test_an_image_under_the_limit_still_routes(bundle, tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(np.full((16, 16), 200, np.uint8)).save(folder / "a.png")
    code, err = _route(capsys, bundle, folder, tmp_path / "p.csv", "--max-pixels", "256")
    assert code == 0, err
    assert pd.read_csv(tmp_path / "p.csv")["input"].tolist() == ["a.png"]
