"""A run's completion record, ``complete.json``: what a finished run wrote, by SHA-256.

A run removes the record before it writes anything into its folder, and writes it as
its very last file, after the tables, figures and samples and after its resume state is
cleared. So a folder with a record is one whose run finished; a folder without one
holds a run that is unfinished (interrupted, stopped by an error, or a later run into
the same folder that did not finish) and may pair files of two runs. The record holds
the SHA-256 of every file a deployment reads (the config, metrics, operating points,
per-sample table and final checkpoints), so a file changed or swapped afterwards is
found too. :func:`check_finished` is what ``cascade export`` asks before it reads a run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from cascade.core.errors import CascadeError
from cascade.core.files import atomic_write_text, file_sha256
from cascade.runs.layout import CHECKPOINTS, CONFIG, METRICS, POINTS, RECORD, RESUME, SAMPLES

__all__ = ["RECORD", "RECORDED", "RECORD_VERSION", "RunRecord", "check_finished", "clear_record", "recorded_files",
           "write_record"]

#: the record formats this code reads
RECORD_VERSION = 1
#: the files of a run folder the record ties itself to (besides ``checkpoints/*.pt``)
RECORDED = (CONFIG, METRICS, POINTS, SAMPLES)


class RunRecord(BaseModel):
    """``complete.json``.

    Attributes:
        format_version: :data:`RECORD_VERSION`.
        finished: when the run finished (UTC, ISO 8601).
        config: the config file the run was started with, as given (for messages).
        files: ``path relative to the run folder -> SHA-256`` of every recorded file.
    """

    model_config = ConfigDict(extra="forbid")

    format_version: int
    finished: str
    config: str
    files: dict[str, str]


def recorded_files(run: str | Path) -> list[Path]:
    """The files of ``run`` a record covers, relative to it: :data:`RECORDED` that exist and
    every final checkpoint (``checkpoints/*.pt``; the resume state is not one)."""
    run = Path(run)
    names = [Path(n) for n in RECORDED if (run / n).is_file()]
    return names + sorted(p.relative_to(run) for p in (run / CHECKPOINTS).glob("*.pt") if p.is_file())


def clear_record(run: str | Path) -> None:
    """Remove ``run``'s record: a run or resume starts, so the folder is not finished."""
    (Path(run) / RECORD).unlink(missing_ok=True)


def write_record(run: str | Path, config: str = "") -> Path:
    """Write ``run``'s record, the run's last write (atomically); its path.

    Args:
        run: the run folder, every other file of the run written.
        config: the config file the run was started with, for messages.
    """
    run = Path(run)
    files = {p.as_posix(): file_sha256(run / p) for p in recorded_files(run)}
    record = RunRecord(format_version=RECORD_VERSION, config=config, files=files,
                       finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    atomic_write_text(run / RECORD, record.model_dump_json(indent=2) + "\n")
    return run / RECORD


def check_finished(run: str | Path) -> RunRecord:
    """``run``'s record, once the folder is shown to hold one finished run, unchanged.

    Raises:
        CascadeError: one line naming the folder or file and what to do: resume state
            left behind, no record, an unreadable record, or a recorded file that is
            missing or changed, or a checkpoint the record does not know.
    """
    run = Path(run)
    finish = f"finish it with `cascade run CONFIG --out {run} --resume` (its config), then export"
    resume = run / RESUME  # where an unfinished run keeps its training state
    if any(resume.glob("*.pt")):  # as CheckpointStore.files(): a stray temporary file is not state
        raise CascadeError(f"{resume}: an unfinished run left its resume state here, so the folder may pair files "
                           f"of two runs; {finish}")
    path = run / RECORD
    if not path.is_file():
        if not run.is_dir():
            raise CascadeError(f"{run}: not found; give the output folder of a finished `cascade run`")
        raise CascadeError(f"{path}: not found: the run in {run} did not finish (or a later run into the folder was "
                           f"stopped); {finish}")
    try:
        record = RunRecord.model_validate(json.loads(path.read_bytes()))
    except (ValueError, UnicodeDecodeError, ValidationError) as exc:  # JSONDecodeError is a ValueError
        raise CascadeError(f"{path}: not a completion record ({str(exc).splitlines()[0]}); run the experiment "
                           "again into this folder") from None
    if record.format_version != RECORD_VERSION:
        raise CascadeError(f"{path}: format_version {record.format_version}; this cascade reads version "
                           f"{RECORD_VERSION} (run the experiment again with this version)")
    again = f"run `cascade run {record.config or 'CONFIG'} --out {run}` again to export what it measures"
    for name, sha in record.files.items():
        file = run / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise CascadeError(f"{path}: file {name!r} is not inside the run folder")
        if not file.is_file():
            raise CascadeError(f"{file}: missing, though {RECORD} lists it as written by the finished run; {again}")
        if file_sha256(file) != sha:
            raise CascadeError(f"{file}: changed since the run finished (its SHA-256 is not the one {RECORD} "
                               f"records); {again}")
    for p in recorded_files(run):
        if p.as_posix() not in record.files:
            raise CascadeError(f"{run / p}: not written by the run that finished ({RECORD} does not list it); "
                               f"remove it, or {again}")
    return record
