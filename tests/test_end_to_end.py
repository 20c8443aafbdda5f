"""A --quick run of the default experiment through the CLI, and the output contract:
every file of the run folder, every operating point recomputed from samples.csv alone,
the run log's phase lines, atomic writes, and the router reading a finished run."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from scipy.stats import binom

from tests.conftest import REPO

SEEDS = [0, 1]
BUDGETS = [0.3, 0.6]  # fractions of the big side's cost: exercises the budget selection too
APPEAL_BUDGETS = [0.05, 0.1, 0.2, 0.3]  # evaluation.appeal_budgets' default: fractions of inputs reaching the big side
WB_TARGETS = [0.0, 0.001, 0.005, 0.01]  # configs/digits.yaml
BB_TARGETS = [0.005, 0.01, 0.02, 0.05]
METHODS = ["appealnet", "msp", "gap", "entropy", "msp_ts", "doctor", "energy", "deferral_head"]
DELTA = 0.1  # evaluation.delta's default


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    # two seeds so that the *_std fields and the per-seed grouping are exercised; one
    # torch thread, much the faster for networks this small on shared cores
    proc = subprocess.run(
        [sys.executable, "-m", "cascade", "run", "configs/digits.yaml", "--quick", "--out", str(out),
         "--set", f"seeds={SEEDS}", "--set", f"evaluation.budgets={BUDGETS}", "--set", "threads=1"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return out, proc


def _metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def test_run_writes_contract_files(digits_run):
    out, proc = digits_run
    for name in ("config.yaml", "metrics.json", "points.csv", "samples.csv", "table.md", "table_full.md", "table.csv",
                 "run.log"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert sorted(p.name for p in (out / "figures").iterdir()) == [
        "accuracy_vs_cost_black_box.png", "accuracy_vs_cost_white_box.png", "gap_closed.png", "score_histograms.png",
        "threshold_violations.png"]
    # the final weights of every network: big, the plain routed stage, each trained system
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == sorted(
        f"seed{s}_{n}.pt" for s in SEEDS for n in ("big", "stage0", "appealnet_white_box", "appealnet_black_box"))
    assert not list(out.rglob("*.tmp"))  # no temporary file left behind
    assert "White-box" in proc.stdout and "Black-box" in proc.stdout
    # config.yaml is the config as run: valid, every default and every method option spelled out
    from cascade.config import validate

    cfg = validate(yaml.safe_load((out / "config.yaml").read_text()))
    assert cfg.seeds == SEEDS and cfg.evaluation.budgets == BUDGETS and cfg.pretrain.epochs == 2
    assert [m.name for m in cfg.methods] == METHODS
    assert cfg.methods[0].options()["predictor"]["inputs"] == ["sorted_probs", "confidence"]
    assert cfg.methods[0].options()["lambda"]["budget"] == 0.5
    # the tables are views of the metrics
    m = _metrics(out)
    table = pd.read_csv(out / "table.csv")
    assert len(table) == len(m["operating_points"])
    assert table["system_accuracy"].to_numpy() == pytest.approx([p["system_accuracy"] for p in m["operating_points"]])
    assert (out / "table.md").read_text().startswith("# digits: 2-stage cascade, seeds [0, 1]")


def test_metrics_contract(digits_run):
    m = _metrics(digits_run[0])
    assert m["task"] == "digits" and m["kind"] == "classification" and m["seeds"] == SEEDS
    assert m["modes"] == ["white_box", "black_box"] and m["num_stages"] == 2
    scores = {"msp", "gap", "entropy", "msp_ts", "doctor", "energy"}  # deferral_head is fitted: not a confidence score
    assert m["methods"] == {"appealnet": {"kind": "trained", "confidence_score": False},
                            **{name: {"kind": "post_hoc", "confidence_score": name in scores} for name in METHODS[1:]}}
    for net in ("stage0", "big"):
        assert set(m["networks"][net]) >= {"mflops", "params"}
    assert m["networks"]["big"]["mflops"] >= 10 * m["networks"]["stage0"]["mflops"]
    # black-box: the big's cost stands for the oracle's (the config sets no oracle_mflops)
    assert m["last_stage_mflops"] == {"white_box": m["networks"]["big"]["mflops"],
                                      "black_box": m["networks"]["big"]["mflops"]}
    # each network's accuracy: the mean over seeds of its test accuracy in samples.csv (std ddof=1)
    samples = pd.read_csv(digits_run[0] / "samples.csv")
    per_seed = samples[samples["split"] == "test"].groupby("seed")
    for net in ("big", "stage0", "appealnet_white_box_stage0", "appealnet_black_box_stage0"):
        accs = [float(g[f"{net}_correct"].astype(bool).mean()) for _, g in per_seed]
        assert len(accs) == len(SEEDS)
        assert m["accuracy"][net] == pytest.approx(np.mean(accs), abs=1e-12)
        assert m["accuracy_std"][net] == pytest.approx(np.std(accs, ddof=1), abs=1e-12)
    assert m["accuracy"]["big"] > 0.6  # 10 digits, chance 0.1: 0.72 after this --quick training
    assert set(m["systems"]) == {"appealnet_white_box", "appealnet_black_box"}
    assert m["predictor_collapsed"] == {"appealnet_white_box": [], "appealnet_black_box": []}
    assert {(v["mode"], v["method"]) for v in m["variants"]} == {(mo, me) for mo in m["modes"] for me in METHODS}

    fields = {"mode", "method", "selection", "threshold_source", "target_ad", "budget_fraction", "threshold",
              "skipping_rate", "appeal_rate", "system_accuracy", "ad", "cost_mflops", "relative_cost",
              "exit_fractions", "variants", "feasible", "skipping_rate_std", "system_accuracy_std", "delta"}
    points = m["operating_points"]
    assert all(fields <= set(p) for p in points)
    keys = sorted((p["mode"], p["method"], p["selection"], p["threshold_source"], _value(p)[1]) for p in points)
    expected = sorted((mode, method, "target_ad", source, t) for mode, targets in (("white_box", WB_TARGETS),
                                                                                 ("black_box", BB_TARGETS))
                      for method in METHODS for source in ("test", "val", "guaranteed") for t in targets) + \
        sorted((mode, method, "budget", source, b) for mode in m["modes"] for method in METHODS
               for source in ("test", "val") for b in BUDGETS) + \
        sorted((mode, "oracle", "target_ad", "test", t) for mode, targets in (("white_box", WB_TARGETS),
                                                                             ("black_box", BB_TARGETS)) for t in targets) + \
        sorted((mode, method, "appeal_budget", source, b) for mode in m["modes"] for method in METHODS
               for source in ("test", "val") for b in APPEAL_BUDGETS) + \
        sorted((mode, "oracle", "appeal_budget", "test", b) for mode in m["modes"] for b in APPEAL_BUDGETS)
    assert keys == sorted(expected)  # each point once; targets are fractions, not percents
    for p in points:
        assert p["skipping_rate"] + p["appeal_rate"] == pytest.approx(1.0)
        assert sum(p["exit_fractions"]) == pytest.approx(1.0) and p["appeal_rate"] == pytest.approx(p["exit_fractions"][-1])
        assert p["relative_cost"] == pytest.approx(p["cost_mflops"] / m["networks"]["big"]["mflops"])
        assert len(p["variants"]) == len(SEEDS)
    assert all((p["delta"] == 0.1) == (p["threshold_source"] == "guaranteed") for p in points)
    # one comparison per trained method, mode, source and target, against the best post-hoc one
    assert len(m["comparisons"]) == 3 * (len(WB_TARGETS) + len(BB_TARGETS))
    # how often val and guaranteed thresholds miss on re-splits: per mode, method, target, source
    assert len(m["threshold_violations"]) == 2 * len(METHODS) * (len(WB_TARGETS) + len(BB_TARGETS))
    for c in m["comparisons"]:
        assert c["method"] == "appealnet" and c["best_post_hoc"] in METHODS[1:]


def test_network_and_head_costs_reported(digits_run):
    m = _metrics(digits_run[0])
    little = m["networks"]["stage0"]
    # mlp, hidden [32], on 8x8 inputs, 10 classes: 64*32 + 32*10 = 2368 MACs, 2368 + 32 + 10 parameters
    assert little == {"mflops": pytest.approx(2368e-6), "params": 2410}
    for name, system in m["systems"].items():
        assert system["method"] == "appealnet" and name == f"appealnet_{system['mode']}"
        # the predictor head reads sorted_probs (10) and confidence (3), hidden [16]:
        # 13*16 + 16*1 = 224 MACs and 224 + 16 + 1 = 241 parameters
        assert system["head_mflops"] == [pytest.approx(224e-6)] and system["head_params"] == 241
        assert system["stage_mflops"] == [pytest.approx(little["mflops"] + 224e-6)]
        assert system["params"] == little["params"] + 241


# ============================================================================ recomputed from samples.csv


def _value(p: dict) -> tuple[str, float]:
    """The column that names a point's constraint, and its value."""
    column = {"target_ad": "target_ad", "appeal_budget": "appeal_budget"}.get(p["selection"], "budget_fraction")
    return column, p[column]


