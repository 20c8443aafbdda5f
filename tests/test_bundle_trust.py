"""A bundle is data: loading one from someone else runs none of its code, reads nothing
outside its folder, and refuses a bad manifest or a changed file in one line; export
writes a bundle whole or not at all."""

from __future__ import annotations

import copy
import errno
import hashlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from cascade import Bundle, CascadeError
from cascade.cli import main
from tests.test_new_user import one_line_error

pytestmark = pytest.mark.slow


class _Payload:
    """A pickle that runs a shell command when unpickled."""

    def __init__(self, marker: Path):
        self.command = f"touch {marker}"

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.fixture(scope="module")
def exported(quick_digits_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trust") / "bundle"
    assert main(["export", str(quick_digits_run), "--out", str(out), "--method", "msp", "--no-onnx"]) == 0
    return out


@pytest.fixture
def bundle(exported, tmp_path) -> Path:
    """A fresh copy of the exported bundle for the test to tamper with."""
    return Path(shutil.copytree(exported, tmp_path / "bundle"))


def _members(file: Path) -> tuple[str, dict[str, bytes]]:
    with zipfile.ZipFile(file) as z:
        names = z.namelist()
        return names[0].split("/")[0], {n: z.read(n) for n in names}


def _write_members(file: Path, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(file, "w") as z:  # stored, as torch writes them
        for name, data in members.items():
            z.writestr(name, data)


def _rehash(bundle: Path) -> None:
    """Give the manifest the tampered files' hashes, as an attacker who writes both would."""
    m = json.loads((bundle / "manifest.json").read_text())
    for s in m["stages"]:
        if s["file"]:
            s["sha256"] = hashlib.sha256((bundle / s["file"]).read_bytes()).hexdigest()
    (bundle / "manifest.json").write_text(json.dumps(m))


def _torch_save_zip(obj_pickle: bytes) -> bytes:
    """A ``torch.save`` archive whose data.pkl is ``obj_pickle``."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("model/data.pkl", obj_pickle)
        z.writestr("model/byteorder", "little")
        z.writestr("model/version", "3\n")
    return buf.getvalue()


def _plant(bundle: Path, where: str, marker: Path) -> None:
    """Put a payload that touches ``marker`` where ``torch.export.load`` would run it."""
    file = bundle / "stage_0.pt2"
    root, members = _members(file)
    payload = pickle.dumps(_Payload(marker), protocol=2)

    def config(kind: str) -> tuple[str, dict]:
        name = f"{root}/data/{kind}/model_{kind}_config.json"
        return name, json.loads(members[name])

    if where == "sample_inputs":
        members[f"{root}/data/sample_inputs/model.pt"] = _torch_save_zip(payload)
    elif where == "weights":  # a weight marked as pickled
        name, cfg = config("weights")
        entry = next(iter(cfg["config"].values()))
        entry["use_pickle"] = True
        members[f"{root}/data/weights/{entry['path_name']}"] = _torch_save_zip(payload)
        members[name] = json.dumps(cfg).encode()
    elif where in ("constants", "opaque_constants"):  # a pickled tensor constant, or a plain-pickled object
        name, cfg = config("constants")
        path = "tensor_0" if where == "constants" else "opaque_obj_0"
        cfg["config"]["planted"] = {"path_name": path, "is_param": False, "use_pickle": True, "tensor_meta": None}
        members[f"{root}/data/constants/{path}"] = _torch_save_zip(payload) if where == "constants" else payload
        members[name] = json.dumps(cfg).encode()
    elif where == "legacy_weights":  # the legacy state-dict file torch still reads
        members[f"{root}/data/weights/model.pt"] = _torch_save_zip(payload)
    elif where == "extra_files":
        members[f"{root}/extra/payload.pkl"] = payload
    elif where == "aotinductor":
        members[f"{root}/data/aotinductor/model/model.so"] = b"\x7fELF"
    else:  # the graph JSON: guard code torch execs, a shape expression sympy evals, a node calling os.system
        name = f"{root}/models/model.json"
        graph = json.loads(members[name])
        if where == "guards_code":
            graph["guards_code"] = [f"__import__('os').system('touch {marker}') == 0"]
        elif where == "shape_expression":
            sizes = graph["graph_module"]["graph"]["tensor_values"]["x"]["sizes"]
            sizes[0]["as_expr"]["expr_str"] = f"__import__('os').system('touch {marker}')"
        elif where == "node_target":
            node = graph["graph_module"]["graph"]["nodes"][0]
            node["target"] = "torch.os.system"
            node["inputs"] = [{"name": "command", "arg": {"as_string": f"touch {marker}"}, "kind": 1}]
        else:  # an ATen operator that reads a file outside the bundle into a tensor
            node = graph["graph_module"]["graph"]["nodes"][0]
            node["target"] = "torch.ops.aten.from_file.default"
            node["inputs"] = [{"name": "filename", "arg": {"as_string": "/etc/passwd"}, "kind": 1}]
        members[name] = json.dumps(graph).encode()
    _write_members(file, members)
    _rehash(bundle)


def _add_sample_inputs(bundle: Path) -> None:
    """Give stage 0 plain tensor sample inputs (which torch loads with weights_only=True)."""
    root, members = _members(bundle / "stage_0.pt2")
    buf = io.BytesIO()
    torch.save(((torch.zeros(2, 1, 8, 8),), {}), buf)
    members[f"{root}/data/sample_inputs/model.pt"] = buf.getvalue()
    _write_members(bundle / "stage_0.pt2", members)
    _rehash(bundle)


#: where a payload goes, whether torch.export.load(...).module() runs it, what the refusal names
PLACES = [
    ("sample_inputs", True, "data/sample_inputs/model.pt: holds pickled sample inputs"),
    ("weights", True, "model_weights_config.json: config.stage"),
    ("constants", True, "model_constants_config.json: config.planted.use_pickle: Input should be False"),
    ("opaque_constants", True, "data/constants/opaque_obj_0: not part of a program"),
    ("legacy_weights", True, "data/weights/model.pt: not part of a program"),
    ("extra_files", False, "extra/payload.pkl: not part of a program"),
    ("aotinductor", False, "data/aotinductor/model/model.so: not part of a program"),
    ("guards_code", True, "models/model.json: guards_code: holds Python code"),
    ("shape_expression", True, "x.sizes.0.as_expr.expr_str: \"__import__('os')"),
    ("node_target", False, "nodes.0.target: 'torch.os.system' is not an ATen operator"),
    ("node_reads_a_file", False, "nodes.0.target: 'torch.ops.aten.from_file.default' is not an ATen operator"),
]


@pytest.mark.parametrize("where, live, message", PLACES, ids=[p[0] for p in PLACES])
def test_a_payload_anywhere_in_a_stage_program_is_refused_and_never_runs(bundle, tmp_path, where, live, message):
    if live:  # the payload is real: torch.export.load alone runs it
        control = Path(shutil.copytree(bundle, tmp_path / "control"))
        _plant(control, where, tmp_path / "ran_in_torch")
        if where == "guards_code":  # torch builds the guard function only for a program with sample inputs
            _add_sample_inputs(control)
        try:  # most payloads return an int where torch wants a tensor: the command ran before that
            torch.export.load(str(control / "stage_0.pt2")).module()(torch.zeros(1, 1, 8, 8))
        except Exception:  # noqa: BLE001, S110
            pass
        assert (tmp_path / "ran_in_torch").exists()
    marker = tmp_path / "pwned"
    _plant(bundle, where, marker)
    with pytest.raises(CascadeError) as caught:
        Bundle.load(bundle)
    text = str(caught.value)
    assert "\n" not in text and text.startswith(f"{bundle / 'stage_0.pt2'}: member ") and message in text, text
    assert not marker.exists()


def test_cascade_route_refuses_a_planted_bundle_in_one_line(bundle, tmp_path, capsys):
    marker = tmp_path / "pwned"
    _plant(bundle, "sample_inputs", marker)
    np.save(tmp_path / "x.npy", np.zeros((2, 1, 8, 8)))
    capsys.readouterr()
    code = main(["route", str(bundle), str(tmp_path / "x.npy"), "--out", str(tmp_path / "p.csv")])
    assert "stage_0.pt2: member" in one_line_error(code, capsys.readouterr().err)
    assert not marker.exists() and not (tmp_path / "p.csv").exists()


def test_cascade_serve_refuses_a_planted_bundle_at_start_up(bundle, tmp_path):
    marker = tmp_path / "pwned"
    _plant(bundle, "guards_code", marker)
    done = subprocess.run([sys.executable, "-m", "cascade.cli", "serve", str(bundle), "--port", "0"],
                          capture_output=True, text=True, timeout=120, check=False)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert "stage_0.pt2: member" in lines[0] and "guards_code" in lines[0]
    assert not marker.exists()


def _edit(key_path: str, value):
    def edit(m: dict) -> None:
        *parents, last = key_path.split(".")
        node = m
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        node[int(last) if isinstance(node, list) else last] = value
    return edit


#: a manifest edit, and the key path its one-line refusal starts with
MANIFESTS = [
    (_edit("thresholds.0", "abc"), "thresholds.0: Input should be a valid number"),
    (_edit("thresholds.0", -0.1), "thresholds.0: Input should be greater than or equal to 0"),
    (_edit("thresholds.0", 2.0), "thresholds.0: Input should be less than or equal to 1"),
    (_edit("thresholds", [0.5, 0.5]), "thresholds: 2 given for 1 routed stage(s)"),
    (_edit("preprocessing.raw_max", "x"), "preprocessing.raw_max: Input should be a valid number"),
    (_edit("preprocessing.std", [0.0]), "preprocessing.std.0: Input should be greater than 0"),
    (_edit("preprocessing.mean", [0.0, 0.0]), "preprocessing.mean: 2 values for 1 channel(s)"),
    (_edit("stages.0.mflops", "0.1"), "stages.0.mflops: Input should be a valid number"),
    (_edit("stages.0.mflops", None), "stages.0: every stage before the last is a routed stage with its mflops"),
    (_edit("stages", "stage_0.pt2"), "stages: Input should be a valid array"),
    (_edit("kind", "bogus"), "kind: Input should be 'classification' or 'regression'"),
    (_edit("stages.0.file", "../other/stage_0.pt2"), "stages.0.file: '../other/stage_0.pt2' is not a plain file name"),
    (_edit("stages.0.file", "/tmp/stage_0.pt2"), "stages.0.file: '/tmp/stage_0.pt2' is not a plain file name"),
    (_edit("stages.0.file", "../../../../etc/passwd"), "stages.0.file: '../../../../etc/passwd' is not a plain"),
    (_edit("stages.1.file", ".."), "stages.1.file: '..' is not a plain file name"),
    (_edit("stages.0.sha256", None), "stages.0: sha256 must be given exactly when file is"),
    (_edit("input.shape", [1, 0, 8]), "input.shape.1: Input should be greater than or equal to 1"),
    (_edit("input.shape", [1, 100_000, 100_000]), "input.shape: 10,000,000,000 values per input, more than"),
    (_edit("surprise", 1), "surprise: Extra inputs are not permitted"),
    (lambda m: m["stages"][0].pop("mflops"), "stages.0.mflops: Field required"),
]


@pytest.mark.parametrize("edit, message", MANIFESTS, ids=[m[1].split(":")[0] + f"-{i}" for i, m in enumerate(MANIFESTS)])
def test_a_bad_manifest_value_is_one_line_naming_its_key(bundle, edit, message):
    m = json.loads((bundle / "manifest.json").read_text())
    edit(m)
    (bundle / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CascadeError) as caught:
        Bundle.load(bundle)
    text = str(caught.value)
    assert "\n" not in text and text.startswith(f"{bundle / 'manifest.json'}: {message}"), text


def test_a_path_outside_the_bundle_is_refused_the_same_whether_or_not_it_exists(bundle):
    def refusal(file: str) -> str:
        m = json.loads((bundle / "manifest.json").read_text())
        m["stages"][0]["file"] = file
        (bundle / "manifest.json").write_text(json.dumps(m))
        with pytest.raises(CascadeError) as caught:
            Bundle.load(bundle)
        return str(caught.value).replace(file, "FILE")

    assert refusal("../../../../etc/passwd") == refusal("../../../../etc/no_such_file_here")
    assert refusal("../bundle/stage_0.pt2") == refusal("../../../../etc/passwd")


def test_nan_in_the_manifest_and_an_old_format_are_one_line(bundle):
    text = (bundle / "manifest.json").read_text()
    m = json.loads(text)
    (bundle / "manifest.json").write_text(json.dumps({**m, "thresholds": [float("nan")]}))
    with pytest.raises(CascadeError, match=r"manifest.json: not valid JSON \(NaN is not a JSON number"):
        Bundle.load(bundle)
    (bundle / "manifest.json").write_text(json.dumps({**m, "format_version": 1}))
    with pytest.raises(CascadeError, match="format_version 1; this cascade reads version 2 .export the run again"):
        Bundle.load(bundle)


def test_output_names_that_do_not_match_the_programs_outputs_are_refused_at_load(bundle):
    m = json.loads((bundle / "manifest.json").read_text())
    m["output_names"] = ["a", "b", "c"]
    (bundle / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CascadeError) as caught:
        Bundle.load(bundle)
    assert str(caught.value) == (f"{bundle / 'stage_0.pt2'}: gives outputs of shape [1, 10] for one input; the "
                                 "manifest's output_names has 3 names")


def test_a_swapped_or_truncated_stage_file_is_refused_by_its_hash(quick_digits_run, bundle, tmp_path):
    other = tmp_path / "other"
    assert main(["export", str(quick_digits_run), "--out", str(other), "--method", "appealnet", "--no-onnx"]) == 0
    expected = f"{bundle / 'stage_0.pt2'}: SHA-256 differs from {bundle / 'manifest.json'}'s stages.0.sha256: "
    shutil.copy(other / "stage_0.pt2", bundle / "stage_0.pt2")  # a valid program, from another bundle
    with pytest.raises(CascadeError) as caught:
        Bundle.load(bundle)
    assert str(caught.value).startswith(expected)
    data = (other / "stage_0.pt2").read_bytes()
    (bundle / "stage_0.pt2").write_bytes(data[: len(data) // 2])
    with pytest.raises(CascadeError) as caught:
        Bundle.load(bundle)
    assert str(caught.value).startswith(expected)
    (bundle / "stage_0.pt2").write_bytes(b"garbage")  # with a matching hash: still no program
    _rehash(bundle)
    with pytest.raises(CascadeError, match=r"stage_0.pt2: not a torch.export program \(not a .pt2 archive"):
        Bundle.load(bundle)


def test_the_manifest_holds_each_files_sha256_and_the_programs_carry_no_pickles(exported):
    m = json.loads((exported / "manifest.json").read_text())
    for s in m["stages"]:
        if s["file"]:
            assert s["sha256"] == hashlib.sha256((exported / s["file"]).read_bytes()).hexdigest()
            root, members = _members(exported / s["file"])
            assert members[f"{root}/data/sample_inputs/model.pt"] == b""
            assert json.loads(members[f"{root}/models/model.json"])["guards_code"] == []
    assert Bundle.load(exported).route(np.zeros((3, 1, 8, 8))).stage.shape == (3,)


def _disk_full_at(monkeypatch, name: str) -> None:
    import cascade.deploy.export as export

    real = export._write_file

    def write(path: Path, data: bytes) -> str:
        if path.name == name:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, data)

    monkeypatch.setattr(export, "_write_file", write)


@pytest.mark.parametrize("name", ["stage_1.pt2", "manifest.json"])
def test_a_full_disk_during_export_is_one_line_and_leaves_nothing(quick_digits_run, tmp_path, capsys, monkeypatch,
                                                                  name):
    _disk_full_at(monkeypatch, name)
    out = tmp_path / "b"
    capsys.readouterr()
    code = main(["export", str(quick_digits_run), "--out", str(out), "--method", "msp", "--no-onnx"])
    line = one_line_error(code, capsys.readouterr().err)
    assert f"{out / name}: cannot be written (No space left on device); nothing was exported" in line
    assert list(tmp_path.iterdir()) == []  # no bundle, no temporary folder


def _small_file_limit() -> None:
    """In the child: a write past 100 kB fails (EFBIG) as on a full disk, instead of a signal."""
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_FSIZE as a full disk")
def test_a_real_write_failure_is_one_line_where_torchs_own_writer_aborts(quick_digits_run, tmp_path):
    control = ("import torch; ep = torch.export.export(torch.nn.Linear(300, 300), (torch.randn(2, 300),)); "
               f"torch.export.save(ep, {str(tmp_path / 'control.pt2')!r})")
    done = subprocess.run([sys.executable, "-c", control], preexec_fn=_small_file_limit, capture_output=True,
                          timeout=300, check=False)
    assert done.returncode == -6  # SIGABRT: torch's C++ writer throws again in its destructor (the rc 134)
    out = tmp_path / "out" / "b"
    done = subprocess.run([sys.executable, "-m", "cascade.cli", "export", str(quick_digits_run), "--out", str(out),
                           "--method", "msp", "--no-onnx"], preexec_fn=_small_file_limit, capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (f"error: {out / 'stage_1.pt2'}: cannot be written (File too large); nothing "
                                   "was exported")
    assert list((tmp_path / "out").iterdir()) == []


def test_a_failed_export_keeps_the_earlier_bundle_and_a_good_one_replaces_it(exported, quick_digits_run, tmp_path,
                                                                             capsys, monkeypatch):
    out = Path(shutil.copytree(exported, tmp_path / "b"))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _disk_full_at(monkeypatch, "stage_1.pt2")
    code = main(["export", str(quick_digits_run), "--out", str(out), "--method", "appealnet", "--no-onnx"])
    assert f"{out} is unchanged" in one_line_error(code, capsys.readouterr().err)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    monkeypatch.undo()
    assert main(["export", str(quick_digits_run), "--out", str(out), "--method", "appealnet", "--no-onnx"]) == 0
    assert json.loads((out / "manifest.json").read_text())["operating_point"]["method"] == "appealnet"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # the earlier bundle, moved aside, is gone
    Bundle.load(out)


def test_the_onnx_files_hash_is_checked_too(quick_digits_run, tmp_path):
    pytest.importorskip("onnxscript")
    out = tmp_path / "b"
    assert main(["export", str(quick_digits_run), "--out", str(out), "--method", "msp"]) == 0
    stage = json.loads((out / "manifest.json").read_text())["stages"][0]
    assert stage["onnx_sha256"] == hashlib.sha256((out / "stage_0.onnx").read_bytes()).hexdigest()
    data = (out / "stage_0.onnx").read_bytes()
    (out / "stage_0.onnx").write_bytes(data[:-10])
    with pytest.raises(CascadeError, match=r"stage_0.onnx: SHA-256 differs from .*'s stages.0.onnx_sha256: "):
        Bundle.load(out)


def test_a_manifest_given_to_the_constructor_is_validated_too(exported):
    b = Bundle.load(exported)
    bad = copy.deepcopy(b.manifest)
    bad["thresholds"] = [7]
    with pytest.raises(Exception, match="thresholds.0"):  # noqa: PT011  (pydantic's ValidationError)
        Bundle(exported, bad, b._routed, b._last)
