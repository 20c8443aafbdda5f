"""The README's examples run as written (with fewer epochs): a task by subclassing, and a
post-hoc and a trained routing method, each one file outside the repository."""

import json
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO


def _block(text: str, first_line: str) -> str:
    for lang, body in re.findall(r"```(\w+)\n(.*?)```", text, re.S):
        if body.startswith(first_line):
            return body
    raise AssertionError(f"README has no code block starting with {first_line!r}")


def _cascade(args: list[str], cwd) -> subprocess.CompletedProcess:
    # the console script, run from the user's folder, must find the user's modules there
    cascade = REPO / ".venv" / "bin" / "cascade"
    cmd = [str(cascade)] if cascade.exists() else [
        sys.executable, "-c", "import sys; from cascade.cli import main; sys.exit(main())"]
    return subprocess.run(cmd + args, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_readme_task_example_runs(tmp_path):
    readme = (REPO / "README.md").read_text()
    (tmp_path / "my_tasks.py").write_text(_block(readme, "# my_tasks.py"))
    (tmp_path / "blobs.yaml").write_text(_block(readme, "# cascade run blobs.yaml"))
    proc = _cascade(["run", "blobs.yaml", "--out", "out", "--set", "pretrain.epochs=2", "--set", "big_train.epochs=2",
                     "--set", "finetune.epochs=1"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert m["task"] == "my_tasks.BlobsTask"
    # the accuracy reported is the test split's in samples.csv (600 rows: 30 % of 2000)
    import pandas as pd

    test = pd.read_csv(tmp_path / "out" / "samples.csv").query("split == 'test'")
    assert len(test) == 600
    for net in ("big", "stage0"):
        assert m["accuracy"][net] == pytest.approx(test[f"{net}_correct"].astype(bool).mean(), abs=1e-12)
    print("README blobs accuracy", m["accuracy"])
    # 4 classes (chance 0.25): even 2 epochs take the big network well above it
    assert m["accuracy"]["big"] > 0.5


def test_readme_method_examples_run(tmp_path):
    """The post-hoc score with an option and the trained method, both by dotted path."""
    readme = (REPO / "README.md").read_text()
    for name in ("my_scores.py", "my_methods.py"):
        (tmp_path / name).write_text(_block(readme, f"# {name}"))
    (tmp_path / "my_methods.yaml").write_text(_block(readme, "# cascade run my_methods.yaml"))
    proc = _cascade(["run", "my_methods.yaml", "--out", "out", "--set", "pretrain.epochs=2",
                     "--set", "big_train.epochs=2", "--set", "finetune.epochs=1"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert m["methods"] == {"DeferralHead": {"kind": "trained"}, "TemperatureMSP": {"kind": "post_hoc"},
                            "msp": {"kind": "post_hoc"}}
    points = [p for p in m["operating_points"] if p["selection"] == "target_ad"]
    assert {p["method"] for p in points} == {"DeferralHead", "TemperatureMSP", "msp", "oracle"}
    # the trained head learned something: its scores are not all alike
    assert m["predictor_collapsed"] == {"DeferralHead_white_box": []}
    # a temperature keeps MSP's ranking (up to ties where float64 saturates at T = 1)
    import pandas as pd

    samples = pd.read_csv(tmp_path / "out" / "samples.csv")
    msp, tmsp = samples["stage0_score_msp"], samples["stage0_score_TemperatureMSP"]
    assert (msp.rank() - tmsp.rank()).abs().mean() < 0.01 * len(samples)
    assert ((tmsp > 0) & (tmsp <= 1)).all()
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| DeferralHead | trained |" in table and "| TemperatureMSP | post-hoc |" in table
