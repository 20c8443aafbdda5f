"""One writer for a run's output folder: every file atomic, and ``run.log``.

Readers (a user, ``Router.from_run``, a crashed run's ``--resume``) see each file whole
or not at all: everything is written to a temporary name in the same folder and renamed
into place. ``run.log`` gets a line per phase with its wall time, device, samples and steps.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from cascade.core.files import (
    atomic_path,
    atomic_save,
    atomic_write_text,
    remove_stray_temporaries,
)
from cascade.runs.layout import CHECKPOINTS, FIGURES, RESUME, RUN_LOG

log = logging.getLogger(__name__)
#: the logger whose records (every cascade module's) ``run.log`` copies
_CASCADE_LOG = logging.getLogger("cascade")


#: the folders of a run that atomic writes go to (see :meth:`RunWriter.remove_stray_temporaries`)
WRITTEN_FOLDERS = (".", FIGURES, CHECKPOINTS, RESUME)


class RunWriter:
    """Writes the files of one run into ``out``.

    Creating it removes the temporary files a killed run left behind.

    Args:
        out: the run's folder (created).
    """

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.remove_stray_temporaries()

    def remove_stray_temporaries(self) -> None:
        """Delete the half-written temporary files (``.<name>.<random>.tmp``) that a run
        killed mid-write leaves in the run's folders; one run writes a folder at a time."""
        stray = [p for folder in WRITTEN_FOLDERS for p in remove_stray_temporaries(self.out / folder)]
        if stray:
            log.info("%s: removed %d temporary file(s) a killed run left: %s", self.out, len(stray),
                     ", ".join(str(p.relative_to(self.out)) for p in stray[:5]) + (" ..." if len(stray) > 5 else ""))

    def path(self, name: str) -> Path:
        return self.out / name

    def text(self, name: str, text: str) -> None:
        atomic_write_text(self.out / name, text)

    def json(self, name: str, data: Any) -> None:
        self.text(name, json.dumps(data, indent=2))

    def yaml(self, name: str, data: Any) -> None:
        self.text(name, yaml.safe_dump(data, sort_keys=False))

    def csv(self, name: str, frame: pd.DataFrame) -> None:
        with atomic_path(self.out / name) as tmp:
            frame.to_csv(tmp, index=False)

    def checkpoint(self, name: str, state: Any) -> None:
        atomic_save(state, self.out / CHECKPOINTS / name)

    def figure(self, fig: Any, name: str, dpi: int = 120) -> None:
        """Save a matplotlib figure as ``figures/<name>`` and close it."""
        import matplotlib.pyplot as plt  # optional heavy dependency: only where figures are drawn

        with atomic_path(self.out / FIGURES / name) as tmp:
            fig.savefig(tmp, dpi=dpi, format=Path(name).suffix.lstrip(".") or "png")
        plt.close(fig)

    @contextlib.contextmanager
    def logging_to_file(self, append: bool) -> Iterator[None]:
        """Copy the ``cascade`` logger's records (INFO and up) into ``run.log`` while the
        block runs (appended to on ``--resume``)."""
        handler = logging.FileHandler(self.out / RUN_LOG, mode="a" if append else "w")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        handler.setLevel(logging.INFO)
        root = _CASCADE_LOG
        level = root.level
        if root.getEffectiveLevel() > logging.INFO:
            root.setLevel(logging.INFO)  # the file gets INFO; other handlers keep their own levels
        root.addHandler(handler)
        try:
            yield
        finally:
            root.removeHandler(handler)
            root.setLevel(level)
            handler.close()


@contextlib.contextmanager
def timed_phase(name: str, **facts: Any) -> Iterator[dict[str, Any]]:
    """Log ``name`` with its wall time and ``facts`` (device, samples, steps...) once it ends.

    The block may add facts to the yielded dict (e.g. the steps it took).
    """
    start = time.perf_counter()
    yield facts
    details = ", ".join(f"{k} {v}" for k, v in facts.items())
    log.info("phase %s: %.2f s%s", name, time.perf_counter() - start, f" ({details})" if details else "")
