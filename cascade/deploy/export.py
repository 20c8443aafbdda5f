"""``cascade export``: a finished run's router at one operating point, as a bundle (and
:func:`oracle_bundle`, the bundle ``cascade serve-oracle`` serves from a run folder).

Each stage becomes a ``torch.export`` program from a preprocessed batch to
``(output, score)`` with a dynamic batch size; the routing branch (which rows go on)
stays outside the graphs, in :class:`cascade.deploy.bundle.Bundle`, so every network exports.
ONNX files are written beside the programs when ``onnx`` and ``onnxscript`` are
installed and the exporter supports the network (the manifest records why not
otherwise). The manifest's schema is :class:`cascade.deploy.manifest.Manifest`; it holds each
file's SHA-256. The programs carry no sample inputs and no guard code, so that the loader
can refuse any archive that holds a pickle or code (:mod:`cascade.deploy.pt2`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cascade.core.enums import Mode, ThresholdSource
from cascade.core.errors import CascadeError, described
from cascade.core.files import current_umask, file_sha256
from cascade.deploy.bundle import Bundle
from cascade.deploy.manifest import FORMAT_VERSION, MANIFEST
from cascade.deploy.router import RunPoint, ScoredStage, load_run_point
from cascade.nn.cost import measure_cost
from cascade.runs.point_check import recompute_point
from cascade.runs.layout import METRICS, POINTS
from cascade.runs.reader import RunPoints
from cascade.runs.record import check_finished

log = logging.getLogger(__name__)

#: the largest batch the exported programs accept
MAX_BATCH = 1 << 20


class _GraphStage(nn.Module):
    """A stage as a graph-friendly function: ``x -> (output, score)``; the last stage
    (which always answers) returns NaN scores."""

    def __init__(self, stage: nn.Module, last: bool = False):
        super().__init__()
        self.stage, self.last = stage, last

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        out = self.stage(x)
        if self.last:
            return out.output, torch.full((x.shape[0],), float("nan"), dtype=out.output.dtype, device=x.device)
        return out.output, out.q


def export_bundle(
    run_dir: str | Path, out: str | Path, *, method: str | None = None, mode: Mode | str | None = None,
    target_ad: float = 0.005, source: ThresholdSource | str = ThresholdSource.VAL, seed: int | None = None,
    onnx: bool = True, appeal_budget: float | None = None,
) -> Path:
    """Write a bundle of a finished run's method at one operating point.

    Args:
        run_dir: the output folder of ``cascade run``.
        out: the bundle folder to write (replaced if it holds an earlier bundle). The
            bundle is written into a temporary folder beside it and renamed into place
            when complete; an earlier bundle is deleted only then.
        method, mode, target_ad, source, seed, appeal_budget: which system and operating
            point, as in :func:`cascade.deploy.router.load_run_point` (``source`` is its
            threshold source; ``appeal_budget``, when given, picks the point at that budget).
        onnx: also write ONNX files where the exporter supports the network.

    Returns:
        The bundle folder.

    Raises:
        CascadeError: a run that did not finish, or whose files changed since
            (:func:`cascade.runs.record.check_finished`); a ``points.csv`` point that
            ``samples.csv`` does not give (:func:`cascade.runs.point_check.recompute_point`);
            what :func:`~cascade.deploy.router.load_run_point` raises; a method whose
            scores are random (MC dropout); a network torch.export cannot capture; an
            ``out`` that is a file or a non-empty folder that is not a bundle; a file
            that cannot be written (a full disk: one line naming it, nothing left behind).
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).is_file())):
        raise CascadeError(f"{out}: exists and is not a bundle folder; choose a new --out")
    rp = _finished_run_point(run_dir, method=method, mode=mode, target_ad=target_ad, source=source, seed=seed,
                             appeal_budget=appeal_budget)
    modules = _graph_stages(rp)
    tmp = _temp_folder(out)
    writing = [tmp / MANIFEST]  # the file being written, for the one-line error
    try:
        stages = [_export_stage(k, module, rp, tmp, onnx, writing) for k, module in enumerate(modules)]
        if rp.router.big is None:
            stages.append({"index": len(stages), "role": "oracle", "file": None,
                           "mflops": rp.metrics["last_stage_mflops"][rp.mode], "params": None})
        manifest = _manifest(rp, stages, rp.router.threshold)
        writing[0] = tmp / MANIFEST
        _write_file(writing[0], (json.dumps(manifest, indent=2, allow_nan=False) + "\n").encode())
        writing[0] = out
        _replace_folder(tmp, out)
    except OSError as exc:  # a full disk, a quota, a folder made read-only meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
        where = out if writing[0] == out else out / writing[0].name  # the name the user knows, not the temporary
        raise CascadeError(f"{where}: cannot be written ({exc.strerror or exc}); nothing was exported"
                           + (f", {out} is unchanged" if out.exists() else "")) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _graph_stages(rp: RunPoint) -> list[_GraphStage]:
    """The run point's routed stages and (white-box) big network as graph-friendly modules.

    Raises:
        CascadeError: a method whose scores are random (MC dropout).
    """
    router = rp.router
    for stage in router.stages:
        if isinstance(stage, ScoredStage) and not type(stage.predictor).deterministic:
            raise CascadeError(f"{rp.run}: method {rp.method} scores with random numbers, so a bundle could not "
                               "reproduce the run's decisions; export a deterministic method")
    modules = [_GraphStage(s) for s in router.stages]
    if router.big is not None:
        modules.append(_GraphStage(router.big, last=True))
    return modules


