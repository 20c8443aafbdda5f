"""Configs validate before any work; the CLI reports user errors in one line, exit 2."""

import subprocess
import sys
from pathlib import Path

import pytest

from cascade import ConfigError, load_config
from cascade.cli import main
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


def test_every_error_reported_at_once_with_key_paths(tmp_path):
    p = _write(tmp_path, "task: {name: digits, cal_fraction: 2}\nseeds: []\npretrain: {lr: -1, epocs: 3}\n"
                         "evaluation: {methods: [msp, msq]}\n")
    with pytest.raises(ConfigError) as info:
        load_config(p)
    text = str(info.value)
    assert "seeds" in text and "pretrain.lr" in text
    assert "pretrain.epocs: unknown key (did you mean 'epochs'?)" in text
    # semantic errors need a structurally valid config; fix structure, keep the semantic ones
    p = _write(tmp_path, "task: {name: digit}\nevaluation: {methods: [msp, msq]}\n")
    with pytest.raises(ConfigError) as info:
        load_config(p)
    text = str(info.value)
    assert "unknown task 'digit' (did you mean 'digits'?)" in text
    assert "evaluation.methods.1: unknown method 'msq'" in text


def test_network_kwargs_checked(tmp_path):
    p = _write(tmp_path, "task: {name: digits}\nlittle: {name: mlp, hiden: [8]}\n")
    with pytest.raises(ConfigError, match=r"little.hiden: unknown key \(did you mean 'hidden'\?\)"):
        load_config(p)


def test_set_overrides_are_validated(tmp_path):
    cfg = load_config(REPO / "configs" / "digits.yaml", ["pretrain.epochs=3", "seeds=[5]"])
    assert cfg.pretrain.epochs == 3 and cfg.seeds == [5]
    with pytest.raises(ConfigError, match="pretrain.lr"):
        load_config(REPO / "configs" / "digits.yaml", ["pretrain.lr=-0.1"])


def test_cli_validate_exit_codes(tmp_path, capsys):
    assert main(["validate", str(REPO / "configs" / "digits.yaml")]) == 0
    bad = _write(tmp_path, "task: {name: digits}\nseeds: [0, 0]\nmodes: [grey_box]\n")
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "seeds" in err and "modes.0" in err


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
    assert "digits" in out and "mnist" in out and "msp" in out and "appealnet" in out
