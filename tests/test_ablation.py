"""The ablation script: its summary against a hand-worked example, and a --quick run."""

import importlib.util
import json
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO


def _ablation():
    spec = importlib.util.spec_from_file_location("ablation", REPO / "benchmarks" / "ablation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _point(mode, method, source, target, cost, appeal=0.5, selection="target_ad"):
    return {"mode": mode, "method": method, "selection": selection, "threshold_source": source, "target_ad": target,
            "cost_mflops": cost, "appeal_rate": appeal, "ad": 0.0}


def test_summary_is_best_post_hoc_over_each_variant_with_the_gap_closed():
    # white-box, val, two trained variants against msp / gap, oracle (test) 1.0 at both targets:
    #   t=0:    an_a 2.0, best post-hoc min(3.0, 4.0) = 3.0 -> 1.5, gap (3 - 2) / (3 - 1) = 0.5
    #   t=0.01: an_a 1.0, best min(0.5, 2.0) = 0.5 -> 0.5, no gap (the best is under the oracle)
    #   an_b costs 3.0 everywhere -> 1.0 and 1/6; the oracle row is no method's rival
    pts = []
    for t, a, bases in ((0.0, 2.0, (3.0, 4.0)), (0.01, 1.0, (0.5, 2.0))):
        pts += [_point("white_box", "an_a", "val", t, a), _point("white_box", "an_b", "val", t, 3.0),
                _point("white_box", "oracle", "test", t, 1.0)]
        pts += [_point("white_box", name, "val", t, c) for name, c in zip(("msp", "gap"), bases)]
    # black-box: at 0.05 the best baseline appeals nothing (ratio 0): left out of mean and min
    for t, a, best in ((0.02, 0.2, 0.3), (0.05, 0.01, 0.0)):
        pts.append(_point("black_box", "an_a", "val", t, 9.0, appeal=a))
        pts += [_point("black_box", name, "val", t, 1.0, appeal=v) for name, v in (("msp", best), ("gap", 0.5))]
    metrics = {"modes": ["white_box", "black_box"], "operating_points": pts,
               "methods": {"an_a": {"kind": "trained"}, "an_b": {"kind": "trained"},
                           "msp": {"kind": "post_hoc"}, "gap": {"kind": "post_hoc"}}}
    rows = {(r["mode"], r["method"]): r for r in _ablation().summarize(metrics)}
    a = rows[("white_box", "an_a")]
    assert a["ratios"] == {"0": pytest.approx(1.5), "0.01": pytest.approx(0.5)}
    assert a["mean_ratio"] == pytest.approx(1.0) and a["min_ratio"] == pytest.approx(0.5)
    assert a["mean_gap_closed"] == pytest.approx(0.5) and a["best_baselines"] == {"0": "msp", "0.01": "msp"}
    b = rows[("black_box", "an_a")]
    assert b["ratios"] == {"0.02": pytest.approx(1.5), "0.05": 0.0} and b["mean_ratio"] == pytest.approx(1.5)
    assert ("black_box", "an_b") not in rows  # no black-box points


def test_variants_and_settings_are_valid_configs():
    from cascade.config import load_config

    ablation = _ablation()
    methods = json.dumps(ablation.methods_for(list(ablation.VARIANTS)))
    for setting, overrides in ablation.SETTINGS.items():
        cfg = load_config(REPO / "configs" / "digits.yaml", [f"methods={methods}", *overrides])
        labels = [m.options().get("label") or m.name for m in cfg.methods]
        assert labels == [f"an_{v}" for v in ablation.VARIANTS] + ablation.BASELINES
    cfg = load_config(REPO / "configs" / "digits.yaml", ablation.SETTINGS["specialist"])
    assert cfg.perturb.big_classes == [0, 1, 2, 3, 4]


def _phases(log: str) -> dict[str, str]:
    """``phase name -> its facts`` of a run.log."""
    return {m[1]: m[2] for m in re.finditer(r"INFO phase (.+?): [\d.]+ s(?: \((.*)\))?$", log, re.M)}


def test_ablation_quick_run_shares_the_trained_weights(tmp_path):
    proc = subprocess.run(
        [sys.executable, "benchmarks/ablation.py", "configs/digits.yaml", "--quick", "--settings", "base,holdout",
         "--variants", "paper,probs_error", "--out", str(tmp_path), "--set", "threads=1",
         "--set", "evaluation.violation_resplits=0"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    for setting in ("base", "holdout"):
        for variant in ("paper", "probs_error"):
            for mode in ("white_box", "black_box"):
                assert re.search(rf"^\| {setting} \| {mode} \| val \| an_{variant} \|", proc.stdout, re.M), proc.stdout
    assert json.loads((tmp_path / "ablation.json").read_text())
    base, holdout = (_phases((tmp_path / f"digits_{n}" / "run.log").read_text()) for n in ("base", "holdout"))
    assert {"seed 0 big", "seed 0 little pretrain", "seed 0 little", "seed 0 an_paper white_box"} <= set(base)
    # the same big network: from the run's cache, not trained again; held-out fine-tuning
    # pre-trains on the rest: 897 training inputs, 30 % (269) held out
    assert "seed 0 big" not in holdout
    assert "samples 628" in holdout["seed 0 little pretrain"] and "samples 269" in holdout["seed 0 little"]


def test_ablation_refuses_unknown_variants_and_settings(tmp_path, capsys):
    main = _ablation().main
    assert main([str(REPO / "configs" / "digits.yaml"), "--variants", "probs_error,nope"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown variant(s) nope; known: paper, ")
    assert main([str(REPO / "configs" / "digits.yaml"), "--settings", "base,elsewhere", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: unknown setting(s) elsewhere; known: base, holdout")
    assert not list(tmp_path.iterdir())  # refused before any run
