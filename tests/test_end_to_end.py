"""A --quick run of the default experiment through the CLI, and the output contract."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from tests.conftest import REPO, mnist_root


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    # two seeds so that the *_std fields and the per-seed grouping are exercised
    proc = subprocess.run(
        [sys.executable, "-m", "cascade", "run", "configs/digits.yaml", "--quick", "--out", str(out),
         "--set", "seeds=[0, 1]"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return out, proc


def test_run_writes_contract_files(digits_run):
    out, proc = digits_run
    for name in ("config.yaml", "metrics.json", "table.md", "table.csv", "samples.csv"):
        assert (out / name).is_file(), name
    assert (out / "figures" / "accuracy_vs_skipping_white_box.png").is_file()
    assert (out / "figures" / "score_histograms.png").is_file()
    assert list((out / "checkpoints").glob("seed0_*.pt"))
    assert "White-box" in proc.stdout and "Black-box" in proc.stdout


def test_metrics_contract(digits_run):
    m = json.loads((digits_run[0] / "metrics.json").read_text())
    assert m["task"] == "digits" and m["seeds"] == [0, 1]
    for net in ("little", "appealnet", "big"):
        assert set(m["networks"][net]) >= {"mflops", "params"}
        assert 0 <= m["accuracy"][net] <= 1
    assert m["networks"]["big"]["mflops"] >= 10 * m["networks"]["little"]["mflops"]
    fields = {"mode", "method", "threshold_source", "target_ad", "threshold", "skipping_rate", "appeal_rate",
              "system_accuracy", "ad", "cost_mflops", "skipping_rate_std"}
    points = m["operating_points"]
    assert all(fields <= set(p) for p in points)
    keys = {(p["mode"], p["method"], p["threshold_source"]) for p in points}
    for mode in ("white_box", "black_box"):
        for method in ("msp", "gap", "entropy", "appealnet"):
            for source in ("test", "val"):
                assert (mode, method, source) in keys
    wb_targets = sorted({p["target_ad"] for p in points if p["mode"] == "white_box"})
    assert wb_targets == [0.0, 0.001, 0.005, 0.01]  # fractions, not percents
    for p in points:
        assert p["skipping_rate"] + p["appeal_rate"] == pytest.approx(1.0)


def _plain_numpy_point(score_cal, little_cal, big_cal, score_test, little_test, big_test, target, source):
    """Brute force, independent of cascade.thresholds: try every distinct score as a threshold."""
    score, little, big = (score_test, little_test, big_test) if source == "test" else (score_cal, little_cal, big_cal)
    best_thr, best_kept = np.inf, 0
    for t in np.unique(score):
        keep = score >= t
        acc = np.where(keep, little, big).mean()
        if big.mean() - acc <= target + 1e-12 and keep.sum() > best_kept:
            best_thr, best_kept = t, keep.sum()
    keep = score_test >= best_thr
    acc = np.where(keep, little_test, big_test).mean()
    return keep.mean(), acc


def test_operating_points_recomputed_from_samples_csv(digits_run):
    out = digits_run[0]
    m = json.loads((out / "metrics.json").read_text())
    s = pd.read_csv(out / "samples.csv")
    required = {"seed", "split", "index", "target", "little_correct", "appealnet_correct", "big_correct",
                "score_msp", "score_gap", "score_entropy", "score_appealnet"}
    assert required <= set(s.columns)
    assert set(s["split"]) == {"cal", "test"}
    for p in m["operating_points"]:
        cols = m["score_columns"][p["mode"]][p["method"]]
        srs, accs = [], []
        for seed in m["seeds"]:
            parts = {}
            for split in ("cal", "test"):
                f = s[(s["seed"] == seed) & (s["split"] == split)]
                big = f[cols["big_correct"]].to_numpy(bool) if cols["big_correct"] else np.ones(len(f), bool)
                parts[split] = (f[cols["score"]].to_numpy(float), f[cols["little_correct"]].to_numpy(bool), big)
            sr, acc = _plain_numpy_point(*parts["cal"], *parts["test"], p["target_ad"], p["threshold_source"])
            srs.append(sr)
            accs.append(acc)
        assert p["skipping_rate"] == pytest.approx(np.mean(srs), abs=1e-9), p
        assert p["system_accuracy"] == pytest.approx(np.mean(accs), abs=1e-9), p


def test_predictor_head_cost_reported(digits_run):
    m = json.loads((digits_run[0] / "metrics.json").read_text())
    head = m["predictor_head"]
    assert head["mflops"] > 0 and head["params"] > 0
    assert head["relative_mflops"] == pytest.approx(head["mflops"] / m["networks"]["little"]["mflops"])


@pytest.mark.skipif(mnist_root() is None, reason="real MNIST not found ($CASCADE_DATA or ../shared/data)")
def test_mnist_quick_run(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "cascade", "run", "configs/mnist.yaml", "--quick", "--out", str(tmp_path),
         "--set", f"task.data_root={mnist_root()}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["task"] == "mnist" and m["accuracy"]["big"] > 0.8, m["accuracy"]


def test_mnist_missing_data_root_is_one_line_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "cascade", "run", "configs/mnist.yaml", "--quick", "--out", str(tmp_path / "o"),
         "--set", f"task.data_root={tmp_path / 'nowhere'}"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert str(tmp_path / "nowhere") in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_router_from_run_reproduces_the_operating_point(digits_run):
    from cascade import Router
    from tasks.digits import DigitsTask

    out = digits_run[0]
    router = Router.from_run(out, mode="white_box", target_ad=0.01, threshold_source="val", seed=0)
    test = DigitsTask().build_splits(0).test
    x, y = test.tensors
    routed = router(x)
    s = pd.read_csv(out / "samples.csv")
    s = s[(s["seed"] == 0) & (s["split"] == "test")]
    keep = s["score_appealnet"].to_numpy() >= router.threshold
    assert routed.kept.numpy().tolist() == keep.tolist()
    system_correct = np.where(keep, s["appealnet_correct"], s["big_correct"]).astype(bool)
    assert (routed.output.argmax(-1) == y).numpy().tolist() == system_correct.tolist()