def _route(scores: np.ndarray, correct: np.ndarray, costs: np.ndarray, t: float) -> tuple[float, float, np.ndarray]:
    """Accuracy, mean cost and exit fractions at threshold ``t``: each input exits at the
    first routed stage whose score is >= t, else at the last stage."""
    n, k = correct.shape
    stop = scores >= t
    tau = np.where(stop.any(axis=1), stop.argmax(axis=1), k - 1)
    return correct[np.arange(n), tau].mean(), np.cumsum(costs)[tau].mean(), np.bincount(tau, minlength=k) / n


def _brute_force_point(cal, test, costs, selection: str, value: float, source: str) -> dict:
    """Try every distinct score (and one above them all) as the threshold on the selection
    split; pick by the rule; apply the pick to the test split. No cascade code."""
    scores, correct = cal if source in ("val", "guaranteed") else test
    n = len(correct)
    ref = correct[:, -1].mean()
    candidates = np.append(np.unique(scores), np.nextafter(scores.max(), np.inf))
    acc, cost, appeal = np.array([(a, c, e[-1]) for a, c, e in (_route(scores, correct, costs, t)
                                                                 for t in candidates)]).T
    if source == "guaranteed":  # Learn then Test: from the highest threshold down, while the
        # binomial p-value of "more than the target of inputs stop early, wrong, where the
        # last stage is right" stays within delta; nothing certified: everything to the last stage
        t, ok = np.inf, np.ones(1, bool)
        for c in candidates[::-1]:
            losses = ((scores[:, 0] >= c) & ~correct[:, 0] & correct[:, 1]).sum()
            if binom.cdf(losses, n, value) > DELTA:
                break
            t = c
    else:
        if selection == "target_ad":  # the cheapest point within the AD target; else the most accurate
            ok = acc * n >= n * (ref - value) - 1e-9
            order = np.lexsort((-acc, cost)) if ok.any() else np.lexsort((cost, -acc))
        elif selection == "appeal_budget":  # the most accurate point with at most `value` of the inputs
            # reaching the last stage, ties to fewer of them, then the cheaper
            ok = appeal * n <= value * n + 1e-9
            order = np.lexsort((cost, appeal, -acc))
        else:  # budget: the most accurate point within the budget; else the cheapest
            ok = cost <= value * costs[-1] + 1e-9
            order = np.lexsort((cost, -acc)) if ok.any() else np.argsort(cost, kind="stable")
        best = next(i for i in order if ok[i]) if ok.any() else order[0]
        t = candidates[best]
    acc, cost, exits = _route(*test, costs, t)
    return {"threshold": t, "system_accuracy": acc, "cost_mflops": cost, "ad": test[1][:, -1].mean() - acc,
            "skipping_rate": 1 - exits[-1], "appeal_rate": exits[-1], "exit_fractions": exits,
            "relative_cost": cost / costs[-1], "feasible": bool(ok.any())}


