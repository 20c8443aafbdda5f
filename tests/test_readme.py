"""The README's subclassing example runs as written (with fewer epochs)."""

import json
import re
import subprocess
import sys

from tests.conftest import REPO


def _block(text: str, first_line: str) -> str:
    for lang, body in re.findall(r"```(\w+)\n(.*?)```", text, re.S):
        if body.startswith(first_line):
            return body
    raise AssertionError(f"README has no code block starting with {first_line!r}")


def test_readme_task_example_runs(tmp_path):
    readme = (REPO / "README.md").read_text()
    (tmp_path / "my_tasks.py").write_text(_block(readme, "# my_tasks.py"))
    (tmp_path / "blobs.yaml").write_text(_block(readme, "# cascade run blobs.yaml"))
    # the console script, run from the user's folder, must find my_tasks.py there
    cascade = str(REPO / ".venv" / "bin" / "cascade") if (REPO / ".venv" / "bin" / "cascade").exists() else None
    cmd = [cascade] if cascade else [sys.executable, "-c", "import sys; from cascade.cli import main; sys.exit(main())"]
    proc = subprocess.run(
        cmd + ["run", "blobs.yaml", "--out", "out", "--set", "pretrain.epochs=2", "--set", "big_train.epochs=2",
               "--set", "appealnet.finetune.epochs=1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert m["task"] == "my_tasks.BlobsTask" and m["accuracy"]["big"] > 0.25
