"""A --quick run of configs/keypoints.yaml through the CLI: the output contract for regression
with a black-box oracle of unknown cost (AppealNet App. D, Table 5: appeal rates, no MFLOPs)."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from tests.conftest import REPO

METHODS = ["appealnet", "mc_dropout", "error_head"]  # configs/keypoints.yaml, in order
TARGETS = [0.005, 0.01, 0.02, 0.05]
APPEAL_BUDGETS = [0.05, 0.1, 0.2, 0.3]  # evaluation.appeal_budgets' default


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


def _metrics(out) -> dict:
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.slow
def test_keypoints_run_writes_the_contract_files(keypoints_run):
    out, proc, data_root = keypoints_run
    for name in ("config.yaml", "metrics.json", "points.csv", "table.md", "table_full.md", "table.csv", "samples.csv",
                 "run.log"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in (out / "figures").iterdir()) == [
        "accuracy_vs_cost_black_box.png", "routed_samples_black_box.png", "score_histograms.png",
        "threshold_violations.png"]
    # no big network (black-box only): the plain stage and AppealNet's two-head network
    assert {p.name for p in (out / "checkpoints").glob("*.pt")} == {"seed0_stage0.pt", "seed0_appealnet_black_box.pt"}
    assert list((data_root / "synthetic_faces").glob("*.csv"))
    assert "mean rmse" in proc.stdout and "Black-box: appeal rate" in proc.stdout
    md = (out / "table.md").read_text()
    assert md.startswith("# keypoints: 2-stage cascade, seeds [0]")
    # the oracle's cost is unknown: printed as such, never as a number
    assert "| black-box oracle | n/a | | 100 % (by definition) | |" in md
    # no white-box section and no cost budget (the cost is unknown); appeal budgets need no cost
    assert "White-box" not in md and "mean-cost budget" not in (out / "table_full.md").read_text()
    assert "### Black-box: accuracy gained at fixed appeal budgets" in md


@pytest.mark.slow
def test_keypoints_samples_have_rmse_next_to_correctness(keypoints_run):
    out, _, _ = keypoints_run
    samples = pd.read_csv(out / "samples.csv")
    assert set(samples["split"]) == {"cal", "test"} and set(samples["seed"]) == {0}
    assert samples["target"].isna().all()  # regression: the targets are 30 coordinates, not one label
    for net in ("stage0", "appealnet_black_box_stage0"):
        assert {f"{net}_correct", f"{net}_rmse"} <= set(samples.columns)
        assert f"{net}_pred" not in samples.columns
        # correct means RMSE under the configured 4 pixels, row by row
        assert (samples[f"{net}_correct"] == (samples[f"{net}_rmse"] < 4.0)).all()
    assert not any(c.startswith("big_") for c in samples.columns)
    for column in ("stage0_score_mc_dropout", "stage0_score_error_head", "appealnet_black_box_stage0_score"):
        score = samples[column]
        assert score.between(0, 1).all() and score.notna().all(), column


@pytest.mark.slow
def test_keypoints_metrics_have_table5_fields(keypoints_run):
    out, _, _ = keypoints_run
    m = _metrics(out)
    samples = pd.read_csv(out / "samples.csv")
    test = samples[samples["split"] == "test"]
    assert m["task"] == "keypoints" and m["kind"] == "regression"
    assert m["modes"] == ["black_box"] and m["num_stages"] == 2
    assert m["last_stage_mflops"] == {"black_box": None}  # unknown oracle cost
    assert m["methods"] == {"appealnet": {"kind": "trained", "confidence_score": False},
                            "mc_dropout": {"kind": "post_hoc", "confidence_score": True},
                            "error_head": {"kind": "post_hoc", "confidence_score": False}}
    for net in ("stage0", "appealnet_black_box_stage0"):
        assert m["errors"][net]["rmse"] == pytest.approx(test[f"{net}_rmse"].mean())
        assert m["accuracy"][net] == pytest.approx(test[f"{net}_correct"].mean())
    # AppealNet's head (App. D): one linear layer on [features (128), coordinates (30)], its
    # inputs batch-normalized: 158 MACs (batch norm is no multiply-accumulate here), and
    # 158 + 1 weights plus 2 * 158 batch-norm parameters = 475
    (system,) = m["systems"].values()
    assert system["method"] == "appealnet" and system["mode"] == "black_box"
    assert system["head_mflops"] == [pytest.approx(158e-6)] and system["head_params"] == 475
    assert system["stage_mflops"] == [pytest.approx(m["networks"]["stage0"]["mflops"] + 158e-6)]
    for v in m["variants"]:
        assert v["correct_columns"][-1] is None and v["stage_mflops"][-1] is None
    points = m["operating_points"]
    keys = sorted((p["method"], p["selection"], p["threshold_source"], p["target_ad"]) for p in points
                  if p["method"] != "oracle" and p["selection"] == "target_ad")  # the limit: test_baselines_and_limits
    assert keys == sorted((me, "target_ad", s, t) for me in METHODS for s in ("test", "val", "guaranteed")
                          for t in TARGETS)
    # appeal budgets (evaluation.appeal_budgets' default): every method, and the oracle router, on accuracy
    # as the other points measure it (the fraction within 4 px)
    budgets = sorted((p["method"], p["threshold_source"], p["appeal_budget"]) for p in points
                     if p["selection"] == "appeal_budget")
    assert budgets == sorted([(me, s, b) for me in METHODS for s in ("test", "val") for b in APPEAL_BUDGETS]
                             + [("oracle", "test", b) for b in APPEAL_BUDGETS])
    for p in points:
        # the black-box oracle is always right, so AD = 1 - system accuracy; its cost is
        # unknown, so the points report appeal rates and no MFLOPs
        assert p["ad"] == pytest.approx(1 - p["system_accuracy"])
        assert p["cost_mflops"] is None and p["relative_cost"] is None
        assert 0 <= p["appeal_rate"] <= 1 and p["appeal_rate"] == pytest.approx(p["exit_fractions"][-1])
        if p["threshold_source"] == "test" and p["selection"] == "target_ad":
            assert p["feasible"] and p["ad"] <= p["target_ad"] + 1e-9
        if p["threshold_source"] == "test" and p["selection"] == "appeal_budget":
            assert p["feasible"] and p["appeal_rate"] <= p["appeal_budget"] + 1e-9
    assert {(c["field"], c["method"]) for c in m["comparisons"]} == {("appeal_rate", "appealnet")}
    assert len(m["comparisons"]) == 3 * len(TARGETS)


@pytest.mark.slow
def test_keypoints_points_recomputed_from_samples_csv(keypoints_run):
    """Plain numpy over samples.csv: each point's appeal rate and accuracy at its threshold
    (appealed inputs are answered by the oracle, right by definition), and each test-tuned
    point is the lowest appeal rate within its AD target."""
    out, _, _ = keypoints_run
    m = _metrics(out)
    s = pd.read_csv(out / "samples.csv")
    test = s[s["split"] == "test"]
    variants = {v["method"]: v for v in m["variants"]}

    def route(method: str, t: float) -> tuple[float, float]:
        v = variants[method]
        score, right = test[v["score_columns"][0]].to_numpy(np.float64), test[v["correct_columns"][0]].to_numpy(bool)
        kept = score >= t
        return float(np.mean(~kept)), float(np.mean(np.where(kept, right, True)))

    for p in m["operating_points"]:
        if p["method"] == "oracle":
            continue
        appeal, acc = route(p["method"], p["threshold"])
        assert p["appeal_rate"] == pytest.approx(appeal) and p["system_accuracy"] == pytest.approx(acc)
        if p["threshold_source"] != "test":
            continue
        candidates = np.append(np.unique(test[variants[p["method"]]["score_columns"][0]]), np.inf)
        if p["selection"] == "target_ad":
            best = min(a for a, c in (route(p["method"], t) for t in candidates) if 1 - c <= p["target_ad"] + 1e-9)
            assert p["appeal_rate"] == pytest.approx(best)
        else:  # appeal budget: the most accurate within it, ties to fewer appeals
            best = min((-c, a) for a, c in (route(p["method"], t) for t in candidates)
                       if a <= p["appeal_budget"] + 1e-9)
            assert (p["system_accuracy"], p["appeal_rate"]) == pytest.approx((-best[0], best[1]))
