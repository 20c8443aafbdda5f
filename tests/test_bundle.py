"""Exporting a run (``cascade export``) and routing with the bundle alone (``cascade.Bundle``,
``cascade route``): the round trip reproduces the run's decisions and answers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cascade import Bundle, CascadeError, Preprocessing, Router
from cascade.cli import main
from cascade.evaluation import exit_stages
from tests.test_new_user import one_line_error

#: routes test splits in ONE fresh process that imports nothing but the bundle loader (a
#: fresh interpreter and torch cost seconds: one for every bundle, not one each):
#: argv = (bundle, raw inputs .npy, where to write stage / output / score ... .npz) per bundle
FRESH_PROCESS = """
import sys
import numpy as np
from cascade.deploy.bundle import Bundle

args = sys.argv[1:]
for bundle, raw, out in zip(args[0::3], args[1::3], args[2::3]):
    r = Bundle.load(bundle).route(np.load(raw))
    np.savez(out, stage=r.stage.numpy(), output=r.output.numpy(), score=r.score.numpy(),
             mflops=r.mflops.numpy(), pending=r.pending.numpy())
loaded = sorted(m for m in sys.modules if m.split(".")[0] == "tasks" or m in ("cascade.engine.experiment", "cascade.training.trainer"))
assert not [m for m in loaded if m.split(".")[0] == "tasks"], loaded  # no task code, no plugin
"""
#: the bundles routed in that process: (method, mode) of the two-stage run, and the
#: three-stage run's methods
TWO_STAGE = [("appealnet", "white_box"), ("msp", "white_box"), ("appealnet", "black_box"), ("msp", "black_box")]
THREE_STAGE = ["reinforce", "msp"]


def _export(run: Path, out: Path, **kw) -> Path:
    args = ["export", str(run), "--out", str(out)]
    for k, v in kw.items():
        args += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
    assert main(args) == 0
    return out


def _raw_test_split(seed: int) -> np.ndarray:
    """The digits test split as a user has it: grey levels 0-16 (the task divides by 16)."""
    from tasks.digits import DigitsTask

    test = DigitsTask().build_splits(seed).test
    return (test.tensors[0] * 16).round().to(torch.uint8).numpy()  # [N, 1, 8, 8]


@pytest.fixture(scope="module")
def fresh_routes(quick_digits_run, quick_cascade_run, tmp_path_factory) -> dict[tuple[str, str], tuple[Path, dict]]:
    """Every bundle of :data:`TWO_STAGE` (AD 0.01, val) and :data:`THREE_STAGE` (AD 0.01,
    test) exported, and its seed's raw test split routed by :data:`FRESH_PROCESS`:
    ``(method, mode | "cascade") -> (bundle folder, routed arrays)``."""
    tmp = tmp_path_factory.mktemp("fresh")
    bundles = {(method, mode): _export(quick_digits_run, tmp / f"{method}_{mode}", method=method, mode=mode,
                                       target_ad=0.01, source="val", no_onnx=True) for method, mode in TWO_STAGE}
    bundles.update({(method, "cascade"): _export(quick_cascade_run, tmp / f"{method}_cascade", method=method,
                                                 target_ad=0.01, source="test", no_onnx=True)
                    for method in THREE_STAGE})
    args = []
    for bundle in bundles.values():
        seed = json.loads((bundle / "manifest.json").read_text())["operating_point"]["seed"]
        np.save(tmp / f"{bundle.name}.npy", _raw_test_split(seed))
        args += [str(bundle), str(tmp / f"{bundle.name}.npy"), str(tmp / f"{bundle.name}.npz")]
    script = tmp / "route.py"
    script.write_text(FRESH_PROCESS)
    done = subprocess.run([sys.executable, str(script), *args], check=False, capture_output=True, text=True, cwd=tmp,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return {key: (bundle, dict(np.load(tmp / f"{bundle.name}.npz"))) for key, bundle in bundles.items()}


def _test_rows(run: Path, seed: int) -> pd.DataFrame:
    s = pd.read_csv(run / "samples.csv")
    return s[(s["seed"] == seed) & (s["split"] == "test")].reset_index(drop=True)


@pytest.mark.slow
@pytest.mark.parametrize("method, mode", TWO_STAGE)
def test_a_bundle_in_a_fresh_process_reproduces_the_runs_decisions_and_answers(quick_digits_run, fresh_routes,
                                                                                method, mode):
    bundle, routed = fresh_routes[(method, mode)]
    manifest = json.loads((bundle / "manifest.json").read_text())
    seed = manifest["operating_point"]["seed"]

    rows = _test_rows(quick_digits_run, seed)
    prefix = f"{method}_{mode}_stage0" if method == "appealnet" else "stage0"
    score = rows[f"{prefix}_score" if method == "appealnet" else f"stage0_score_{method}"].to_numpy()
    expected_stage = exit_stages(score[:, None], manifest["thresholds"][0])
    assert (routed["stage"] == expected_stage).all()
    np.testing.assert_array_equal(routed["score"], score)  # float32 scores, bit for bit
    kept = expected_stage == 0
    pred = routed["output"].argmax(axis=1)
    assert (pred[kept] == rows.loc[kept, f"{prefix}_pred"]).all()
    if mode == "white_box":
        assert (pred[~kept] == rows.loc[~kept, "big_pred"]).all()
        assert not routed["pending"].any()
    else:  # the oracle is outside the bundle: those rows wait for it, with the little's answer
        assert (routed["pending"] == ~kept).all()
        assert (pred[~kept] == rows.loc[~kept, f"{prefix}_pred"]).all()
    # the skipping rate the manifest promises is the one the run measured at this threshold
    assert manifest["operating_point"]["expected"]["skipping_rate"] == pytest.approx(kept.mean())
    costs = [s["mflops"] for s in manifest["stages"]]
    spent = np.where(kept, costs[0], costs[0] + (costs[1] if mode == "white_box" else 0.0))
    np.testing.assert_allclose(routed["mflops"], spent)


@pytest.mark.slow
@pytest.mark.parametrize("method", THREE_STAGE)
def test_a_three_stage_bundle_reproduces_the_runs_exit_stages_and_answers(quick_cascade_run, fresh_routes, method):
    bundle, routed = fresh_routes[(method, "cascade")]
    b = Bundle.load(bundle)
    assert b.num_stages == 3 and b.has_last_stage
    seed = b.manifest["operating_point"]["seed"]

    rows = _test_rows(quick_cascade_run, seed)
    variant = b.manifest["operating_point"]["variant"]
    if method == "reinforce":
        prefixes = [f"reinforce_{variant}_white_box_stage{k}" for k in range(2)]
        scores = np.stack([rows[f"{p}_score"] for p in prefixes], axis=1)
    else:
        prefixes = ["stage0", "stage1"]
        scores = np.stack([rows[f"stage{k}_score_msp"] for k in range(2)], axis=1)
    # export writes the run's one shared threshold for every stage (distinct per-stage
    # thresholds: test_wrong_answers.py's hand-written manifest)
    assert b.thresholds == [b.thresholds[0]] * 2
    expected = exit_stages(scores, b.thresholds[0])
    assert (routed["stage"] == expected).all()
    # the point routes: inputs exit at two stages at least (which ones depends on the quick networks)
    assert len(np.unique(expected)) >= 2
    pred = routed["output"].argmax(axis=1)
    for k, column in enumerate([f"{p}_pred" for p in prefixes] + ["big_pred"]):
        at = expected == k
        assert (pred[at] == rows.loc[at, column]).all(), f"stage {k}"


@pytest.mark.slow
def test_the_manifest_describes_the_operating_point_and_the_stages(quick_digits_run, tmp_path):
    bundle = _export(quick_digits_run, tmp_path / "b", method="msp", target_ad=0.005, source="val")
    m = json.loads((bundle / "manifest.json").read_text())
    points = pd.read_csv(quick_digits_run / "points.csv")
    row = points[(points["seed"] == 0) & (points["mode"] == "white_box") & (points["method"] == "msp")
                 & (points["selection"] == "target_ad") & (points["threshold_source"] == "val")
                 & np.isclose(points["target_ad"], 0.005)].iloc[0]
    assert m["thresholds"] == [row["threshold"]]
    assert m["operating_point"]["expected"]["ad"] == pytest.approx(row["ad"])
    assert m["input"] == {"shape": [1, 8, 8], "dtype": "float32"}
    assert m["preprocessing"] == {"raw_max": 16.0, "mean": [0.0], "std": [1.0]}
    assert m["output_names"] == [str(i) for i in range(10)]
    networks = json.loads((quick_digits_run / "metrics.json").read_text())["networks"]
    assert [s["mflops"] for s in m["stages"]] == pytest.approx([networks["stage0"]["mflops"],
                                                                networks["big"]["mflops"]])
    assert len(m["run"]["config_sha256"]) == 64


@pytest.mark.slow
def test_the_onnx_file_gives_the_programs_outputs(quick_digits_run, tmp_path):
    import onnxruntime

    bundle = _export(quick_digits_run, tmp_path / "b", method="appealnet", target_ad=0.01)
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["stages"][0]["onnx"] == "stage_0.onnx"
    b = Bundle.load(bundle)
    x = b.preprocess(_raw_test_split(0)[:37])
    session = onnxruntime.InferenceSession(str(bundle / "stage_0.onnx"), providers=["CPUExecutionProvider"])
    output, score = session.run(None, {"x": x.numpy()})
    program = torch.export.load(str(bundle / "stage_0.pt2")).module()
    with torch.no_grad():
        want_output, want_score = program(x)
    np.testing.assert_allclose(output, want_output.numpy(), atol=1e-5)
    np.testing.assert_allclose(score, want_score.numpy(), atol=1e-6)


@pytest.mark.slow
def test_cascade_route_writes_one_row_per_input_from_npy_csv_and_images(quick_digits_run, tmp_path, capsys):
    from PIL import Image

    bundle = _export(quick_digits_run, tmp_path / "b", method="msp", target_ad=0.01, no_onnx=True)
    raw = _raw_test_split(0)[:12]
    np.save(tmp_path / "x.npy", raw)
    assert main(["route", str(bundle), str(tmp_path / "x.npy"), "--out", str(tmp_path / "npy.csv")]) == 0
    by_npy = pd.read_csv(tmp_path / "npy.csv")
    assert list(by_npy.columns) == ["input", "prediction", "stage", "score", "mflops", "pending"]
    assert len(by_npy) == 12
    direct = Bundle.load(bundle).route(raw)
    assert (by_npy["stage"].to_numpy() == direct.stage.numpy()).all()
    assert (by_npy["prediction"].to_numpy() == direct.output.argmax(1).numpy()).all()

    header = ",".join(f"p{i}" for i in range(64))
    np.savetxt(tmp_path / "x.csv", raw.reshape(12, -1), delimiter=",", fmt="%d", header=header, comments="")
    assert main(["route", str(bundle), str(tmp_path / "x.csv"), "--out", str(tmp_path / "csv.csv")]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "csv.csv"), by_npy)

    folder = tmp_path / "images"
    folder.mkdir()
    pixels = (raw[:, 0].astype(np.float64) * 255 / 16).round().astype(np.uint8)  # [N, 8, 8] grey
    for i, p in enumerate(pixels):
        Image.fromarray(p, mode="L").save(folder / f"digit_{i:02d}.png")
    assert main(["route", str(bundle), str(folder), "--out", str(tmp_path / "img.csv")]) == 0
    by_image = pd.read_csv(tmp_path / "img.csv")
    assert by_image["input"].tolist() == [f"digit_{i:02d}.png" for i in range(12)]
    # the same pixels given as an array in the task's raw units (0-16)
    same = Bundle.load(bundle).route(pixels[:, None].astype(np.float32) * 16 / 255)
    assert (by_image["stage"].to_numpy() == same.stage.numpy()).all()
    assert (by_image["prediction"].to_numpy() == same.output.argmax(1).numpy()).all()


@pytest.mark.slow
def test_a_black_box_bundle_leaves_appealed_inputs_pending_for_the_oracle(quick_digits_run, tmp_path):
    bundle = _export(quick_digits_run, tmp_path / "b", method="msp", mode="black_box", target_ad=0.01, no_onnx=True)
    b = Bundle.load(bundle)
    assert not b.has_last_stage and b.manifest["stages"][-1]["role"] == "oracle"
    np.save(tmp_path / "x.npy", _raw_test_split(0))
    assert main(["route", str(bundle), str(tmp_path / "x.npy"), "--out", str(tmp_path / "p.csv")]) == 0
    p = pd.read_csv(tmp_path / "p.csv")
    assert p["pending"].any() and (~p["pending"]).any()
    assert p.loc[p["pending"], "prediction"].isna().all()  # no answer is made up for the oracle's rows
    assert (p.loc[p["pending"], "stage"] == 1).all()
    with pytest.raises(CascadeError, match="black-box bundle has no last stage"):
        b.run_last(b.preprocess(_raw_test_split(0)[:2]))


@pytest.mark.slow
@pytest.mark.parametrize("write, expected", [
    (lambda d: np.save(d / "x.npy", np.zeros((3, 9, 9))), "x.npy: an array of shape [3, 9, 9]; this bundle takes [N, 1, 8, 8]"),
    (lambda d: np.save(d / "x.npy", np.full((2, 1, 8, 8), np.nan)), "x.npy: input 0 has NaN"),
    (lambda d: (d / "x.csv").write_text("a,b\n1,2\n"), "x.csv: 2 columns; this bundle's input [1, 8, 8] has 64"),
    (lambda d: (d / "x.csv").write_text(("1," * 63 + "1\n") * 2 + "1," * 63 + "oops\n"), "x.csv: line 3: a cell"),
    (lambda d: (d / "x.txt").write_text("1"), "x.txt: give a .npy array, a .csv of features, or a folder"),
    (lambda d: (d / "x.npy").write_bytes(b"not numpy"), "x.npy: not a numpy array file"),
])
def test_bad_inputs_to_cascade_route_are_one_line_naming_the_file(quick_digits_run, tmp_path, capsys, write,
                                                                  expected):
    bundle = _export(quick_digits_run, tmp_path / "b", method="msp", no_onnx=True)
    data = tmp_path / "data"
    data.mkdir()
    write(data)
    (path,) = list(data.iterdir())
    capsys.readouterr()
    code = main(["route", str(bundle), str(path), "--out", str(tmp_path / "p.csv")])
    assert expected in one_line_error(code, capsys.readouterr().err)
    assert not (tmp_path / "p.csv").exists()


@pytest.mark.slow
def test_export_refuses_a_random_score_an_occupied_folder_and_a_broken_bundle_is_one_line(
        quick_digits_run, tmp_path, capsys, monkeypatch):
    from baselines.confidence import MaxSoftmaxScore

    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    code = main(["export", str(quick_digits_run), "--out", str(occupied), "--method", "msp"])
    assert "exists and is not a bundle folder" in one_line_error(code, capsys.readouterr().err)
    assert (occupied / "notes.txt").read_text() == "mine"

    monkeypatch.setattr(MaxSoftmaxScore, "deterministic", False)  # as MC dropout
    code = main(["export", str(quick_digits_run), "--out", str(tmp_path / "b"), "--method", "msp"])
    assert "scores with random numbers" in one_line_error(code, capsys.readouterr().err)
    monkeypatch.undo()

    bundle = _export(quick_digits_run, tmp_path / "b", method="msp", no_onnx=True)
    (bundle / "stage_0.pt2").write_bytes(b"garbage")
    np.save(tmp_path / "x.npy", np.zeros((1, 1, 8, 8)))
    code = main(["route", str(bundle), str(tmp_path / "x.npy"), "--out", str(tmp_path / "p.csv")])
    assert "stage_0.pt2: SHA-256 differs from" in one_line_error(code, capsys.readouterr().err)
    (bundle / "manifest.json").write_text(json.dumps({"format_version": 99}))
    code = main(["route", str(bundle), str(tmp_path / "x.npy"), "--out", str(tmp_path / "p.csv")])
    assert "format_version 99" in one_line_error(code, capsys.readouterr().err)


@pytest.mark.parametrize("attrs, message", [
    ({"output_names": ("a", "b")}, "output_names must name each of the 10 outputs"),
    ({"preprocessing": {"raw_max": 255}}, "preprocessing must be a cascade.Preprocessing"),
    ({"preprocessing": Preprocessing(mean=(0.1, 0.2))}, "1 value or one per channel (1)"),
    ({"preprocessing": Preprocessing(std=(0.0,))}, "std > 0"),
])
def test_a_task_with_wrong_output_names_or_preprocessing_is_named_before_any_training(attrs, message):
    from cascade.engine.checks import task_attribute_problems
    from tasks.digits import DigitsTask

    task = type("MyDigits", (DigitsTask,), attrs)()
    (problem,) = task_attribute_problems(task)
    assert problem.startswith("task MyDigits: ") and message in problem


@pytest.mark.slow
def test_a_guaranteed_point_that_certified_nothing_exports_as_strict_json_sending_all_on(quick_digits_run, tmp_path):
    bundle = _export(quick_digits_run, tmp_path / "b", method="msp", target_ad=0.0, source="guaranteed", no_onnx=True)
    m = json.loads((bundle / "manifest.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
    assert m["thresholds"] == [None]  # at AD 0 nothing is certified: everything to the big network
    assert m["operating_point"]["threshold_source"] == "guaranteed" and m["operating_point"]["delta"] == 0.1
    r = Bundle.load(bundle).route(_raw_test_split(0))
    assert (r.stage == 1).all()


@pytest.mark.slow
def test_cascade_route_of_a_regression_bundle_writes_a_column_per_output(tmp_path):
    from tests.conftest import REPO, run_quick

    run = run_quick(tmp_path, REPO / "configs" / "keypoints.yaml")
    bundle = _export(run, tmp_path / "b", method="error_head", no_onnx=True)
    b = Bundle.load(bundle)
    # grey images, no channel axis: half noise, half flat, so that the quick error head keeps some and sends
    # others on (noise alone was all kept by one seed's networks)
    rng = np.random.default_rng(0)
    raw = np.concatenate([rng.integers(0, 256, (6, 96, 96)), np.full((6, 96, 96), 128)]).astype(np.uint8)
    np.save(tmp_path / "x.npy", raw)
    assert main(["route", str(bundle), str(tmp_path / "x.npy"), "--out", str(tmp_path / "p.csv")]) == 0
    p = pd.read_csv(tmp_path / "p.csv")
    assert list(p.columns) == ["input", *b.output_names, "stage", "score", "mflops", "pending"]
    direct = b.route(raw)
    kept = ~direct.pending.numpy()
    assert kept.any() and not kept.all(), "the point should keep some faces and send some on"
    np.testing.assert_allclose(p.loc[kept, b.output_names].to_numpy(), direct.output.numpy()[kept], rtol=1e-6)
    assert p.loc[~kept, b.output_names].isna().all().all()


def test_a_point_at_an_appeal_budget_exports_and_routes_that_share_of_the_test_inputs_on(
        quick_digits_run, tmp_path, capsys):
    """``cascade export --appeal-budget 0.2``: the run's val point at that budget (its
    threshold, chosen on the calibration split); routing the test split through the
    bundle appeals exactly the share ``points.csv`` reports on test."""
    bundle = _export(quick_digits_run, tmp_path / "b", method="msp", appeal_budget=0.2, no_onnx=True)
    assert "appeal budget 0.2" in capsys.readouterr().out
    points = pd.read_csv(quick_digits_run / "points.csv")
    row = points[(points["seed"] == 0) & (points["mode"] == "white_box") & (points["method"] == "msp")
                 & (points["selection"] == "appeal_budget") & (points["threshold_source"] == "val")
                 & np.isclose(points["appeal_budget"], 0.2)].iloc[0]
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["thresholds"] == [row["threshold"]]
    assert m["operating_point"]["appeal_budget"] == 0.2 and m["operating_point"]["target_ad"] is None
    b = Bundle.load(bundle)
    assert "appeal budget 0.2" in b.name
    routed = b.route(_raw_test_split(0))
    assert float((routed.stage == 1).double().mean()) == pytest.approx(row["appeal_rate"], abs=1e-12)
    assert Router.from_run(quick_digits_run, method="msp", appeal_budget=0.2).threshold == row["threshold"]
    # a budget the run has not, or a source appeal budgets do not have: one line naming what it has
    code = main(["export", str(quick_digits_run), "--out", str(tmp_path / "c"), "--method", "msp",
                 "--appeal-budget", "0.15"])
    line = one_line_error(code, capsys.readouterr().err)
    assert "no val point of msp (white_box) at appeal budget 0.15; the run has budgets 0.05, 0.1, 0.2, 0.3" in line
    code = main(["export", str(quick_digits_run), "--out", str(tmp_path / "c"), "--method", "msp",
                 "--appeal-budget", "0.2", "--source", "guaranteed"])
    assert "no guaranteed appeal budget points of msp" in one_line_error(code, capsys.readouterr().err)