def _arrays(frame: pd.DataFrame, variant: dict) -> tuple[np.ndarray, np.ndarray]:
    scores = np.stack([frame[c].to_numpy(np.float64) for c in variant["score_columns"]], axis=1)
    correct = np.stack([np.ones(len(frame), bool) if c is None else frame[c].to_numpy(bool)
                        for c in variant["correct_columns"]], axis=1)  # None: the black-box oracle, always right
    return scores, correct


def test_operating_points_recomputed_from_samples_csv(digits_run):
    out = digits_run[0]
    m = _metrics(out)
    s = pd.read_csv(out / "samples.csv")  # plain pandas: what any reader gets
    assert {"seed", "split", "index", "target", "big_correct", "stage0_correct", "stage0_score_msp",
            "stage0_score_gap", "stage0_score_entropy", "appealnet_white_box_stage0_score",
            "appealnet_black_box_stage0_correct"} <= set(s.columns)
    assert set(s["split"]) == {"cal", "test"} and sorted(s["seed"].unique()) == SEEDS
    per_seed = pd.read_csv(out / "points.csv", keep_default_na=False, na_values=[""])
    assert len(per_seed) == len(SEEDS) * len(m["operating_points"])
    checked = 0
    for p in m["operating_points"]:
        if p["method"] == "oracle":  # the limit reads correctness columns, no score column (test_baselines_and_limits)
            continue
        (variant,) = [v for v in m["variants"] if (v["mode"], v["method"]) == (p["mode"], p["method"])]
        column, value = _value(p)
        ours = []
        for seed in SEEDS:
            parts = {split: _arrays(s[(s["seed"] == seed) & (s["split"] == split)], variant) for split in ("cal", "test")}
            mine = _brute_force_point(parts["cal"], parts["test"], np.array(variant["stage_mflops"]), p["selection"],
                                      value, p["threshold_source"])
            (row,) = per_seed[(per_seed["seed"] == seed) & (per_seed["mode"] == p["mode"])
                              & (per_seed["method"] == p["method"]) & (per_seed["selection"] == p["selection"])
                              & (per_seed["threshold_source"] == p["threshold_source"])
                              & np.isclose(per_seed[column], value, rtol=0, atol=1e-12)].to_dict("records")
            for key in ("system_accuracy", "skipping_rate", "appeal_rate", "ad"):
                assert row[key] == pytest.approx(mine[key], abs=1e-12), (seed, p, key)
            for key in ("cost_mflops", "relative_cost"):
                assert row[key] == pytest.approx(mine[key], rel=1e-9), (seed, p, key)
            assert float(row["threshold"]) == mine["threshold"], (seed, p)  # float64 scores round-trip exactly
            exits = [float(f) for f in row["exit_fractions"].split(";")]  # written with 6 significant digits
            assert exits == pytest.approx(mine["exit_fractions"].tolist(), rel=1e-5), (seed, p)
            assert bool(row["feasible"]) == mine["feasible"]
            ours.append(mine)
        for key in ("system_accuracy", "skipping_rate", "appeal_rate", "ad", "cost_mflops", "relative_cost"):
            values = [o[key] for o in ours]
            assert p[key] == pytest.approx(np.mean(values), abs=1e-9), (p, key)
            assert p[f"{key}_std"] == pytest.approx(np.std(values, ddof=1), abs=1e-9), (p, key)
        assert p["exit_fractions"] == pytest.approx(np.mean([o["exit_fractions"] for o in ours], axis=0).tolist())
        assert p["feasible"] == all(o["feasible"] for o in ours)
        checked += 1
    assert checked == 2 * len(METHODS) * (3 * 4 + 2 * len(BUDGETS) + 2 * len(APPEAL_BUDGETS))