def _temp_folder(out: Path) -> Path:
    """A new folder beside ``out`` to write the bundle into, with a new folder's permissions."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        tmp.chmod(0o777 & ~current_umask())  # mkdtemp makes 0700; a bundle folder is as any new folder
    except OSError as exc:
        raise CascadeError(f"{out.parent}: cannot write the bundle there ({exc.strerror or exc})") from None
    return tmp


def _export_stage(k: int, module: _GraphStage, rp: RunPoint, tmp: Path, onnx: bool, writing: list[Path]) -> dict:
    """Write stage ``k``'s program (and ONNX file) into ``tmp``; its manifest entry.
    ``writing[0]`` is set to each file before it is written."""
    shape = tuple(rp.task.input_shape)
    example = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    dynamic = ({0: torch.export.Dim("batch", min=1, max=MAX_BATCH)},)
    module.eval()
    role = "big" if module.last else "routed"
    try:
        program = torch.export.export(module, (example,), dynamic_shapes=dynamic)
    except Exception as exc:  # noqa: BLE001  (torch.export raises many types: all "cannot capture")
        raise CascadeError(f"{rp.run}: stage {k} ({role}) of {rp.method} could not be exported with "
                           f"torch.export: {described(exc)}") from None
    file = f"stage_{k}.pt2"
    writing[0] = tmp / file
    digest = _write_file(writing[0], _program_bytes(program))
    cost = measure_cost(module.stage, shape)
    entry = {"index": k, "role": role, "file": file, "sha256": digest, "mflops": cost.mflops, "params": cost.params}
    if onnx:
        writing[0] = tmp / f"stage_{k}.onnx"
        entry.update(_export_onnx(module, example, dynamic, writing[0]))
    return entry


def _program_bytes(program: torch.export.ExportedProgram) -> bytes:
    """The ``.pt2`` archive of a stage program, in memory.

    The bundle's programs carry no sample inputs (torch would unpickle them on load) and
    no guard code (``.module()`` would exec it), so that :func:`cascade.deploy.pt2.load_program`
    can refuse any archive holding either. Saving to memory, not to a path, keeps torch's
    C++ file writer off the disk: on a full disk its destructor throws again and the
    process aborts (SIGABRT, exit code 134); Python writes the bytes instead.
    """
    program.example_inputs = None
    program._guards_code = []  # noqa: SLF001  (empty for a dynamic batch; cleared so it is never exec'd)
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


def _write_file(path: Path, data: bytes) -> str:
    """Write ``data`` to ``path``, flushed to disk; its SHA-256 hex digest."""
    with path.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return hashlib.sha256(data).hexdigest()


def _replace_folder(new: Path, out: Path) -> None:
    """Put the complete bundle ``new`` at ``out``: an earlier bundle there is moved aside
    first and deleted only once the new one is in place."""
    if not out.exists():
        new.rename(out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
    old.rmdir()
    out.rename(old)
    try:
        new.rename(out)
    except OSError:
        old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _finished_run_point(run_dir: str | Path, *, source: str, **kw: Any) -> RunPoint:
    """:func:`~cascade.deploy.router.load_run_point` of a run shown finished and unchanged
    (:func:`cascade.runs.record.check_finished`), its point recomputed from ``samples.csv``
    (:func:`cascade.runs.point_check.recompute_point`): the threshold and the expected figures
    exported are the recomputed ones."""
    check_finished(run_dir)
    rp = load_run_point(run_dir, threshold_source=source, **kw)
    rp.point = recompute_point(rp.run, rp.metrics, rp.point)
    rp.router.threshold = float(rp.point["threshold"])
    return rp


def _manifest(rp: RunPoint, stages: list[dict], threshold: float) -> dict[str, Any]:
    try:
        ours = version("cascade-routing")
    except PackageNotFoundError:  # run from a source tree that was never installed
        ours = None
    task, p = rp.task, rp.point
    kind = task.criterion.kind.value
    names = task.output_names or tuple(str(i) for i in range(task.num_outputs))
    expected = {k: p.get(k) for k in ("skipping_rate", "appeal_rate", "ad", "system_accuracy", "cost_mflops",
                                      "relative_cost")}
    return {
        "format_version": FORMAT_VERSION,
        "task": rp.metrics["task"],
        "kind": kind,
        "input": {"shape": list(task.input_shape), "dtype": "float32"},
        "preprocessing": None if task.preprocessing is None else asdict(task.preprocessing),
        "output_names": list(names),
        "stages": stages,
        # one threshold per decision point: stage k answers where its score >= thresholds[k]; null
        # (a guaranteed point that certified nothing) stops no input there, in strict JSON
        "thresholds": [threshold if math.isfinite(threshold) else None] * (len(stages) - 1),
        "operating_point": {
            "method": rp.method, "mode": rp.mode, "variant": rp.variant, "seed": rp.seed,
            "target_ad": p["target_ad"], "appeal_budget": p.get("appeal_budget"),
            "threshold_source": p["threshold_source"], "delta": p.get("delta"),
            "feasible": bool(p["feasible"]),
            # measured by the run on its test split at this threshold
            "expected": expected,
        },
        "run": {"path": str(rp.run.resolve()), "config": rp.metrics.get("config"),
                "config_sha256": hashlib.sha256(rp.config_text.encode()).hexdigest()},
        "versions": {"cascade": ours, "torch": torch.__version__},
    }


def _export_onnx(module: nn.Module, example: Tensor, dynamic: tuple, path: Path) -> dict[str, Any]:
    """``{"onnx": file}`` when the exporter supports the network, else ``{"onnx": None,
    "onnx_error": why}``; a failure here never fails the export."""
    try:
        import onnx  # noqa: F401  (the exporter needs both)
        import onnxscript  # noqa: F401
    except ImportError:
        return {"onnx": None, "onnx_error": "onnx and onnxscript are not installed (pip install 'cascade-routing[onnx]')"}
    try:
        # the exporter prints its progress and warns about its own internals: keep the CLI quiet
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logging.disable(logging.WARNING)
            try:
                torch.onnx.export(module, (example,), str(path), dynamo=True, input_names=["x"],
                                  output_names=["output", "score"], dynamic_shapes=dynamic,
                                  external_data=False)  # one file per stage (networks under 2 GB)
            finally:
                logging.disable(logging.NOTSET)
    except OSError:  # a full disk is the export's failure, not the exporter's
        raise
    except Exception as exc:  # noqa: BLE001  (the exporter fails in many types; the .pt2 is what counts)
        path.unlink(missing_ok=True)
        log.warning("%s: no ONNX file (%s)", path.name, described(exc))
        return {"onnx": None, "onnx_error": described(exc)}
    return {"onnx": path.name, "onnx_sha256": file_sha256(path)}




@contextlib.contextmanager
def oracle_bundle(source: str | Path) -> Iterator[Bundle]:
    """The bundle ``cascade serve-oracle`` serves: ``source`` itself when it is a bundle,
    else a white-box bundle exported from the run folder ``source`` into a temporary
    folder (removed on exit).

    Yields:
        The loaded :class:`~cascade.deploy.bundle.Bundle`.

    Raises:
        CascadeError: a path that is neither; a black-box bundle; a run with no
            white-box mode.
    """
    source = Path(source)
    if (source / MANIFEST).is_file():
        bundle = Bundle.load(source)
        if not bundle.has_last_stage:
            raise CascadeError(f"{source}: a black-box bundle holds no big network to serve as an oracle; give a "
                               "white-box bundle or the run folder")
        yield bundle
        return
    metrics = source / METRICS
    if not metrics.is_file():
        raise CascadeError(f"{source}: neither a bundle (no manifest.json) nor a finished run folder "
                           "(no metrics.json)")
    modes = json.loads(metrics.read_text()).get("modes", [])
    if Mode.WHITE_BOX not in modes:
        raise CascadeError(f"{source}: the run has no white_box mode (modes: {', '.join(modes) or 'none'}), so no "
                           "big network to serve; run it with modes: [white_box, ...]")
    if not (source / POINTS).is_file():
        raise CascadeError(f"{source / POINTS}: not found; is {source} the output folder of a finished `cascade run`?")
    with tempfile.TemporaryDirectory(prefix="cascade-oracle-") as tmp:
        # every white-box operating point carries the same big network (the oracle ignores
        # thresholds); one whose method's scores are random cannot be exported: try the next
        error = None
        for method, target_ad, threshold_source in RunPoints(source).white_box_points():
            try:
                path = export_bundle(source, Path(tmp) / "bundle", method=method, mode=Mode.WHITE_BOX,
                                     target_ad=target_ad, source=threshold_source, onnx=False)
            except CascadeError as exc:
                error = exc
                continue
            yield Bundle.load(path)
            return
        raise error
