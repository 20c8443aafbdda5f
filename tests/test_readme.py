"""The README and docs/ say what is true: every fenced code block in them is run or checked
here, as it is written (``cascade run`` with ``--quick`` or fewer epochs, servers on free
ports, run commands of data sets this machine may lack checked against the schema only).

- the README's five-minute tour, in order: run, read the recommendation, export, route,
  the bundle in Python, serve and serve-oracle, curl and httpx;
- the docs' blocks that read that run (calibrate, Bundle, Router), a task by subclassing,
  a post-hoc and a trained method (each one file outside the repository), the configs;
- the README fits on a page, every relative link (and anchor) resolves, every docs page
  opens with its one-line summary and is in the index, every ``metrics.json`` key is
  documented, and a fenced block that nothing here checks fails :func:`test_every_block_is_checked`.
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pandas as pd
import pytest
import yaml

from tests.conftest import REPO

DOCS = REPO / "docs"
PAGES = [REPO / "README.md", *sorted(DOCS.glob("*.md"))]
BIN = Path(sys.executable).parent  # the environment's console scripts (cascade) and python

#: every fenced block, by its page and how its first line starts, and the test that runs or checks it
CHECKED = {
    ("README.md", "cascade run configs/digits.yaml "): "tour",
    ("README.md", "awk '/^## /{p = /^## Recommendation/} p'"): "tour",
    ("README.md", "cascade export runs/digits"): "tour",
    ("README.md", 'python -c "from sklearn.datasets import load_digits'): "tour",
    ("README.md", "import numpy as np"): "test_the_tour_runs_exports_and_routes",
    ("README.md", "cascade serve-oracle runs/digits"): "test_the_tour_serves_with_an_oracle",
    ("README.md", "curl -s localhost:8000/predict"): "test_the_tour_serves_with_an_oracle",
    ("README.md", "import httpx, numpy as np"): "test_the_tour_serves_with_an_oracle",
    ("serve.md", '{"predictions": '): "test_the_tour_serves_with_an_oracle",
    ("calibrate.md", 'python -c "import pandas as pd'): "test_calibrate_on_the_runs_samples",
    ("calibrate.md", 'python -c "import numpy as np, pandas as pd'): "test_calibrate_on_an_llm_log",
    ("deploy.md", "from cascade import Bundle"): "test_the_deploy_python_blocks_run",
    ("deploy.md", "from cascade import Router"): "test_the_deploy_python_blocks_run",
    ("tasks.md", "# my_tasks.py"): "test_readme_task_example_runs",
    ("tasks.md", "# cascade run blobs.yaml"): "test_readme_task_example_runs",
    ("methods.md", "# my_scores.py"): "test_readme_method_examples_run",
    ("methods.md", "# my_methods.py"): "test_readme_method_examples_run",
    ("methods.md", "# cascade run my_methods.yaml"): "test_readme_method_examples_run",
    ("methods.md", "methods:"): "test_the_appealnet_block_shows_its_defaults",
    ("configs.md", "# cascade run configs/digits.yaml"): "test_the_digits_block_is_configs_digits_yaml",
    ("configs.md", "cascade run configs/digits.yaml --set methods"): "test_run_commands_name_valid_configs",
    ("configs.md", "cascade run configs/digits.yaml --set 'loggers"): "test_the_tensorboard_block_writes_where_it_reads",
    ("configs.md", "# my_loggers.py"): "test_the_custom_logger_blocks_log_known_values",
    ("configs.md", "loggers:"): "test_the_custom_logger_blocks_log_known_values",
    ("multistage.md", "stages: "): "test_the_multistage_block_validates",
    ("cifar.md", "CASCADE_DATA=../shared/data cascade run"): "test_run_commands_name_valid_configs",
}


def _fenced(page: Path) -> list[tuple[str, str]]:
    """``(language, body)`` of every fenced block of ``page``."""
    return re.findall(r"^```(\w*)\n(.*?)^```", page.read_text(), re.MULTILINE | re.DOTALL)


def _block(page: str, first_line: str) -> str:
    for _, body in _fenced(REPO / page if page == "README.md" else DOCS / page):
        if body.startswith(first_line):
            return body
    raise AssertionError(f"{page} has no code block starting with {first_line!r}")


def _env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}


def _bash(body: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """A block as a bash script, ``--quick`` added to each ``cascade run``."""
    script = re.sub(r"^(cascade run \S+)", r"\1 --quick", body, flags=re.MULTILINE)
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=_env(), capture_output=True,
                          check=False, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{body}\n{proc.stdout}\n{proc.stderr}"
    return proc


def _python(body: str, cwd: Path, prelude: str = "") -> str:
    proc = subprocess.run([sys.executable, "-c", prelude + body], cwd=cwd, env=_env(), capture_output=True,
                          check=False, text=True, timeout=300)
    assert proc.returncode == 0, f"{body}\n{proc.stderr}"
    return proc.stdout


def _cascade(args: list[str], cwd) -> subprocess.CompletedProcess:
    # the console script, run from the user's folder, must find the user's modules there
    cascade = BIN / "cascade"
    cmd = [str(cascade)] if cascade.exists() else [
        sys.executable, "-c", "import sys; from cascade.cli import main; sys.exit(main())"]
    return subprocess.run(cmd + args, cwd=cwd, capture_output=True, text=True, timeout=300, check=False)


# -- the page, its links, its index --------------------------------------------------------


def test_the_readme_fits_on_a_page_and_names_the_ci_command():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    # .ci/run runs the README's test command
    assert "make test" in readme and re.search(r"^make test$", (REPO / ".ci" / "run").read_text(), re.MULTILINE)
    assert re.search(r"^test: ", (REPO / "Makefile").read_text(), re.MULTILINE)


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.MULTILINE | re.DOTALL)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.*)$", text, re.MULTILINE)}


def test_every_relative_link_and_anchor_resolves():
    links = 0
    for page in PAGES:
        text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.MULTILINE | re.DOTALL)
        text = re.sub(r"`[^`\n]*`", "", text)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            assert dest.exists(), f"{page.name}: link to {target}: no such file"
            if anchor:
                assert anchor in _anchors(dest), f"{page.name}: link to {target}: no such heading"
            links += 1
    assert links > 30


def test_each_docs_page_opens_with_one_line_and_is_in_the_index():
    index = (DOCS / "README.md").read_text()
    for page in sorted(DOCS.glob("*.md")):
        lines = page.read_text().splitlines()
        assert lines[0].startswith("# ") and not lines[1] and lines[2] and not lines[3], page.name
        assert page.name == "README.md" or f"]({page.name})" in index, f"{page.name} is not in docs/README.md"


def test_every_block_is_checked():
    """A fenced block nothing here runs is a claim nothing checks: indent listings instead.
    Each block matches exactly one entry of :data:`CHECKED`, whose test exists."""
    found = [(page.name, body) for page in PAGES for _, body in _fenced(page)]
    unchecked = [(name, body.splitlines()[0]) for name, body in found
                 if len([k for (p, k) in CHECKED if p == name and body.startswith(k)]) != 1]
    assert unchecked == [], "fenced blocks no test checks, or more than one entry of CHECKED matches"
    stale = [key for key in CHECKED if not any(name == key[0] and body.startswith(key[1]) for name, body in found)]
    assert stale == [], "CHECKED names blocks the pages no longer have"
    assert [how for how in CHECKED.values() if how not in globals()] == []  # "tour": the fixture


# -- the tour ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tour(tmp_path_factory) -> Path:
    """The README's tour up to serving, run in a fresh folder that sees the repository's configs."""
    folder = tmp_path_factory.mktemp("tour")
    (folder / "configs").symlink_to(REPO / "configs")
    blocks = [body for lang, body in _fenced(REPO / "README.md") if lang == "bash"]
    run, read, export, route = blocks[:4]
    _bash(run, folder)
    assert (folder / "runs" / "digits" / "complete.json").exists()
    shown = _bash(read, folder).stdout
    m = json.loads((folder / "runs" / "digits" / "metrics.json").read_text())
    choices = m["recommendation"]["choices"]
    section, _, printed = shown.partition("\nwhite_box ")  # awk's section, then python's lines
    assert section.startswith("## Recommendation\n") and "\n## " not in section
    assert printed and len(printed.splitlines()) == len(choices)
    for c in choices:
        assert c["method"] in section
        assert f"{c['mode']} {c['target_ad']} {c['threshold_source']} {c['method']} " in shown
    _bash(export, folder)
    manifest = json.loads((folder / "bundles" / "digits" / "manifest.json").read_text())
    assert manifest["operating_point"]["method"] == "appealnet"
    _bash(route, folder)
    predictions = pd.read_csv(folder / "predictions.csv")
    assert list(predictions.columns) == ["input", "prediction", "stage", "score", "mflops", "pending"]
    assert len(predictions) == 100 and set(predictions["stage"]) <= {0, 1}
    return folder


def test_the_tour_runs_exports_and_routes(tour):
    """The bundle in Python answers as ``cascade route`` did."""
    body = _block("README.md", "import numpy as np")
    shown = _python(body, tour)
    predictions = pd.read_csv(tour / "predictions.csv")
    assert shown.startswith(str([str(p) for p in predictions["prediction"][:5]]))
    assert str(predictions["stage"][:5].tolist()) in shown
    assert float(shown.split()[-1]) == pytest.approx(predictions["mflops"].mean(), rel=1e-6)


def test_every_metrics_key_is_documented(tour):
    m = json.loads((tour / "runs" / "digits" / "metrics.json").read_text())
    results = (DOCS / "results.md").read_text()
    table = results[results.index("## metrics.json"):results.index("## The recommendation")]
    assert [k for k in m if f"`{k}`" not in table] == []
    choice = m["recommendation"]["choices"][0]
    assert [k for k in choice if f"`{k}`" not in results] == []


def test_the_tour_serves_with_an_oracle(tour):
    from cascade.serve import ServerProcess

    serve_block = _block("README.md", "cascade serve-oracle")
    oracle_line, serve_line = [re.sub(r"\s*&\s*(#.*)?$", "", line) for line in serve_block.splitlines()]

    def args(line: str) -> list[str]:
        words = shlex.split(line)[1:]
        i = words.index("--port")
        # ServerProcess starts the server here, not in the tour's folder: its paths made absolute
        return [str(tour / w) if (tour / w).exists() else w for w in words[:i] + words[i + 2:]]

    command = [str(BIN / "cascade")]
    with ServerProcess(args(oracle_line), command=command) as oracle:
        server_args = [oracle.url if a.startswith("http://") else a for a in args(serve_line)]
        with ServerProcess(server_args, command=command) as server:
            port = server.url.rpartition(":")[2]
            curl = _block("README.md", "curl -s localhost:8000").replace(":8000", f":{port}")
            if shutil.which("curl"):
                answer = json.loads(_bash(curl, tour).stdout)
            else:  # the same body, sent by httpx
                body = re.search(r"-d '(.*)'", curl, re.DOTALL).group(1)
                answer = httpx.post(f"{server.url}/predict", content=body,
                                    headers={"content-type": "application/json"}).json()
            shown = _python(_block("README.md", "import httpx, numpy as np").replace(":8000", f":{port}"), tour)
    documented = json.loads(_block("serve.md", '{"predictions"'))
    assert len(answer["predictions"]) == 1
    assert answer["predictions"][0].keys() == documented["predictions"][0].keys()
    first = ast.literal_eval(shown.strip())  # the dict the block prints
    assert first.keys() == documented["predictions"][0].keys() and first["fallback"] is False


# -- the docs' blocks that read the tour's run ---------------------------------------------


def test_calibrate_on_the_runs_samples(tour):
    """On a run's own samples.csv the thresholds are the run's (its points.csv, seed 0)."""
    _bash(_block("calibrate.md", 'python -c "import pandas as pd'), tour)
    points = json.loads((tour / "points.json").read_text())["points"]
    assert {(p["target_ad"], p["source"]) for p in points} == {(t, s) for t in (0, 0.01) for s in ("val", "guaranteed")}
    # nothing is certified at a zero target: every input goes to the big model
    assert [p["threshold"] for p in points if p["target_ad"] == 0 and p["source"] == "guaranteed"] == [None]
    run = pd.read_csv(tour / "runs" / "digits" / "points.csv").query(
        "seed == 0 and mode == 'white_box' and method == 'msp' and selection == 'target_ad'")
    for p in points:
        [threshold] = run.query(f"target_ad == {p['target_ad']} and threshold_source == '{p['source']}'")["threshold"]
        assert (p["threshold"] if p["threshold"] is not None else float("inf")) == pytest.approx(threshold, abs=1e-6)


def test_calibrate_on_an_llm_log(tmp_path):
    """A population with a known answer: the small model is right with its stated probability
    p ~ Beta(5, 1), so keeping p >= t skips 1 - t^5 of the inputs with true AD
    1/6 - t^5 + 5/6 t^6. The guaranteed thresholds keep it within the target, the val ones
    miss it (calibrate.md's figures)."""
    _bash(_block("calibrate.md", 'python -c "import numpy as np, pandas as pd'), tmp_path)
    written = json.loads((tmp_path / "llm_points.json").read_text())["points"]
    points = {(p["target_ad"], p["source"]): p for p in written}

    def true_ad(t):
        return 1 / 6 - t ** 5 + 5 / 6 * t ** 6

    for target, source, threshold, ad in [(0.02, "guaranteed", 0.9019, 0.0184), (0.05, "guaranteed", 0.8185, 0.0499),
                                          (0.02, "val", 0.8906, 0.0222), (0.05, "val", 0.7993, 0.0577)]:
        t = points[target, source]["threshold"]
        assert t == pytest.approx(threshold, abs=1e-4) and true_ad(t) == pytest.approx(ad, abs=1e-4)
        assert (true_ad(t) <= target) == (source == "guaranteed")
        assert points[target, source]["skipping_rate"] == pytest.approx(1 - t ** 5, abs=0.02)  # 5,000 rows


def test_the_deploy_python_blocks_run(tour):
    prelude = ("import numpy as np, torch\nfrom tasks.digits import DigitsTask\n"
               "raw = np.load('inputs.npy')\nx = DigitsTask().build_splits(0).test.tensors[0]\n")
    bundle_checks = ("\nassert r.output.shape[0] == len(raw) == len(r.stage) == len(r.score) == len(r.mflops)"
                     "\nassert len(bundle.predictions(r.output)) == len(raw) and not r.pending.any()\n")
    router_checks = "\nassert len(routed.output) == len(x) and 0 <= float(routed.appeal_rate) <= 1\n"
    _python(_block("deploy.md", "from cascade import Bundle") + bundle_checks
            + _block("deploy.md", "from cascade import Router") + router_checks, tour, prelude)


# -- a task, methods, configs --------------------------------------------------------------


def test_readme_task_example_runs(tmp_path):
    (tmp_path / "my_tasks.py").write_text(_block("tasks.md", "# my_tasks.py"))
    (tmp_path / "blobs.yaml").write_text(_block("tasks.md", "# cascade run blobs.yaml"))
    proc = _cascade(["run", "blobs.yaml", "--out", "out", "--set", "pretrain.epochs=2", "--set", "big_train.epochs=2",
                     "--set", "finetune.epochs=1"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert m["task"] == "my_tasks.BlobsTask"
    # the accuracy reported is the test split's in samples.csv (600 rows: 30 % of 2000)
    test = pd.read_csv(tmp_path / "out" / "samples.csv").query("split == 'test'")
    assert len(test) == 600
    for net in ("big", "stage0"):
        assert m["accuracy"][net] == pytest.approx(test[f"{net}_correct"].astype(bool).mean(), abs=1e-12)
    print("README blobs accuracy", m["accuracy"])
    # 4 classes (chance 0.25): even 2 epochs take the big network well above it
    assert m["accuracy"]["big"] > 0.5


def test_readme_method_examples_run(tmp_path):
    """The post-hoc score with an option and the trained method, both by dotted path."""
    for name in ("my_scores.py", "my_methods.py"):
        (tmp_path / name).write_text(_block("methods.md", f"# {name}"))
    (tmp_path / "my_methods.yaml").write_text(_block("methods.md", "# cascade run my_methods.yaml"))
    proc = _cascade(["run", "my_methods.yaml", "--out", "out", "--set", "pretrain.epochs=2",
                     "--set", "big_train.epochs=2", "--set", "finetune.epochs=1"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    # a user's scorer is not a confidence score unless its class says so
    assert m["methods"] == {"DeferralHead": {"kind": "trained", "confidence_score": False},
                            "TemperatureMSP": {"kind": "post_hoc", "confidence_score": False},
                            "msp": {"kind": "post_hoc", "confidence_score": True}}
    points = [p for p in m["operating_points"] if p["selection"] == "target_ad"]
    assert {p["method"] for p in points} == {"DeferralHead", "TemperatureMSP", "msp", "oracle"}
    # the trained head learned something: its scores are not all alike
    assert m["predictor_collapsed"] == {"DeferralHead_white_box": []}
    # a temperature keeps MSP's ranking (up to ties where float64 saturates at T = 1)
    samples = pd.read_csv(tmp_path / "out" / "samples.csv")
    msp, tmsp = samples["stage0_score_msp"], samples["stage0_score_TemperatureMSP"]
    assert (msp.rank() - tmsp.rank()).abs().mean() < 0.01 * len(samples)
    assert ((tmsp > 0) & (tmsp <= 1)).all()
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| DeferralHead | trained |" in table and "| TemperatureMSP | post-hoc |" in table


def _as_run(data: dict) -> dict:
    """A config as a run resolves it: every default, each method's options spelled out."""
    from cascade import TaskKind
    from cascade.config import validate
    from cascade.config.schema import resolved_dict
    from cascade.methods.catalogue import build_methods

    cfg = validate(copy.deepcopy(data))
    resolved = resolved_dict(cfg)
    resolved["methods"] = [{"name": e.label, **e.options.model_dump(mode="json", by_alias=True, exclude_none=True)}
                           for e in build_methods(cfg.methods, TaskKind.CLASSIFICATION)]
    return resolved


def test_the_digits_block_is_configs_digits_yaml():
    from cascade.config import read_yaml

    block = yaml.safe_load(_block("configs.md", "# cascade run configs/digits.yaml"))
    assert _as_run(block) == _as_run(read_yaml(REPO / "configs" / "digits.yaml"))


def test_the_appealnet_block_shows_its_defaults():
    """The options block of methods.md validates on digits and spells out the defaults."""
    from cascade import TaskKind
    from cascade.config import read_yaml

    base = read_yaml(REPO / "configs" / "digits.yaml")
    shown = _as_run({**base, **yaml.safe_load(_block("methods.md", "methods:"))})
    default = _as_run({**base, "methods": ["appealnet"]})
    from cascade.methods.appealnet.method import DEFAULT_INPUTS

    default["methods"][0]["predictor"]["inputs"] = DEFAULT_INPUTS[TaskKind.CLASSIFICATION]  # None: by task kind
    assert shown["methods"] == default["methods"] and shown["finetune_data"] == default["finetune_data"] == "train"


def test_the_multistage_block_validates():
    from cascade.config import read_yaml

    base = read_yaml(REPO / "configs" / "digits_cascade.yaml")
    fragment = yaml.safe_load(_block("multistage.md", "stages:"))
    resolved = _as_run({**base, **fragment})
    assert [m["name"] for m in resolved["methods"]] == ["reinforce", "appealnet", "msp"]
    assert resolved["methods"][0]["alphas"] == [0.005, 0.01, 0.02, 0.05] and len(resolved["stages"]) == 2


def test_the_tensorboard_block_writes_where_it_reads(tmp_path):
    """The config the block runs is valid and builds the tensorboard logger, which writes a
    phase where the block's ``tensorboard --logdir`` reads it (the run's default folder)."""
    from cascade.config import load_config
    from cascade.training.loggers import build_loggers, close_loggers

    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    run_line, board_line = _block("configs.md", "cascade run configs/digits.yaml --set 'loggers").splitlines()
    words = shlex.split(run_line)
    cfg = load_config(REPO / words[2], [words[words.index("--set") + 1]])
    assert (BIN / "tensorboard").exists() and shlex.split(board_line)[:2] == ["tensorboard", "--logdir"]
    [logger] = build_loggers(cfg.loggers, tmp_path / "runs" / cfg.name)  # cascade run's default --out
    logger.begin_phase("seed 0 big", 0)
    logger.log_scalars("seed 0 big", 1, {"train/loss": 0.5})
    logger.end_phase("seed 0 big")
    close_loggers([logger])
    acc = event_accumulator.EventAccumulator(str(tmp_path / shlex.split(board_line)[2] / "seed_0" / "big"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 0.5)]


def test_the_custom_logger_blocks_log_known_values(tmp_path):
    """The CSV logger, named by dotted path in the YAML block, validates and, fed by a
    trainer by hand (tests/test_loggers.py's zero-initialised linear layer, SGD lr 1, one
    input of class 0), writes the losses worked out by hand: ln 3, then ln(1 + 2/e)."""
    (tmp_path / "my_loggers.py").write_text(_block("configs.md", "# my_loggers.py"))
    (tmp_path / "loggers.yaml").write_text(_block("configs.md", "loggers:"))
    script = """
import torch, torch.nn.functional as F, yaml
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from cascade import HistoryHook, LoggerHook, Trainer
from cascade.config import read_yaml, validate
from cascade.training.loggers import build_loggers, close_loggers
cfg = validate({**read_yaml("%s"), **yaml.safe_load(open("loggers.yaml"))})
loggers = build_loggers(cfg.loggers, "run")
model = nn.Linear(2, 3, bias=False)
nn.init.zeros_(model.weight)
data = DataLoader(TensorDataset(torch.tensor([[1.0, 0.0]]), torch.tensor([0])), batch_size=1)
history = HistoryHook()
Trainer(model, lambda m, b: {"loss": F.cross_entropy(m(b[0]), b[1])}, torch.optim.SGD(model.parameters(), lr=1.0),
        data, epochs=2, hooks=[history, LoggerHook("seed 0 by hand", loggers, history)], name="seed 0 by hand").train()
close_loggers(loggers)
print([type(x).__name__ for x in loggers])
""" % (REPO / "configs" / "digits.yaml")
    assert _python(script, tmp_path).split() == ["['TensorBoardLogger',", "'CsvLogger']"]
    rows = pd.read_csv(tmp_path / "run" / "curves.csv", header=None, names=["phase", "step", "tag", "value"])
    first, second = math.log(3), math.log(1 + 2 / math.e)
    assert set(rows["phase"]) == {"seed 0 by hand"}
    assert list(zip(rows["step"], rows["tag"])) == [(1, "train/loss"), (1, "train/lr"), (1, "epoch/loss"),
                                                     (2, "train/loss"), (2, "train/lr"), (2, "epoch/loss")]
    assert rows["value"].tolist() == pytest.approx([first, 1.0, first, second, 1.0, second], rel=1e-6)


@pytest.mark.parametrize("page, first",
                         [key for key, how in CHECKED.items() if how == "test_run_commands_name_valid_configs"])
def test_run_commands_name_valid_configs(page, first):
    """``cascade run CONFIG [--set ...]`` lines for data or hardware this machine may lack:
    the config and its overrides pass the schema (the data is not read)."""
    from cascade.config import load_config

    lines = [line for line in _block(page, first).splitlines() if "cascade run" in line]
    assert lines
    for line in lines:
        words = shlex.split(line.partition("#")[0])
        words = words[words.index("run") + 1:]
        sets = [words[i + 1] for i, w in enumerate(words) if w == "--set"]
        assert (REPO / words[0]).exists(), line
        load_config(REPO / words[0], sets)


def test_every_flag_the_docs_give_a_command_is_one_it_takes():
    """``cascade SUB ... --flag`` in any code span, block or listing: SUB's parser has ``--flag``;
    a flag alone in a code span (``--max-batch``): one of the commands has it."""
    from cascade.cli import _parser

    subparsers = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    seen, wrong = 0, []
    for page in PAGES:
        text = page.read_text()
        spans = re.findall(r"`([^`\n]+)`", re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL))
        spans += [line for _, body in _fenced(page) for line in body.splitlines()]
        spans += re.findall(r"^    (.*)$", text, re.MULTILINE)
        for span in spans:
            for sub, rest in re.findall(r"\bcascade ([a-z][\w-]*)((?: [^#|;&]*)?)", span):
                if sub not in subparsers:
                    continue
                for flag in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", rest):
                    seen += 1
                    if flag not in subparsers[sub]._option_string_actions:
                        wrong.append(f"{page.name}: cascade {sub} {flag}")
        # a flag on its own (`--max-batch`): some command takes it
        for flag in re.findall(r"`(--[a-z][\w-]*)[^`]*`", text):
            seen += 1
            if not any(flag in s._option_string_actions for s in subparsers.values()):
                wrong.append(f"{page.name}: {flag}")
    assert wrong == [] and seen > 50


def test_every_repository_path_the_docs_name_exists():
    """``configs/...``, ``cascade/...``, ``tests/...`` and the like, and each bare ``*.yaml``
    config name, are files or folders of the repository (a user's own files aside)."""
    users = {"blobs.yaml", "my_methods.yaml", "config.yaml", "inputs.npy"}
    roots = "cascade|tasks|baselines|benchmarks|configs|tests|docs|\\.ci"
    missing, seen = [], 0
    for page in PAGES:
        text = page.read_text()
        for path in re.findall(rf"(?<![\w/.-])((?:{roots})/[\w./-]*\w/?)", text):
            seen += 1
            if not (REPO / path).exists():
                missing.append(f"{page.name}: {path}")
        # the layout's paths inside the package: report/tables.py is cascade/report/tables.py
        for path in re.findall(r"(?<![\w/.-])((?:core|contracts|nn|config|evaluation|runs|report|training|methods"
                               r"|engine|deploy|serve)/[\w/-]*\w\.py)", text):
            seen += 1
            if not (REPO / "cascade" / path).exists():
                missing.append(f"{page.name}: cascade/{path}")
        for name in set(re.findall(r"(?<![\w/.-])([\w-]+\.yaml)\b", text)) - users:
            seen += 1
            if not (REPO / "configs" / name).exists():
                missing.append(f"{page.name}: {name}")
    assert missing == [] and seen > 40
