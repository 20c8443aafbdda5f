"""The ablation script: its summary against a hand-worked example, and a --quick run."""

import importlib.util
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


def test_summary_is_mean_of_best_post_hoc_over_appealnet():
    pts = []
    # white-box, test source (cost):
    #   t=0:    appealnet 2.0, post-hoc 3.0 / 4.0 -> best 3.0 -> 1.5
    #   t=0.01: appealnet 1.0, post-hoc 0.5 / 2.0 -> best 0.5 -> 0.5         mean 1.0
    # reinforce (trained, 0.1) is no baseline; budget points are not target-AD points
    for t, app, bases in ((0.0, 2.0, (3.0, 4.0)), (0.01, 1.0, (0.5, 2.0))):
        pts.append(_point("white_box", "appealnet", "test", t, app))
        pts.append(_point("white_box", "reinforce", "test", t, 0.1))
        pts += [_point("white_box", name, "test", t, c) for name, c in zip(("msp", "gap"), bases)]
    pts.append(_point("white_box", "msp", "test", None, 0.01, selection="budget"))
    # white-box, val: t=0: appealnet and the best post-hoc both cost 0 -> 1.0;
    #   t=0.01: appealnet 0, best 0.5 -> no ratio, left out                  mean 1.0
    for t, bases in ((0.0, (0.0, 1.0)), (0.01, (0.5, 2.0))):
        pts.append(_point("white_box", "appealnet", "val", t, 0.0))
        pts += [_point("white_box", name, "val", t, c) for name, c in zip(("msp", "gap"), bases)]
    # black-box, test (appeal rate; cost ignored): 0.3 / 0.2 = 1.5 at the one target
    pts.append(_point("black_box", "appealnet", "test", 0.02, 9.0, appeal=0.2))
    pts += [_point("black_box", name, "test", 0.02, 1.0, appeal=a) for name, a in (("msp", 0.3), ("gap", 0.5))]
    metrics = {"modes": ["white_box", "black_box"], "operating_points": pts,
               "methods": {"appealnet": {"kind": "trained"}, "reinforce": {"kind": "trained"},
                           "msp": {"kind": "post_hoc"}, "gap": {"kind": "post_hoc"}}}
    out = _ablation().summarize(metrics)
    assert out == {"white_box/test": pytest.approx(1.0), "white_box/val": pytest.approx(1.0),
                   "black_box/test": pytest.approx(1.5)}


def test_variants_use_the_config_keys_of_the_single_pipeline():
    from cascade.config import load_config

    ablation = _ablation()
    for name, overrides in ablation.VARIANTS.items():
        load_config(REPO / "configs" / "digits.yaml", overrides)  # every variant is a valid config
    cfg = load_config(REPO / "configs" / "digits.yaml", ablation.VARIANTS["paper_holdout"])
    assert cfg.methods[0].options()["predictor"] == {"inputs": ["features"], "hidden": [], "detach": False}
    assert cfg.finetune_data == "holdout"
    assert load_config(REPO / "configs" / "digits.yaml", ablation.VARIANTS["probs_mlp_long"]).finetune.epochs == 12


def _phases(log: str) -> dict[str, str]:
    """``phase name -> its facts`` of a run.log."""
    return {m[1]: m[2] for m in re.finditer(r"INFO phase (.+?): [\d.]+ s(?: \((.*)\))?$", log, re.M)}


def test_ablation_quick_run_shares_the_trained_weights(tmp_path):
    proc = subprocess.run(
        [sys.executable, "benchmarks/ablation.py", "configs/digits.yaml", "--quick", "--variants",
         "paper_literal,probs_mlp,probs_mlp_holdout", "--out", str(tmp_path), "--set", "threads=1"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    for name in ("paper_literal", "probs_mlp", "probs_mlp_holdout"):
        assert re.search(rf"^\| {name} \|( -?\d+\.\d+ \|)+$", proc.stdout, re.M), proc.stdout
        assert (tmp_path / f"digits_{name}" / "metrics.json").is_file()
    first, second, third = (_phases((tmp_path / f"digits_{n}" / "run.log").read_text())
                            for n in ("paper_literal", "probs_mlp", "probs_mlp_holdout"))
    assert {"seed 0 big", "seed 0 little pretrain", "seed 0 little", "seed 0 appealnet white_box"} <= set(first)
    # the same big and pre-trained little: from the cache, not trained again
    assert "seed 0 big" not in second and "seed 0 little pretrain" not in second
    assert {"seed 0 little", "seed 0 appealnet white_box", "seed 0 appealnet black_box"} <= set(second)
    # held-out fine-tuning pre-trains on the rest: 897 training inputs, 30 % (269) held out
    assert "seed 0 big" not in third
    assert "samples 628" in third["seed 0 little pretrain"] and "samples 269" in third["seed 0 little"]


def test_ablation_refuses_unknown_variants_and_configs_without_appealnet_first(tmp_path, capsys):
    main = _ablation().main
    assert main([str(REPO / "configs" / "digits.yaml"), "--variants", "probs_mlp,nope"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown variant(s) nope; known: paper_literal, ")
    cascade = REPO / "configs" / "digits_cascade.yaml"  # reinforce is its first method
    assert main([str(cascade), "--variants", "probs_mlp", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (f"error: {cascade}: the ablation varies methods.0 (AppealNet's options); "
                                       "list appealnet first under methods:\n")
    assert not list(tmp_path.iterdir())  # refused before any run
