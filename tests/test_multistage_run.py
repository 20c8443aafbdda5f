"""--quick runs of the cascade configs through the CLI, and the cascade's output contract."""

import json

import numpy as np
import pandas as pd
import pytest

from cascade.cli import main
from tests.conftest import REPO, mnist_root

CASCADE_METHODS = {"reinforce", "msp_cascade", "gap_cascade", "entropy_cascade", "appealnet_cascade"}


@pytest.fixture(scope="module")
def digits_cascade_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits_cascade")
    rc = main(["run", str(REPO / "configs" / "digits_cascade.yaml"), "--quick", "--quiet", "--out", str(out)])
    assert rc == 0
    return out


@pytest.mark.slow
def test_cascade_run_writes_contract_files(digits_cascade_run):
    out = digits_cascade_run
    for name in ("config.yaml", "metrics.json", "table.md", "table.csv", "samples.csv"):
        assert (out / name).is_file(), name
    assert (out / "figures" / "accuracy_vs_mflops.png").is_file()
    assert (out / "figures" / "exit_fractions.png").is_file()
    assert (out / "checkpoints" / "seed0_plain.pt").is_file()
    assert "REINFORCE policy" in (out / "table.md").read_text()


@pytest.mark.slow
def test_cascade_metrics_contract(digits_cascade_run):
    m = json.loads((digits_cascade_run / "metrics.json").read_text())
    assert m["task"] == "digits" and m["num_stages"] == 3
    costs = m["stage_costs"]
    assert len(costs) == 3 and costs == sorted(costs) and costs[-1] >= 10 * costs[0]
    for k in range(3):
        assert 0 <= m["accuracy"][f"stage_{k}"] <= 1
        assert m["networks"][f"stage_{k}"]["mflops"] == costs[k]
    points = m["operating_points"]
    assert {p["method"] for p in points} == CASCADE_METHODS
    fields = {"mode", "method", "selection", "threshold_source", "threshold", "system_accuracy", "cost_mflops",
              "exit_fractions", "skipping_rate", "appeal_rate", "ad", "target_ad"}
    for p in points:
        assert fields <= set(p)
        assert len(p["exit_fractions"]) == 3 and sum(p["exit_fractions"]) == pytest.approx(1.0)
        assert p["skipping_rate"] + p["appeal_rate"] == pytest.approx(1.0)
    selections = {(p["method"], p["selection"]) for p in points}
    assert ("reinforce", "greedy") in selections and ("msp_cascade", "matched_cost") in selections


@pytest.mark.slow
def test_greedy_point_recomputed_from_samples_csv(digits_cascade_run):
    """samples.csv alone gives the greedy policy's numbers (plain numpy, no cascade code)."""
    out = digits_cascade_run
    m = json.loads((out / "metrics.json").read_text())
    s = pd.read_csv(out / "samples.csv")
    test = s[(s["seed"] == 0) & (s["split"] == "test")]
    g = next(p for p in m["operating_points"] if p["selection"] == "greedy")
    system = f"reinforce_a{g['alpha']:g}"
    costs = np.cumsum(m["system_stage_costs"][system])
    stop = np.stack([test[f"{system}_s{k}_score_reinforce"] >= m["greedy_threshold"] for k in range(2)], axis=1)
    exits = np.where(stop[:, 0], 0, np.where(stop[:, 1], 1, 2))
    right = np.stack([test[f"{system}_s{k}_correct"].to_numpy(bool) for k in range(3)], axis=1)
    assert g["system_accuracy"] == pytest.approx(right[np.arange(len(exits)), exits].mean())
    assert g["cost_mflops"] == pytest.approx(costs[exits].mean())
    assert g["exit_fractions"] == pytest.approx(np.bincount(exits, minlength=3) / len(exits))


@pytest.mark.slow
def test_two_stage_cascade_with_a_black_box_oracle(tmp_path):
    """K = 2 (one network, then the oracle): AppealNet's black-box setting on the same code path."""
    rc = main(["run", str(REPO / "configs" / "digits_cascade.yaml"), "--quick", "--quiet", "--out", str(tmp_path),
               "--set", "cascade.stages=[{name: mlp, hidden: [16]}]", "--set", "cascade.oracle=black_box",
               "--set", "cascade.oracle_mflops=0.5", "--set", "cascade.budgets=[0.1]"])
    assert rc == 0
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["num_stages"] == 2 and m["modes"] == ["black_box"]
    assert m["stage_costs"][-1] == 0.5 and m["accuracy"]["stage_1"] == 1.0
    for p in m["operating_points"]:
        assert p["ad"] == pytest.approx(1.0 - p["system_accuracy"])
        # AppealNet's Eq. 17: every input pays the network, the appealed ones the oracle too
        c0, c1 = m["variants"][p["method"]][0]["stage_mflops"]
        assert p["cost_mflops"] == pytest.approx(c0 + p["appeal_rate"] * c1)


def test_cascade_run_bad_override_exits_2(tmp_path, capsys):
    rc = main(["run", str(REPO / "configs" / "digits_cascade.yaml"), "--quick", "--out", str(tmp_path),
               "--set", "cascade.stages=[]"])
    assert rc == 2
    assert "cascade.stages" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(mnist_root() is None, reason="real MNIST not found ($CASCADE_DATA or ../shared/data)")
def test_mnist_cascade_quick(tmp_path, monkeypatch):
    monkeypatch.setenv("CASCADE_DATA", str(mnist_root()))
    rc = main(["run", str(REPO / "configs" / "mnist_cascade.yaml"), "--quick", "--quiet", "--out", str(tmp_path)])
    assert rc == 0
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["task"] == "mnist" and m["stage_costs"][-1] >= 10 * m["stage_costs"][0]
    assert m["accuracy"]["stage_2"] > 0.8


@pytest.mark.slow
def test_regression_cascade_on_synthetic_faces_quick(tmp_path, monkeypatch):
    """The same code path on regression: the policy reads features and coordinates."""
    monkeypatch.setenv("CASCADE_DATA", str(tmp_path / "data"))  # the synthetic faces are written here
    out = tmp_path / "out"
    rc = main(["run", str(REPO / "configs" / "keypoints_cascade.yaml"), "--quick", "--quiet", "--out", str(out)])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["task"] == "keypoints" and m["num_stages"] == 3
    assert {p["method"] for p in m["operating_points"]} == {
        "reinforce", "mc_dropout_cascade", "error_head_cascade", "appealnet_cascade"}
    samples = pd.read_csv(out / "samples.csv", nrows=5)
    assert "plain_s0_rmse" in samples.columns and "plain_s0_pred" not in samples.columns
