"""Resumable training state: one checkpoint per training phase, and a cache of trained networks.

Files are written through :mod:`cascade.core.files` (atomic, read back with
``weights_only=True``). :class:`CheckpointStore` keeps one trainer state per training
phase of a run, fingerprinted by the config that wrote it; :class:`NetworkCache` keeps
trained networks across runs (the big network, the pre-trained stages), keyed by what
decides them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from cascade.core.errors import CascadeError, CheckpointError
from cascade.core.files import atomic_save, load_checkpoint
from cascade.training import distributed
from cascade.training.hooks import HookBase
from cascade.training.trainer import Trainer, state_differences

log = logging.getLogger(__name__)

#: version of the training-checkpoint layout written by :class:`CheckpointHook`
CHECKPOINT_FORMAT = 1


class CheckpointHook(HookBase):
    """Writes the trainer's state atomically to ``path`` after every epoch and on Ctrl-C.

    The file holds ``{"format", **meta, "trainer": trainer.state_dict()}``; read it with
    :func:`load_checkpoint`.

    Args:
        path: the file, replaced at each write.
        meta: plain data saved alongside (e.g. the run's config fingerprint).
    """

    def __init__(self, path: str | Path, meta: dict[str, Any] | None = None):
        self.path = Path(path)
        self.meta = dict(meta or {})

    def _save(self, trainer: Trainer) -> None:
        if distributed.is_main():  # the ranks hold the same state: rank 0 writes it
            atomic_save({"format": CHECKPOINT_FORMAT, **self.meta, "trainer": trainer.state_dict()}, self.path)
        trainer.last_checkpoint = f"{self.path} (epoch {trainer.epoch}, step {trainer.step})"

    def after_epoch(self, trainer: Trainer) -> None:
        self._save(trainer)

    def on_interrupt(self, trainer: Trainer) -> None:
        self._save(trainer)


def fingerprint_differences(saved: Any, now: Any, prefix: str = "") -> list[str]:
    """``key.path: <saved> in the checkpoint, <now> now`` for every leaf that differs."""
    if isinstance(saved, dict) and isinstance(now, dict):
        out = []
        for k in sorted(set(saved) | set(now), key=str):
            key = f"{prefix}.{k}" if prefix else str(k)
            if k not in saved:
                out.append(f"{key}: absent in the checkpoint, {_short(now[k])} now")
            elif k not in now:
                out.append(f"{key}: {_short(saved[k])} in the checkpoint, absent now")
            else:
                out += fingerprint_differences(saved[k], now[k], key)
        return out
    return [] if saved == now else [f"{prefix or '<root>'}: {_short(saved)} in the checkpoint, {_short(now)} now"]


def _short(value: Any, width: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


class CheckpointStore:
    """One resumable checkpoint per training phase of a run, in ``folder``.

    :meth:`fit` trains a :class:`Trainer` with a :class:`CheckpointHook` writing
    ``<folder>/<name>.pt`` (the trainer's ``name``, made file-safe) after every epoch and
    on Ctrl-C. With ``resume``, an existing file is loaded first: a finished phase is not
    trained again (its weights, hooks, objective and RNG states are restored, so what
    follows draws the same random numbers), an unfinished one continues from where it
    stopped. Phases must run in the same order on resume as they did before; a name used
    twice in one run gets a numbered file of its own.

    Args:
        folder: where the files go.
        fingerprint: plain data describing everything that decides training (the
            resolved config); a file written under a different one is refused.
        resume: load existing files; without it they are overwritten.
    """

    def __init__(self, folder: str | Path, fingerprint: dict[str, Any], resume: bool = False):
        self.folder = Path(folder)
        self.fingerprint = fingerprint
        self.resume = resume
        self._claimed: dict[str, int] = {}

    def files(self) -> list[Path]:
        """The checkpoint files in the folder."""
        return sorted(self.folder.glob("*.pt")) if self.folder.is_dir() else []

    def path(self, name: str) -> Path:
        """The file of the phase ``name`` (without claiming it)."""
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "phase"
        return self.folder / f"{slug}.pt"

    def _claim(self, name: str) -> Path:
        count = self._claimed.get(name, 0)
        self._claimed[name] = count + 1
        path = self.path(name)
        return path if count == 0 else path.with_name(f"{path.stem}_{count + 1}.pt")

    def read(self, path: Path, phase: str | None = None) -> dict[str, Any]:
        """A checkpoint of this store, checked against the fingerprint (and ``phase``).

        Raises:
            CheckpointError: unreadable, not a training checkpoint, another phase's, or
                written under a different config (the keys that differ are named).
        """
        ckpt = load_checkpoint(path)
        if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT or "trainer" not in ckpt:
            raise CheckpointError(f"{path}: not a cascade training checkpoint (format {CHECKPOINT_FORMAT})")
        diffs = fingerprint_differences(ckpt.get("fingerprint"), self.fingerprint)
        if diffs:
            more = f" (and {len(diffs) - 4} more)" if len(diffs) > 4 else ""
            raise CheckpointError(f"{path}: written by a different config: {'; '.join(diffs[:4])}{more}; "
                                  "resume with the config it was written with, or start over in another --out")
        if phase is not None and ckpt.get("phase") != phase:
            raise CheckpointError(f"{path}: the checkpoint of phase {ckpt.get('phase')!r}, not {phase!r}")
        return ckpt

    def verify(self) -> None:
        """Check every file in the folder against the fingerprint, before any work.

        Raises:
            CheckpointError: see :meth:`read`.
        """
        for path in self.files():
            self.read(path)

    def fit(self, trainer: Trainer, finished: Callable[[Trainer], None] | None = None) -> None:
        """Train ``trainer`` with per-epoch checkpoints, resuming from its file if asked.

        Args:
            trainer: the phase.
            finished: marks ``trainer`` as done (loads a network trained before, e.g. from
                a :class:`NetworkCache`); used unless the phase resumes from its own file,
                and recorded as the phase's checkpoint, so ``--resume`` finds it finished.

        Raises:
            CheckpointError: the phase's file does not fit (see :meth:`read`; the network,
                optimizer or hooks differ).
            TrainingError, KeyboardInterrupt: see :meth:`Trainer.train`.
        """
        path = self._claim(trainer.name)
        hook = CheckpointHook(path, {"phase": trainer.name, "fingerprint": self.fingerprint})
        trainer.hooks.append(hook)
        if finished is not None and not (self.resume and path.is_file()):
            finished(trainer)
            hook._save(trainer)
        elif self.resume and path.is_file():
            ckpt = self.read(path, trainer.name)
            try:
                trainer.load_state_dict(ckpt["trainer"])
            except CheckpointError as exc:
                raise CheckpointError(f"{path}: {exc}") from None
            trainer.last_checkpoint = f"{path} (epoch {trainer.epoch}, step {trainer.step})"
            done = "finished, not trained again" if trainer.epoch >= trainer.epochs else "continuing"
            log.info("%s: resumed from %s at epoch %d, step %d (%s)", trainer.name, path, trainer.epoch,
                     trainer.step, done)
        trainer.train()

    def clear(self) -> None:
        """Remove the files (the run finished; its final weights are saved elsewhere)."""
        for path in self.files():
            path.unlink()
        with contextlib.suppress(OSError):
            self.folder.rmdir()


# ----------------------------------------------------------------------------- network cache

#: version of the cache entries' layout and of what their keys mean; a change of either
#: makes every earlier entry a miss
NETWORK_CACHE_FORMAT = 1


def network_cache_dir(setting: str | None) -> Path:
    """The cache folder: ``setting`` (the config's ``cache_dir``), else ``$CASCADE_CACHE``,
    else ``~/.cache/cascade/networks``.

    Raises:
        CascadeError: the folder lies inside the source tree cascade is imported from.
    """
    folder = Path(setting or os.environ.get("CASCADE_CACHE") or Path.home() / ".cache" / "cascade" / "networks")
    folder = folder.expanduser().resolve()
    source = Path(__file__).resolve().parents[2]
    if (source / "pyproject.toml").is_file() and folder.is_relative_to(source):
        raise CascadeError(f"cache_dir: {folder} is inside the source tree {source}; choose a folder outside it "
                           "(default: $CASCADE_CACHE or ~/.cache/cascade/networks)")
    return folder


class NetworkCache:
    """Trained networks kept across runs: one file per key, written atomically.

    A key is plain data naming everything that decides a training phase's result (the
    task's options, the network, the phase's settings, the seed, the device type...). Its
    file holds the trained weights and what the run records of the phase (its loss
    history and step count), so a run that loads it reports what a run that trained it
    does. A file that cannot be read, or whose weights no longer fit the network (its
    code changed), is a miss: the phase trains and the file is replaced.

    Args:
        folder: where the files go (see :func:`network_cache_dir`).
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    @staticmethod
    def _text(key: dict[str, Any]) -> str:
        return json.dumps({"format": NETWORK_CACHE_FORMAT, **key}, sort_keys=True)

    def path(self, key: dict[str, Any], label: str) -> Path:
        """The file of ``key``; ``label`` (``big``, ``stage0``) starts its name, for people."""
        digest = hashlib.sha256(self._text(key).encode()).hexdigest()[:24]
        return self.folder / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', label)}-{digest}.pt"

    def load(self, key: dict[str, Any], label: str) -> tuple[Path, dict[str, Any]] | None:
        """``(file, entry)`` of ``key``, or None (no file, or one that cannot be used: a warning)."""
        path = self.path(key, label)
        if not path.is_file():
            return None
        try:
            entry = load_checkpoint(path)
        except CheckpointError as exc:
            log.warning("network cache: %s; training instead, and replacing it", exc)
            return None
        if not isinstance(entry, dict) or entry.get("key") != self._text(key) or "model" not in entry:
            log.warning("network cache: %s is not the entry of this key; training instead, and replacing it", path)
            return None
        return path, entry

    def save(self, key: dict[str, Any], label: str, model_state: dict[str, torch.Tensor],
             record: dict[str, Any]) -> Path:
        """Write ``key``'s entry atomically: the weights (on the CPU) and ``record``
        (plain data, e.g. the phase's history and steps)."""
        path = self.path(key, label)
        state = {k: v.detach().cpu() for k, v in model_state.items()}
        atomic_save({"key": self._text(key), "model": state, "torch": str(torch.__version__),
                     "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **record}, path)
        return path

    @staticmethod
    def fits(entry: dict[str, Any], model: torch.nn.Module) -> str:
        """How the entry's weights differ from ``model``'s (``""`` when they fit)."""
        return state_differences(entry["model"], model.state_dict())
