"""--quick runs of the cascade configs through the CLI (one pipeline for every K), and the
K-stage output contract: files, metrics.json, table.md, operating points recomputed from
samples.csv with plain numpy, and cascade.Router reading the run back."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from cascade.cli import main
from cascade.deploy.router import load_run_point
from cascade.evaluation import cascade_point, cascade_sweep, select_by_accuracy
from tests.conftest import REPO

METHODS = ["reinforce", "appealnet", "msp", "gap", "entropy"]  # configs/digits_cascade.yaml, in order
ALPHAS = [0.005, 0.01, 0.02, 0.05]
TARGETS = [0.0, 0.005, 0.01]
BUDGETS = [0.05, 0.1, 0.2, 0.5]


@pytest.fixture(scope="module")
def digits_cascade_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits_cascade")
    rc = main(["run", str(REPO / "configs" / "digits_cascade.yaml"), "--quick", "--quiet", "--out", str(out)])
    assert rc == 0
    return out


def _metrics(out) -> dict:
    return json.loads((out / "metrics.json").read_text())


def _test_split(out, seed: int = 0) -> pd.DataFrame:
    s = pd.read_csv(out / "samples.csv")
    return s[(s["seed"] == seed) & (s["split"] == "test")]


def _route(scores: np.ndarray, correct: np.ndarray, costs, t: float):
    """Plain numpy: each input exits at the first routed stage whose score is >= t, else
    at the last; accuracy, mean cumulative cost, exit fractions and the exits."""
    n, k = correct.shape
    stop = scores >= t
    tau = np.where(stop.any(axis=1), stop.argmax(axis=1), k - 1)
    return (correct[np.arange(n), tau].mean(), np.cumsum(costs)[tau].mean(), np.bincount(tau, minlength=k) / n, tau)


def _arrays(test: pd.DataFrame, v: dict):
    scores = np.stack([test[c].to_numpy(np.float64) for c in v["score_columns"]], axis=1)
    correct = np.stack([np.ones(len(test), bool) if c is None else test[c].to_numpy(bool)
                        for c in v["correct_columns"]], axis=1)
    return scores, correct


@pytest.mark.slow
def test_cascade_run_writes_contract_files(digits_cascade_run):
    out = digits_cascade_run
    for name in ("config.yaml", "metrics.json", "points.csv", "table.md", "table_full.md", "table.csv", "samples.csv",
                 "run.log"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert sorted(p.name for p in (out / "figures").iterdir()) == [
        "accuracy_vs_cost_white_box.png", "gap_closed.png", "score_histograms.png", "threshold_violations.png"]
    systems = [f"reinforce_a{a:g}_white_box" for a in ALPHAS] + ["appealnet_white_box"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == sorted(
        f"seed0_{n}.pt" for n in ["big", "stage0", "stage1", *systems])
    assert not list(out.rglob("*.tmp"))
    # run.log: one line per phase, each trained system's included
    log = (out / "run.log").read_text()
    for phase in ("seed 0 big", "seed 0 stage 0 pretrain", "seed 0 stage 1 pretrain", "seed 0 stage 0:",
                  "seed 0 reinforce white_box a0.005", "seed 0 appealnet white_box", "report"):
        assert f"phase {phase}" in log, phase
    # the K-stage report (cascade/report/tables.py): its networks, the recommendation, the
    # deployable points with their intervals; table_full.md: the target-AD tables and the
    # REINFORCE policies at their own greedy threshold
    md = (out / "table.md").read_text()
    full = (out / "table_full.md").read_text()
    assert md.startswith("# digits: 3-stage cascade, seeds [0]") and full.startswith(md.splitlines()[0])
    for line in ("| stage0 | 0.00118 | 1,210 |", "| stage1 |", "| big |",
                 "- reinforce_a0.005_white_box: routing heads add 224, 224 MACs and 482 params.",
                 "## Recommendation", "| reinforce | trained | guaranteed |",
                 "## White-box, paper comparison: thresholds tuned on test (optimistic)"):
        assert line in md, line
    for line in ("| stage0 | 0.00118 | 1,210 |",
                 "## White-box: mean cost in MFLOPs (MACs) at each accuracy-degradation target",
                 "## white-box: accuracy within a mean-cost budget", "## white-box: methods at their own threshold"):
        assert line in full, line
    for a in ALPHAS:
        assert f"| reinforce | a{a:g} | 0.500 |" in full
        assert f"| reinforce a{a:g} (" in full  # the others at that policy's cost
    # the tables are views of metrics.json
    from cascade.report import render_full, render_markdown, table_rows

    m = _metrics(out)
    assert md == render_markdown(m) + "\n" and full == render_full(m) + "\n"
    table = pd.read_csv(out / "table.csv")
    assert len(table) == len(m["operating_points"]) == len(table_rows(m))
    assert table["system_accuracy"].to_numpy() == pytest.approx([p["system_accuracy"] for p in m["operating_points"]])


@pytest.mark.slow
def test_cascade_metrics_contract(digits_cascade_run):
    m = _metrics(digits_cascade_run)
    assert m["task"] == "digits" and m["kind"] == "classification" and m["num_stages"] == 3
    assert m["modes"] == ["white_box"] and m["seeds"] == [0]
    nets = m["networks"]
    costs = [nets["stage0"]["mflops"], nets["stage1"]["mflops"], nets["big"]["mflops"]]
    assert costs == sorted(costs) and costs[-1] >= 10 * costs[0]
    # stage 0 is mlp hidden [16] on 8x8 digits, 10 classes: 64*16 + 16*10 = 1184 MACs, 1184 + 16 + 10 params
    assert nets["stage0"] == {"mflops": pytest.approx(1184e-6), "params": 1210}
    assert m["last_stage_mflops"] == {"white_box": nets["big"]["mflops"]}
    assert m["methods"] == {"reinforce": {"kind": "trained", "confidence_score": False},
                            "appealnet": {"kind": "trained", "confidence_score": False},
                            **{s: {"kind": "post_hoc", "confidence_score": True} for s in ("msp", "gap", "entropy")}}
    assert set(m["systems"]) == {f"reinforce_a{a:g}_white_box" for a in ALPHAS} | {"appealnet_white_box"}
    for name, system in m["systems"].items():
        # both heads read 10 (log-)probabilities and 3 confidence stats, hidden [16]:
        # 13*16 + 16*1 = 224 MACs and 241 params, one head after each routed stage
        assert system["head_mflops"] == [pytest.approx(224e-6)] * 2 and system["head_params"] == 2 * 241
        assert system["stage_mflops"] == pytest.approx([c + 224e-6 for c in costs[:2]])
        if system["method"] == "reinforce":
            assert name == f"reinforce_a{system['alpha']:g}_white_box" and system["variant"] == f"a{system['alpha']:g}"
    for net in ("stage0", "stage1", "big", *(f"{s}_stage{k}" for s in m["systems"] for k in range(2))):
        assert 0 <= m["accuracy"][net] <= 1, net
    assert m["predictor_collapsed"].keys() == m["systems"].keys()
    # variants: one per post-hoc method, one per trained system, each K = 3 stages
    variants = m["variants"]
    assert [v["method"] for v in variants] == ["reinforce"] * len(ALPHAS) + METHODS[1:]
    for v in variants:
        assert len(v["score_columns"]) == 2 and len(v["correct_columns"]) == 3 and len(v["stage_mflops"]) == 3
        assert v["correct_columns"][-1] == "big_correct" and v["stage_mflops"][-1] == costs[-1]
        assert v["fixed_threshold"] == (0.5 if v["method"] == "reinforce" else None)

    points = m["operating_points"]
    assert {p["method"] for p in points} == set(METHODS) | {"oracle"}  # the limit, on the plain stages
    fields = {"mode", "method", "selection", "threshold_source", "threshold", "system_accuracy", "cost_mflops",
              "relative_cost", "exit_fractions", "skipping_rate", "appeal_rate", "ad", "target_ad", "budget_fraction",
              "anchor", "variants", "feasible"}
    for p in points:
        assert fields <= set(p)
        assert len(p["exit_fractions"]) == 3 and sum(p["exit_fractions"]) == pytest.approx(1.0)
        assert p["skipping_rate"] + p["appeal_rate"] == pytest.approx(1.0)
        assert p["appeal_rate"] == pytest.approx(p["exit_fractions"][-1])
        assert p["relative_cost"] == pytest.approx(p["cost_mflops"] / costs[-1])
        assert p["ad"] == pytest.approx(m["accuracy"]["big"] - p["system_accuracy"])
    keys = [(p["method"], p["selection"], p["threshold_source"], p["target_ad"], p["budget_fraction"], p["anchor"])
            for p in points if p["selection"] != "appeal_budget"]  # those: tests/test_appeal_budgets.py
    anchors = [f"reinforce a{a:g}" for a in ALPHAS]
    expected = [(me, "target_ad", s, t, None, None) for me in METHODS for s in ("test", "val", "guaranteed")
                for t in TARGETS] + \
        [(me, "budget", s, None, b, None) for me in METHODS for s in ("test", "val") for b in BUDGETS] + \
        [("reinforce", "fixed", "fixed", None, None, f"a{a:g}") for a in ALPHAS] + \
        [(me, "matched_cost", s, None, None, an) for an in anchors for me in METHODS[1:] for s in ("test", "val")] + \
        [("oracle", "target_ad", "test", t, None, None) for t in TARGETS]
    assert sorted(keys, key=repr) == sorted(expected, key=repr)  # each point once
    assert {c["method"] for c in m["comparisons"]} == {"reinforce", "appealnet"}
    assert len(m["comparisons"]) == 2 * 3 * len(TARGETS)  # trained methods x sources x targets
    # the REINFORCE policies' Bonferroni-corrected guaranteed points are feasible, the fallback included
    assert all(p["feasible"] for p in points if p["threshold_source"] == "guaranteed")


@pytest.mark.slow
def test_fixed_and_matched_cost_points_recomputed_from_samples_csv(digits_cascade_run):
    """samples.csv alone gives each REINFORCE policy's greedy point, and every other method's
    most accurate point within that cost (plain numpy over every candidate threshold)."""
    out = digits_cascade_run
    m = _metrics(out)
    test = _test_split(out)
    by_key = {(v["method"], v["variant"]): v for v in m["variants"]}
    fixed = [p for p in m["operating_points"] if p["selection"] == "fixed"]
    assert len(fixed) == len(ALPHAS)
    for g in fixed:
        v = by_key[("reinforce", g["anchor"])]
        assert v["score_columns"] == [f"reinforce_{g['anchor']}_white_box_stage{k}_score" for k in range(2)]
        scores, correct = _arrays(test, v)
        acc, cost, exits, _ = _route(scores, correct, v["stage_mflops"], v["fixed_threshold"])
        assert g["threshold"] == v["fixed_threshold"] == 0.5
        assert g["system_accuracy"] == pytest.approx(acc)
        assert g["cost_mflops"] == pytest.approx(cost)
        assert g["exit_fractions"] == pytest.approx(exits.tolist())
        # the others at that cost, thresholds read off the test split
        for method in METHODS[1:]:
            q = next(p for p in m["operating_points"] if p["selection"] == "matched_cost" and p["method"] == method
                     and p["threshold_source"] == "test" and p["anchor"] == f"reinforce {g['anchor']}")
            assert q["target_mflops"] == pytest.approx(cost)
            sc, co = _arrays(test, by_key[(method, "")])
            candidates = np.append(np.unique(sc), np.inf)
            routed = [_route(sc, co, by_key[(method, "")]["stage_mflops"], t)[:2] for t in candidates]
            within = [(a, c) for a, c in routed if c <= cost + 1e-9]
            if within:
                best = max(a for a, _ in within)
                assert q["feasible"] and q["system_accuracy"] == pytest.approx(best)
                assert q["cost_mflops"] == pytest.approx(min(c for a, c in within if a == best))
            else:
                assert not q["feasible"]


@pytest.mark.slow
def test_target_ad_points_recomputed_from_samples_csv(digits_cascade_run):
    """Test-tuned target-AD points of a K = 3 cascade: the cheapest threshold within the AD
    target (the best of the four policies for REINFORCE), by brute force in numpy."""
    out = digits_cascade_run
    m = _metrics(out)
    test = _test_split(out)
    ref = test["big_correct"].mean()
    for p in m["operating_points"]:
        if p["selection"] != "target_ad" or p["threshold_source"] != "test" or p["method"] == "oracle":
            continue
        best = None
        for v in m["variants"]:
            if v["method"] != p["method"]:
                continue
            sc, co = _arrays(test, v)
            for t in np.append(np.unique(sc), np.inf):
                acc, cost, _, _ = _route(sc, co, v["stage_mflops"], t)
                if ref - acc <= p["target_ad"] + 1e-9 and (best is None or cost < best[1] - 1e-12):
                    best = (acc, cost)
        assert p["feasible"] and p["ad"] <= p["target_ad"] + 1e-9
        assert p["cost_mflops"] == pytest.approx(best[1]), (p["method"], p["target_ad"])


@pytest.mark.slow
def test_router_reads_a_reinforce_policy_back_from_the_run(digits_cascade_run):
    """cascade.Router.from_run rebuilds a REINFORCE cascade (stages, policy, big network)
    from checkpoints/ and the val-tuned threshold from points.csv; it routes the test split
    exactly as samples.csv says."""
    from cascade import Router
    from cascade.engine.tasks import build_task
    from cascade.config import load_config

    out = digits_cascade_run
    m = _metrics(out)
    router = Router.from_run(out, method="reinforce", target_ad=0.005, threshold_source="val")
    point = pd.read_csv(out / "points.csv").query(
        "method == 'reinforce' and selection == 'target_ad' and threshold_source == 'val' and target_ad == 0.005")
    assert len(point) == 1 and router.threshold == float(point["threshold"].iloc[0])
    assert router.num_stages == 3 and router.big is not None
    v = next(v for v in m["variants"] if v["method"] == "reinforce" and v["variant"] == point["variant"].iloc[0])
    test = _test_split(out)
    _, _, _, tau = _route(*_arrays(test, v), v["stage_mflops"], router.threshold)
    splits = build_task(load_config(out / "config.yaml")).build_splits(0)
    x = splits.test.tensors[0]
    routed = router(x)
    assert routed.exit_stage.tolist() == tau.tolist()
    pred = routed.output.argmax(-1).numpy()
    columns = [f"reinforce_{v['variant']}_white_box_stage0_pred", f"reinforce_{v['variant']}_white_box_stage1_pred",
               "big_pred"]
    expected = np.stack([test[c].to_numpy() for c in columns], axis=1)[np.arange(len(tau)), tau]
    assert (pred == expected).all()
    assert torch.equal(splits.test.tensors[1], torch.as_tensor(test["target"].to_numpy().copy()))


@pytest.mark.slow
def test_two_stage_cascade_with_a_black_box_oracle(tmp_path):
    """K = 2 (one network, then the oracle): AppealNet's black-box setting on the same code path."""
    rc = main(["run", str(REPO / "configs" / "digits_cascade.yaml"), "--quick", "--quiet", "--out", str(tmp_path),
               "--set", "stages=[{name: mlp, hidden: [16]}]", "--set", "modes=[black_box]",
               "--set", "oracle_mflops=0.5", "--set", "evaluation.budgets=[0.1]", "--set", "methods.0.alphas=[0.02]"])
    assert rc == 0
    m = _metrics(tmp_path)
    assert m["num_stages"] == 2 and m["modes"] == ["black_box"] and m["last_stage_mflops"] == {"black_box": 0.5}
    # no big network runs in black-box mode (the task's default big is only measured)
    assert "big" not in m["accuracy"] and not any(c.startswith("big_") for c in pd.read_csv(
        tmp_path / "samples.csv", nrows=1).columns)
    assert not (tmp_path / "checkpoints" / "seed0_big.pt").exists()
    variants = {(v["method"], v["variant"]): v for v in m["variants"]}
    for v in variants.values():
        assert v["correct_columns"][-1] is None and v["stage_mflops"][-1] == 0.5  # the oracle: always right
    test = _test_split(tmp_path)
    for p in m["operating_points"]:
        assert p["ad"] == pytest.approx(1.0 - p["system_accuracy"])
        if p["method"] == "oracle":
            continue
        # AppealNet's Eq. 17: every input pays the network, the appealed ones the oracle too
        c0, c1 = variants[(p["method"], p["variants"][0])]["stage_mflops"]
        assert p["cost_mflops"] == pytest.approx(c0 + p["appeal_rate"] * c1)
        # and the appeal rate is the share of test scores under the threshold
        v = variants[(p["method"], p["variants"][0])]
        assert p["appeal_rate"] == pytest.approx(np.mean(test[v["score_columns"][0]] < p["threshold"]))
    assert "| black-box oracle | 0.500 | | 100 % (by definition) |" in (tmp_path / "table.md").read_text()


