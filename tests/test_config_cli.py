"""Configs validate before any work; the CLI reports user errors in one line, exit 2."""

import subprocess
import sys
from pathlib import Path

import pytest

from cascade import CascadeError, ConfigError, load_config
from cascade.cli import main
from cascade.config import MIGRATIONS
from tests.conftest import REPO

CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_validates_and_opens_with_its_command(path):
    load_config(path)
    load_config(path, quick=True)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and "cascade run configs/" in first


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    return p


def _errors(path: Path, overrides: tuple[str, ...] = ()) -> list[str]:
    """The problems load_config reports, each without the file prefix."""
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    assert info.value.path == str(path)
    return info.value.errors


def test_every_error_reported_at_once_with_key_paths(tmp_path):
    # schema errors, registry names and method options, all in one report: a wrong
    # method name is not held back until the schema errors are fixed
    p = _write(tmp_path, "task: {name: digits, cal_fraction: 2}\nseeds: []\npretrain: {lr: -1, epocs: 3}\n"
                         "little: {name: mpl}\nmethods: [msp, msq, {name: appealnet, predictor: {hiden: [8]}}]\n")
    errors = _errors(p)
    assert any(e.startswith("seeds: ") for e in errors)
    assert any(e.startswith("pretrain.lr: ") for e in errors)
    assert any(e.startswith("task.cal_fraction: ") for e in errors)
    assert "pretrain.epocs: unknown key (did you mean 'epochs'?)" in errors
    assert any(e.startswith("little.name: unknown network 'mpl' (did you mean 'mlp'?)") for e in errors)
    assert any(e.startswith("methods.1.name: unknown method 'msq' (did you mean 'msp'?); known: ") for e in errors)
    assert "methods.2.predictor.hiden: unknown key (did you mean 'hidden'?)" in errors
    assert len(errors) == 7, errors
    p = _write(tmp_path, "task: {name: digit}\nmethods: [msp]\n")
    assert _errors(p)[0].startswith("task.name: unknown task 'digit' (did you mean 'digits'?); known: ")


@pytest.mark.parametrize("method, error", [
    ("{name: appealnet, predictor: {hiden: [8]}}", "methods.0.predictor.hiden: unknown key (did you mean 'hidden'?)"),
    ("{name: appealnet, lambda: {budgte: 0.2}}", "methods.0.lambda.budgte: unknown key (did you mean 'budget'?)"),
    ("{name: appealnet, predictor: {inputs: [logits]}}", "methods.0.predictor.inputs.0: Input should be 'features'"),
    ("{name: appealnet, approximator_loss: half}", "methods.0.approximator_loss: Input should be 'weighted' or 'full'"),
    ("{name: reinforce, alphas: [-0.1]}", "methods.0.alphas.0: Input should be greater than or equal to 0"),
    ("{name: reinforce, policy: {shard: true}}", "methods.0.policy.shard: unknown key (did you mean 'shared'?)"),
    ("{name: reinforce, baseline: sample_mean, samples: 1}",
     "methods.0: baseline: sample_mean needs samples >= 2 (trajectories per input)"),
    ("{name: mc_dropout, passes: 1}", "methods.0.passes: Input should be greater than or equal to 2"),
    ("{name: msp, temperature: 2}", "methods.0.temperature: unknown key"),
    ("{name: msp, labl: x}", "methods.0.labl: unknown key (did you mean 'label'?)"),
])
def test_method_options_checked_by_the_methods_own_schema(tmp_path, method, error):
    p = _write(tmp_path, f"task: {{name: digits}}\nmethods: [{method}]\n")
    errors = _errors(p)
    assert len(errors) == 1 and errors[0].startswith(error), errors


def test_a_method_listed_twice_needs_a_label(tmp_path):
    p = _write(tmp_path, "task: {name: digits}\nmethods: [msp, gap, msp]\n")
    assert _errors(p) == ["methods.2: 'msp' is listed twice (give one of them a label:)"]
    p = _write(tmp_path, "task: {name: digits}\nmethods: [msp, gap, {name: msp, label: msp_again}]\n")
    assert [m.options().get("label") for m in load_config(p).methods] == [None, None, "msp_again"]


