"""Test settings: 2 threads, no progress bars, a temporary data root for writes."""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(2)
os.environ.setdefault("OMP_NUM_THREADS", "2")
# the trained networks that runs cache (cascade.training.checkpoint.NetworkCache) go to a temporary
# folder, never to ~/.cache: a fresh one for each test (see pytest_runtest_setup)
_NETWORK_CACHES = tempfile.mkdtemp(prefix="cascade-test-networks-")
os.environ["CASCADE_CACHE"] = _NETWORK_CACHES
atexit.register(shutil.rmtree, _NETWORK_CACHES, True)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item) -> None:
    """Each test, the fixtures it sets up, and their subprocesses share a network cache
    of their own: no test loads a network another test trained, so what a test sees
    (phases trained, their log lines) does not depend on which tests ran before it."""
    os.environ["CASCADE_CACHE"] = tempfile.mkdtemp(dir=_NETWORK_CACHES)


REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def mnist_root() -> Path | None:
    """Where real MNIST lies ($CASCADE_DATA or ../shared/data), or None."""
    for root in (os.environ.get("CASCADE_DATA"), SHARED_DATA):
        if root and (Path(root) / "MNIST" / "raw" / "t10k-images-idx3-ubyte").exists():
            return Path(root)
    return None


@pytest.fixture
def mnist_data() -> Path:
    """Real MNIST's root (see :func:`require_mnist`)."""
    return require_mnist()


def require_mnist() -> Path:
    """Real MNIST's root. Without it the test is skipped, except in CI (``CI=true``), where
    ``../shared/data`` is always there: a skip there would hide a broken set-up, so it fails."""
    root = mnist_root()
    if root is None:
        message = "real MNIST not found ($CASCADE_DATA or ../shared/data)"
        if os.environ.get("CI", "").strip().lower() in ("true", "1", "yes"):
            pytest.fail(f"{message}, and CI=true: in CI it must be there")
        pytest.skip(message)
    return root


@pytest.fixture
def repo() -> Path:
    return REPO


def run_quick(folder: Path, config: Path | str, *sets: str) -> Path:
    """``cascade run CONFIG --quick`` from ``folder`` into ``folder/out``; the output folder."""
    import sys

    from cascade.cli import main

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        mp.setattr(sys, "path", list(sys.path))
        args = ["run", str(config), "--quick", "--quiet", "--out", str(folder / "out")]
        assert main([*args, *[a for s in sets for a in ("--set", s)]]) == 0
    return folder / "out"


@pytest.fixture(scope="session")
def quick_digits_run(tmp_path_factory) -> Path:
    """configs/digits.yaml --quick, shared by the tests that only read it: AppealNet and the
    confidence scores, two stages, both modes."""
    return run_quick(tmp_path_factory.mktemp("digits"), REPO / "configs" / "digits.yaml")


@pytest.fixture(scope="session")
def quick_cascade_run(tmp_path_factory) -> Path:
    """configs/digits_cascade.yaml --quick with two alphas, shared: three stages (two routed,
    the big last)."""
    return run_quick(tmp_path_factory.mktemp("cascade"), REPO / "configs" / "digits_cascade.yaml",
                     "methods.0.alphas=[0.02, 0.05]")


# -- serving: bundles of the quick digits run (one export per session, for every serve test file)


@pytest.fixture(scope="session")
def digits_raw() -> np.ndarray:
    """The digits test split (seed 0) as a client has it: grey levels 0-16, [N, 1, 8, 8]."""
    from tasks.digits import DigitsTask

    test = DigitsTask().build_splits(0).test
    return (test.tensors[0] * 16).round().to(torch.uint8).numpy()


def _appeal_half(bundle: Path, raw: np.ndarray) -> Path:
    """Set the bundle's threshold inside the widest gap of stage-0 scores near their median,
    so that about half of ``raw`` is appealed, and no score sits near the threshold (a
    server on another thread count routes them alike)."""
    import json

    from cascade.deploy.bundle import Bundle

    score = np.sort(Bundle.load(bundle).route(raw, run_last=False).score.numpy())
    lo, hi = int(0.4 * len(score)), int(0.6 * len(score))
    gaps = np.diff(score[lo:hi])
    k = lo + int(gaps.argmax())
    assert gaps.max() > 1e-6
    mf = bundle / "manifest.json"
    manifest = json.loads(mf.read_text())
    manifest["thresholds"] = [float(score[k] + score[k + 1]) / 2]
    mf.write_text(json.dumps(manifest))
    return bundle


@pytest.fixture(scope="session")
def bundles(quick_digits_run, tmp_path_factory, digits_raw) -> dict[str, Path]:
    """A white-box and a black-box bundle of the quick digits run, each appealing about
    half of the test split."""
    from cascade.deploy.export import export_bundle

    out = tmp_path_factory.mktemp("serve_bundles")
    return {mode: _appeal_half(export_bundle(quick_digits_run, out / mode, method="appealnet", mode=mode,
                                             target_ad=0.01, onnx=False), digits_raw)
            for mode in ("white_box", "black_box")}