# ============================================================================ run.log


_PHASE = re.compile(r"^\S+ \S+ INFO phase (?P<name>.+?): (?P<seconds>\d+\.\d+) s(?: \((?P<facts>.*)\))?$")


def _phase_lines(log: str) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for line in log.splitlines():
        found = _PHASE.match(line)
        if found:
            facts = dict(f.split(" ", 1) for f in found["facts"].split(", ")) if found["facts"] else {}
            out.setdefault(found["name"], []).append({"seconds": float(found["seconds"]), **facts})
    return out


def test_run_log_has_one_phase_line_per_training_phase(digits_run):
    phases = _phase_lines((digits_run[0] / "run.log").read_text())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # digits: 1797 inputs, 30 % test (540) and 20 % calibration (360) leave 897 to train
    # on; batches of 64, the ragged last one dropped: 897 // 64 = 14 steps an epoch.
    # --quick: big_train and pretrain 2 epochs, finetune (the plain little and AppealNet) 1
    steps = {"big": 28, "little pretrain": 28, "little": 14, "appealnet white_box": 14, "appealnet black_box": 14}
    training = {name: facts for name, facts in phases.items() if "steps" in facts[0]}
    assert sorted(training) == sorted(f"seed {seed} {phase}" for seed in SEEDS for phase in steps)
    for name, lines in training.items():
        (line,) = lines  # one line per phase
        phase = name.split(" ", 2)[2]
        assert line == {"seconds": line["seconds"], "device": device, "samples": "897",
                        "epochs": str(steps[phase] // 14), "steps": str(steps[phase])}, name
        assert line["seconds"] > 0
    for seed in SEEDS:  # the other phases: the checks and the evaluation of each split
        assert len(phases[f"seed {seed} checks"]) == 1
        assert phases[f"seed {seed} evaluate cal"][0]["samples"] == "360"
        assert phases[f"seed {seed} evaluate test"][0]["samples"] == "540"
    assert len(phases["report"]) == 1


# ============================================================================ atomic writes

TINY = """\
task: {name: digits}
seeds: [0]
threads: 1
little: {name: mlp, hidden: [8]}
big: {name: cnn, channels: [4, 8], hidden: 16}
big_train: {epochs: 1, batch_size: 128, lr: 0.003}
pretrain: {epochs: 1, batch_size: 128, lr: 0.003}
finetune: {epochs: 1, batch_size: 128, lr: 0.003}
methods: [appealnet, msp]
"""


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def test_every_output_file_is_written_to_a_temporary_name_and_renamed(tmp_path, monkeypatch, capsys):
    import cascade.core.files
    from cascade.cli import main

    renames: list[tuple[Path, Path]] = []
    real_replace = cascade.core.files.os.replace

    def recording_replace(src, dst):
        renames.append((Path(src), Path(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(cascade.training.checkpoint.os, "replace", recording_replace)
    (tmp_path / "tiny.yaml").write_text(TINY)
    out = tmp_path / "out"
    assert main(["run", str(tmp_path / "tiny.yaml"), "--out", str(out), "--quiet"]) == 0
    # (the network cache is written the same way, into its own folder)
    written = {str(dst.relative_to(out)) for _, dst in renames if dst.exists() and dst.is_relative_to(out)}
    for name in ("config.yaml", "samples.csv", "points.csv", "metrics.json", "table.md", "table_full.md", "table.csv"):
        assert name in written, name
    # every file of the folder but the log (appended to line by line) arrived by a rename
    assert _files(out) - {"run.log"} == written
    for src, dst in renames:  # from a temporary file beside it: a rename within one file system
        assert src.parent == dst.parent and src.name.startswith(f".{dst.name}.") and src.name.endswith(".tmp")
        assert not src.exists()
    # the resumable training checkpoints went the same way, and were cleared at the end
    assert any(dst.parent.name == "resume" for _, dst in renames) and not (out / "checkpoints" / "resume").exists()


def test_a_write_that_fails_leaves_no_partial_file(tmp_path, monkeypatch, capsys):
    from cascade.cli import main

    (tmp_path / "tiny.yaml").write_text(TINY)
    out = tmp_path / "out"
    assert main(["run", str(tmp_path / "tiny.yaml"), "--out", str(out), "--quiet"]) == 0
    before = {name: (out / name).read_bytes() for name in ("points.csv", "metrics.json")}
    capsys.readouterr()

    real_to_csv = pd.DataFrame.to_csv

    def disk_full_midway(self, path=None, *args, **kwargs):
        if path is not None and ".points.csv." in str(path):  # half of points.csv, then the disk is full
            Path(path).write_text(real_to_csv(self, None, *args, **kwargs)[:100])
            raise OSError(28, "No space left on device", str(path))
        return real_to_csv(self, path, *args, **kwargs)

    monkeypatch.setattr(pd.DataFrame, "to_csv", disk_full_midway)
    # the same run again over the finished one: it fails while writing points.csv
    assert main(["run", str(tmp_path / "tiny.yaml"), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1 and "No space left on device" in err
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    # the earlier run's files are whole: the failed write never touched points.csv
    assert {name: (out / name).read_bytes() for name in before} == before
    assert len(pd.read_csv(out / "samples.csv")) == 360 + 540  # written (whole) before the failure


# ============================================================================ the router


def _digits_test_split(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    from tasks.digits import DigitsTask

    return DigitsTask(DigitsTask.Options(cal_fraction=0.2, test_fraction=0.3)).build_splits(seed).test.tensors


@pytest.mark.parametrize("method, mode, target, source", [
    ("appealnet", "white_box", 0.01, "val"), ("msp", "white_box", 0.0, "test"), ("entropy", "black_box", 0.02, "val")])
def test_router_from_run_takes_the_runs_threshold(digits_run, method, mode, target, source):
    from cascade import Router

    out = digits_run[0]
    router = Router.from_run(out, method=method, mode=mode, target_ad=target, threshold_source=source, seed=1)
    points = pd.read_csv(out / "points.csv")
    (point,) = points[(points["seed"] == 1) & (points["mode"] == mode) & (points["method"] == method)
                      & (points["selection"] == "target_ad") & (points["threshold_source"] == source)
                      & np.isclose(points["target_ad"], target, rtol=0, atol=1e-12)].to_dict("records")
    assert router.threshold == point["threshold"]
    assert router.num_stages == 2 and (router.big is None) == (mode == "black_box")
    # defaults: the run's first trained method, first mode, first seed, val threshold at AD 0.5 %
    default = Router.from_run(out)
    (point,) = points[(points["seed"] == 0) & (points["mode"] == "white_box") & (points["method"] == "appealnet")
                      & (points["selection"] == "target_ad") & (points["threshold_source"] == "val")
                      & np.isclose(points["target_ad"], 0.005, rtol=0, atol=1e-12)].to_dict("records")
    assert default.threshold == point["threshold"]


@pytest.mark.parametrize("seed", SEEDS)
def test_router_reproduces_every_operating_point_of_the_run(digits_run, seed):
    """Each method's router, at each of the seed's thresholds, keeps the inputs the run
    kept and answers as the run counted: its appeal rate and accuracy are the point's."""
    from cascade import Router

    out = digits_run[0]
    x, y = _digits_test_split(seed)
    s = pd.read_csv(out / "samples.csv")
    s = s[(s["seed"] == seed) & (s["split"] == "test")]
    points = pd.read_csv(out / "points.csv")
    points = points[(points["seed"] == seed) & (points["method"] != "oracle")]  # the limit has no router
    checked = 0
    for mode in ("white_box", "black_box"):
        last = s["big_correct"].to_numpy(bool) if mode == "white_box" else np.ones(len(s), bool)
        for method in METHODS:
            router = Router.from_run(out, method=method, mode=mode, seed=seed)
            system = f"appealnet_{mode}_stage0" if method == "appealnet" else "stage0"
            # the scores are float64 values, which samples.csv round-trips exactly
            # deferral_head scores per mode (it learns where the next stage is right)
            key = f"{method}_{mode}" if method == "deferral_head" else method
            column = f"{system}_score" if method == "appealnet" else f"stage0_score_{key}"
            score = s[column].to_numpy(np.float64)
            routed_at = {}  # threshold -> routed output (points often share a threshold)
            for point in points[(points["mode"] == mode) & (points["method"] == method)].to_dict("records"):
                if point["threshold"] not in routed_at:
                    router.threshold = point["threshold"]
                    routed_at[point["threshold"]] = router(x)
                routed = routed_at[point["threshold"]]
                keep = score >= point["threshold"]
                assert routed.kept.numpy().tolist() == keep.tolist(), point
                assert 1 - keep.mean() == pytest.approx(point["appeal_rate"], abs=1e-12), point
                assert routed.appeal_rate == pytest.approx(point["appeal_rate"], abs=1e-6)  # a float32 mean
                # the routed stage's answers where kept, the big network's (or the oracle's) elsewhere
                got = (routed.output.argmax(-1) == y).numpy()
                if mode == "black_box":
                    assert torch.isnan(routed.output[~routed.kept]).all()  # the caller asks the oracle for these
                    got = np.where(keep, got, True)
                assert got.tolist() == np.where(keep, s[f"{system}_correct"].to_numpy(bool), last).tolist()
                assert got.mean() == pytest.approx(point["system_accuracy"], abs=1e-12), point
                checked += 1
    assert checked == len(points) == 2 * len(METHODS) * (3 * 4 + 2 * len(BUDGETS) + 2 * len(APPEAL_BUDGETS))


# ============================================================================ MNIST


#: a few hundred training and calibration images (the test split is the official 10,000)
MNIST_FEW = ["task.train_size=600", "task.cal_size=300", "big_train.epochs=3", "pretrain.epochs=2",
             "evaluation.violation_resplits=20", "threads=1"]


def test_mnist_quick_run(tmp_path, mnist_data):
    from cascade.cli import main
    from cascade.evaluation import cascade_point, cascade_sweep, select_by_accuracy

    sets = [f"task.data_root={mnist_data}", *MNIST_FEW]
    assert main(["run", str(REPO / "configs" / "mnist.yaml"), "--quick", "--quiet", "--out", str(tmp_path),
                 *[a for s in sets for a in ("--set", s)]]) == 0
    m = _metrics(tmp_path)
    samples = pd.read_csv(tmp_path / "samples.csv")
    test, cal = samples[samples["split"] == "test"], samples[samples["split"] == "cal"]
    assert m["task"] == "mnist" and (len(test), len(cal)) == (10_000, 300)
    for net in ("big", "stage0", "appealnet_white_box_stage0"):
        assert m["accuracy"][net] == pytest.approx(test[f"{net}_correct"].astype(bool).mean(), abs=1e-12)
    assert m["accuracy"]["big"] > 0.7, m["accuracy"]  # 10 digits, 600 images, 3 epochs: 0.79 here
    # msp's white-box point at AD 1 %, val threshold: chosen on cal, measured on test, from samples.csv
    (point,) = [p for p in m["operating_points"] if (p["mode"], p["method"], p["selection"], p["threshold_source"])
                == ("white_box", "msp", "target_ad", "val") and p["target_ad"] == 0.01]
    arrays = {name: (part[["stage0_score_msp"]].to_numpy(np.float64),
                     part[["stage0_correct", "big_correct"]].to_numpy(bool)) for name, part in (("cal", cal),
                                                                                               ("test", test))}
    costs = (m["networks"]["stage0"]["mflops"], m["networks"]["big"]["mflops"])
    sel = select_by_accuracy([cascade_sweep(*arrays["cal"], costs)], 300 * (cal["big_correct"].mean() - 0.01))
    got = cascade_point(sel.threshold, *arrays["test"], costs)
    assert point["threshold"] == sel.threshold
    assert point["system_accuracy"] == pytest.approx(got.system_accuracy, abs=1e-12)
    assert point["ad"] == pytest.approx(test["big_correct"].mean() - got.system_accuracy, abs=1e-12)


def test_mnist_missing_data_root_is_one_line_error(tmp_path, capsys):
    from cascade.cli import main

    code = main(["run", str(REPO / "configs" / "mnist.yaml"), "--quick", "--out", str(tmp_path / "o"),
                 "--set", f"task.data_root={tmp_path / 'nowhere'}"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.startswith("error: ") and err.count("\n") == 1 and f"{tmp_path / 'nowhere'}: no such folder" in err
    assert not (tmp_path / "o").exists()  # found before any work