@pytest.mark.parametrize("text, key", [
    ("appealnet: {finetune: {epochs: 2}}\n", "appealnet"),
    ("cascade: {stages: [{name: mlp}]}\n", "cascade"),
    ("evaluation: {methods: [msp]}\n", "evaluation.methods"),
])
def test_keys_of_the_old_configs_get_one_migration_line(tmp_path, capsys, text, key):
    # the rest of this config is wrong too: the migration comes alone, first
    bad = _write(tmp_path, "task: {name: digits}\nseeds: []\n" + text)
    assert main(["validate", "--config-only", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {bad}: {key}: {MIGRATIONS[key]}\n"


def test_every_old_key_at_once(tmp_path):
    p = _write(tmp_path, "task: {name: digits}\nappealnet: {}\ncascade: {}\nevaluation: {methods: [msp]}\n")
    assert [e.partition(":")[0] for e in _errors(p)] == ["appealnet", "cascade", "evaluation.methods"]


def test_network_kwargs_checked(tmp_path):
    p = _write(tmp_path, "task: {name: digits}\nlittle: {name: mlp, hiden: [8]}\n")
    with pytest.raises(ConfigError, match=r"little.hiden: unknown key \(did you mean 'hidden'\?\)"):
        load_config(p)
    p = _write(tmp_path, "task: {name: digits}\nstages: [{name: mlp}, {name: cnn, chanels: [4]}]\n"
                         "oracle_mflops: 1\nmodes: [black_box]\n")
    assert _errors(p)[0].startswith("stages.1.chanels: unknown key (did you mean 'channels'?)")


def test_set_overrides_are_validated(tmp_path):
    digits = REPO / "configs" / "digits.yaml"
    cfg = load_config(digits, ["pretrain.epochs=3", "seeds=[5]"])
    assert cfg.pretrain.epochs == 3 and cfg.seeds == [5]
    with pytest.raises(ConfigError, match="pretrain.lr"):
        load_config(digits, ["pretrain.lr=-0.1"])
    # a number indexes the methods list; a method given by name alone takes options
    assert [m.name for m in load_config(digits).methods][:4] == ["appealnet", "msp", "gap", "entropy"]
    cfg = load_config(digits, ["methods.0.predictor.inputs=[features]", "methods.0.lambda.budget=0.2",
                               "methods.1.label=msp_plain", "finetune_data=holdout"])
    assert cfg.methods[0].options()["predictor"]["inputs"] == ["features"]
    assert cfg.methods[0].options()["lambda"]["budget"] == 0.2
    assert cfg.methods[1].name == "msp" and cfg.methods[1].options() == {"label": "msp_plain"}
    assert cfg.finetune_data == "holdout"
    assert _errors(digits, ("methods.0.predictor.hiden=[8]",)) == [
        "methods.0.predictor.hiden: unknown key (did you mean 'hidden'?) (from --set methods.0.predictor.hiden=[8])"]
    with pytest.raises(CascadeError, match=r"--set methods.8.label: '8' is not an index of the list at methods "
                                           r"\(8 items\)"):
        load_config(digits, ["methods.8.label=x"])


def test_cli_validate_exit_codes(tmp_path, capsys):
    assert main(["validate", str(REPO / "configs" / "digits.yaml")]) == 0
    assert "configs/digits.yaml: ok (config, task, data, networks)" in capsys.readouterr().out
    bad = _write(tmp_path, "task: {name: digits}\nseeds: [0, 0]\nmodes: [grey_box]\n")
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "seeds" in err and "modes.0" in err


def test_a_method_that_does_not_suit_the_task_is_refused_before_training(tmp_path, capsys):
    # the config is valid; whether msp suits a regression task needs the task's criterion
    bad = _write(tmp_path, "task: {name: keypoints, synthetic: {size: 40}}\nmethods: [msp]\nmodes: [black_box]\n")
    assert main(["validate", "--config-only", str(bad)]) == 0
    capsys.readouterr()
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "methods.0: 'msp' does not suit a regression task" in err


def test_malformed_yaml_names_the_line(tmp_path, capsys):
    bad = _write(tmp_path, "task:\n  name: digits\nseeds: [0, 1\n")
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(bad) in err and "line" in err


def test_cli_subprocess_no_traceback(tmp_path):
    bad = _write(tmp_path, "task: {name: nope}\n")
    proc = subprocess.run([sys.executable, "-m", "cascade", "run", str(bad), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "unknown task 'nope'" in proc.stderr
    assert not (tmp_path / "o").exists()  # nothing started before validation


def test_cli_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "digits" in out and "mnist" in out
    assert "msp (post-hoc: classification)" in out
    assert "appealnet (trained: classification, regression)" in out
    assert "reinforce (trained: " in out
