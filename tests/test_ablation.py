"""The ablation script: its summary against a hand-worked example, and a --quick run."""

import importlib.util
import subprocess
import sys

import pytest

from tests.conftest import REPO


def _ablation():
    spec = importlib.util.spec_from_file_location("ablation", REPO / "benchmarks" / "ablation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_summary_is_mean_of_best_baseline_over_appealnet():
    # white-box, test source, two targets:
    #   t=0:    appealnet 2.0, baselines 3.0 / 4.0 -> best 3.0 -> 1.5
    #   t=0.01: appealnet 1.0, baselines 0.5 / 2.0 -> best 0.5 -> 0.5     mean = 1.0
    pts = []
    for t, app, bases in ((0.0, 2.0, (3.0, 4.0)), (0.01, 1.0, (0.5, 2.0))):
        pts.append({"mode": "white_box", "method": "appealnet", "threshold_source": "test", "target_ad": t,
                    "cost_mflops": app})
        for name, c in zip(("msp", "gap"), bases):
            pts.append({"mode": "white_box", "method": name, "threshold_source": "test", "target_ad": t,
                        "cost_mflops": c})
    out = _ablation().summarize({"modes": ["white_box"], "operating_points": pts})
    assert out["white_box/test"] == pytest.approx(1.0)


def test_ablation_quick_run(tmp_path):
    proc = subprocess.run(
        [sys.executable, "benchmarks/ablation.py", "configs/digits.yaml", "--quick", "--variants",
         "paper_literal,probs_mlp", "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "| paper_literal |" in proc.stdout and "| probs_mlp |" in proc.stdout
