"""Files written whole or not at all, and checkpoints read as data.

Every file is written to a temporary name in the same folder and renamed into place, so
a crash or a full disk never leaves half a file; :func:`load_checkpoint` uses
``torch.load(weights_only=True)``, so a checkpoint never runs code. Nothing here knows
about training: the deploy path (``cascade route``, export) writes through it too.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pickle
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from cascade.core.errors import CascadeError, CheckpointError

#: what the temporary files of :func:`atomic_path` are called: ``.<name>.<random>.tmp``
TEMP_PREFIX, TEMP_SUFFIX = ".", ".tmp"


def file_sha256(path: str | Path) -> str:
    """The SHA-256 hex digest of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def current_umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _create_temporary(path: Path) -> Path:
    """A new empty file beside ``path``, created with mode 0o666 so that the kernel applies
    the umask (``tempfile.mkstemp`` makes every file 0o600, whatever the umask)."""
    for _ in range(100):
        tmp = path.with_name(f"{TEMP_PREFIX}{path.name}.{secrets.token_hex(4)}{TEMP_SUFFIX}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"{path.parent}: no free temporary name for {path.name}")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path in ``path``'s folder, renamed over ``path`` if the block succeeds.

    Readers see the old file or the new one, never half of one (an interrupt or a full
    disk leaves the old file as it was, and no temporary file). The file gets the mode
    any new file gets (0o666 less the umask).

    Raises:
        CascadeError: the folder or the file cannot be written (a full disk, no
            permission): one line naming ``path``.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _create_temporary(path)
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        raise CascadeError(f"{path}: cannot write it ({exc.strerror or exc}); nothing was written "
                           "(an earlier file of that name is left as it was)") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def remove_stray_temporaries(folder: str | Path) -> list[Path]:
    """Remove the temporary files :func:`atomic_path` leaves in ``folder`` (not below it)
    when a process is killed mid-write; the files removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stray = [p for p in folder.glob(f"{TEMP_PREFIX}*{TEMP_SUFFIX}") if p.is_file()]
    for p in stray:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    return stray


#: what torch's archive writer says when the file under it fails (a full disk, typically)
_TORCH_WRITE_FAILURES = ("PytorchStreamWriter", "unexpected pos", "inline_container")


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``.

    The archive is built in memory first, so a full disk fails in a plain file write
    (one line naming ``path``, see :func:`atomic_path`), not inside torch's writer.

    Raises:
        CascadeError: ``path`` cannot be written.
    """
    buffer = io.BytesIO()
    try:
        torch.save(obj, buffer)
    except RuntimeError as exc:
        if not any(s in str(exc) for s in _TORCH_WRITE_FAILURES):
            raise
        raise CascadeError(f"{path}: cannot write it (torch's writer failed: {_first_line(exc)}; is the disk "
                           "full?); nothing was written") from None
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getbuffer())


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def load_checkpoint(path: str | Path) -> Any:
    """Read a file written by ``torch.save`` with ``weights_only=True``: tensors and plain
    data only, never code.

    Raises:
        CheckpointError: missing, truncated or corrupt file, or one that would need to
            unpickle code (refused).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        if found:  # the file names a class or function to call: refuse, never run it
            raise CheckpointError(f"{path}: refused: it holds more than tensors and plain data ({found.group(1)}), "
                                  "and loading it would run code (checkpoints load with weights_only=True)") from None
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt: {_first_line(exc)})") from None
    except Exception as exc:  # torch raises RuntimeError, EOFError, KeyError... on a damaged file
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt: {_first_line(exc)})") from None


def _first_line(exc: Exception) -> str:
    """The gist of a loading error, on one line."""
    text = str(exc)
    found = re.search(r"WeightsUnpickler error: *([^\n]*)", text)
    if found and found.group(1).strip():
        text = found.group(1)
    else:
        following = re.search(r"WeightsUnpickler error: *\n\s*([^\n]+)", text)
        text = following.group(1) if following else (text.splitlines() or [""])[0]
    return f"{type(exc).__name__}: {text.strip()[:100]}"