def test_cascade_run_bad_override_exits_2(tmp_path, capsys):
    rc = main(["run", str(REPO / "configs" / "digits_cascade.yaml"), "--quick", "--out", str(tmp_path),
               "--set", "stages=[]"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "stages: List should have at least 1 item" in err and "(from --set stages=[])" in err
    assert "Traceback" not in err and not (tmp_path / "metrics.json").exists()


def test_old_cascade_override_gets_the_migration_error(tmp_path, capsys):
    rc = main(["run", str(REPO / "configs" / "digits_cascade.yaml"), "--quick", "--out", str(tmp_path),
               "--set", "cascade.oracle=black_box"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "cascade: a K-stage cascade is stages: [...]" in err and "Traceback" not in err


@pytest.mark.slow
def test_mnist_cascade_quick(tmp_path, monkeypatch, mnist_data):
    monkeypatch.setenv("CASCADE_DATA", str(mnist_data))
    # a few hundred training and calibration images (the test split is the official 10,000)
    sets = ["task.train_size=600", "task.cal_size=300", "big_train.epochs=3", "evaluation.violation_resplits=20"]
    rc = main(["run", str(REPO / "configs" / "mnist_cascade.yaml"), "--quick", "--quiet", "--out", str(tmp_path),
               *[a for s in sets for a in ("--set", s)]])
    assert rc == 0
    m = _metrics(tmp_path)
    assert m["task"] == "mnist" and m["num_stages"] == 3
    assert m["networks"]["big"]["mflops"] >= 10 * m["networks"]["stage0"]["mflops"]
    assert set(m["systems"]) == {"reinforce_a0.02_white_box", "appealnet_white_box"}  # quick: one alpha
    samples = pd.read_csv(tmp_path / "samples.csv")
    test, cal = samples[samples["split"] == "test"], samples[samples["split"] == "cal"]
    assert (len(test), len(cal)) == (10_000, 300)
    for net in ("big", "stage0", "stage1"):
        assert m["accuracy"][net] == pytest.approx(test[f"{net}_correct"].astype(bool).mean(), abs=1e-12)
    assert m["accuracy"]["big"] > 0.7, m["accuracy"]
    # msp's 3-stage point at AD 1 %, val threshold, from samples.csv: chosen on cal, measured on test
    (point,) = [p for p in m["operating_points"] if (p["method"], p["selection"], p["threshold_source"])
                == ("msp", "target_ad", "val") and p["target_ad"] == 0.01]
    cols = ["stage0_score_msp", "stage1_score_msp"], ["stage0_correct", "stage1_correct", "big_correct"]
    costs = [m["networks"][n]["mflops"] for n in ("stage0", "stage1", "big")]
    sel = select_by_accuracy([cascade_sweep(cal[cols[0]].to_numpy(np.float64), cal[cols[1]].to_numpy(bool), costs)],
                             300 * (cal["big_correct"].mean() - 0.01))
    got = cascade_point(sel.threshold, test[cols[0]].to_numpy(np.float64), test[cols[1]].to_numpy(bool), costs)
    assert point["threshold"] == sel.threshold
    assert point["system_accuracy"] == pytest.approx(got.system_accuracy, abs=1e-12)
    assert point["cost_mflops"] == pytest.approx(got.cost_mflops, rel=1e-9)


@pytest.mark.slow
def test_regression_cascade_on_synthetic_faces_quick(tmp_path, monkeypatch):
    """The same code path on regression: the policy reads features and coordinates."""
    monkeypatch.setenv("CASCADE_DATA", str(tmp_path / "data"))  # the synthetic faces are written here
    out = tmp_path / "out"
    rc = main(["run", str(REPO / "configs" / "keypoints_cascade.yaml"), "--quick", "--quiet", "--out", str(out)])
    assert rc == 0
    assert list((tmp_path / "data" / "synthetic_faces").glob("*.csv"))
    m = _metrics(out)
    assert m["task"] == "keypoints" and m["kind"] == "regression" and m["num_stages"] == 3
    assert {p["method"] for p in m["operating_points"]} == {"reinforce", "mc_dropout", "error_head", "appealnet",
                                                           "oracle"}
    assert m["methods"]["mc_dropout"] == {"kind": "post_hoc", "confidence_score": True}
    assert m["methods"]["reinforce"] == {"kind": "trained", "confidence_score": False}
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["methods"][0]["policy"]["inputs"] == ["features", "output"]
    samples = pd.read_csv(out / "samples.csv")
    # regression: each network's RMSE next to its correctness, and no class prediction
    for net in ("big", "stage0", "stage1", "reinforce_a0.05_white_box_stage0", "appealnet_white_box_stage1"):
        assert {f"{net}_correct", f"{net}_rmse"} <= set(samples.columns), net
        assert f"{net}_pred" not in samples.columns
        assert (samples[f"{net}_correct"] == (samples[f"{net}_rmse"] < 4.0)).all()
        test = samples[samples["split"] == "test"]
        assert m["errors"][net]["rmse"] == pytest.approx(test[f"{net}_rmse"].mean())
    assert "| mean rmse |" in (out / "table.md").read_text()
    # Router.from_run fits error_head again, per stage, exactly as the run did (the stage's
    # own data order and no mode for a mode-independent scorer): its scores are the run's
    point = load_run_point(out, method="error_head", mode="white_box", target_ad=0.01)
    x = torch.stack([point.task.build_splits(0).test[i][0] for i in range(len(test))])
    for k, stage in enumerate(point.router.stages):
        with torch.no_grad():
            q = stage(x).q.double().numpy()
        np.testing.assert_allclose(q, test[f"stage{k}_score_error_head"].to_numpy(), rtol=1e-5, atol=1e-6)
