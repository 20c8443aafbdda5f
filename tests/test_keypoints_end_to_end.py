"""A --quick run of configs/keypoints.yaml through the CLI: the output contract for regression."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from tests.conftest import REPO


@pytest.fixture(scope="module")
def keypoints_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("keypoints")
    data_root = tmp_path_factory.mktemp("data")  # the synthetic faces are cached here, not in the repo
    proc = subprocess.run(
        [sys.executable, "-m", "cascade", "run", "configs/keypoints.yaml", "--quick", "--out", str(out),
         "--set", f"task.data_root={data_root}"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    return out, proc, data_root


@pytest.mark.slow
def test_keypoints_run_writes_the_contract_files(keypoints_run):
    out, proc, data_root = keypoints_run
    for name in ("config.yaml", "metrics.json", "table.md", "table.csv", "samples.csv"):
        assert (out / name).is_file(), name
    for fig in ("accuracy_vs_skipping_black_box.png", "score_histograms.png", "routed_samples_black_box.png"):
        assert (out / "figures" / fig).is_file(), fig
    assert {p.name for p in (out / "checkpoints").glob("*.pt")} == {"seed0_little.pt", "seed0_appealnet.pt"}
    assert list((data_root / "synthetic_faces").glob("*.csv"))
    assert "mean rmse" in proc.stdout and "Black-box" in proc.stdout


@pytest.mark.slow
def test_keypoints_samples_have_rmse_next_to_correctness(keypoints_run):
    out, _, _ = keypoints_run
    samples = pd.read_csv(out / "samples.csv")
    for net in ("little", "appealnet"):
        assert {f"{net}_correct", f"{net}_rmse"} <= set(samples.columns)
        # correct means RMSE under the configured 4 pixels, row by row
        assert (samples[f"{net}_correct"] == (samples[f"{net}_rmse"] < 4.0)).all()
    for method in ("mc_dropout", "error_head", "appealnet"):
        score = samples[f"score_{method}"]
        assert score.between(0, 1).all() and score.notna().all()


@pytest.mark.slow
def test_keypoints_metrics_have_table5_fields(keypoints_run):
    out, _, _ = keypoints_run
    m = json.loads((out / "metrics.json").read_text())
    samples = pd.read_csv(out / "samples.csv")
    test = samples[samples["split"] == "test"]
    assert m["task"] == "keypoints" and m["modes"] == ["black_box"]
    for net in ("little", "appealnet"):
        assert m["errors"][net]["rmse"] == pytest.approx(test[f"{net}_rmse"].mean())
        assert m["accuracy"][net] == pytest.approx(test[f"{net}_correct"].mean())
    points = {(p["method"], p["threshold_source"], p["target_ad"]) for p in m["operating_points"]}
    for method in ("mc_dropout", "error_head", "appealnet"):
        for source in ("test", "val"):
            for target in (0.005, 0.01, 0.02, 0.05):
                assert (method, source, target) in points
    # the black-box oracle is always right, so AD = 1 - system accuracy
    for p in m["operating_points"]:
        assert p["ad"] == pytest.approx(1 - p["system_accuracy"])
        if p["threshold_source"] == "test":
            assert p["ad"] <= p["target_ad"] + 1e-9
    assert np.isfinite(m["predictor_head"]["params"])
