"""Helpers shared by the concrete tasks: data roots and stratified splits."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

from cascade import CascadeError

#: the environment variable that points at a folder of real data sets
DATA_ENV = "CASCADE_DATA"


def resolve_data_root(configured: str | None) -> Path:
    """The data root: the config key if set, else ``$CASCADE_DATA``, else a user cache."""
    if configured:
        return Path(configured).expanduser()
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]).expanduser()
    return Path.home() / ".cache" / "cascade" / "data"


def stratified_split(
    labels: np.ndarray, fraction: float, seed: int, what: str
) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(rest, part)`` with ``part`` a stratified ``fraction`` of the samples.

    Raises:
        CascadeError: too few samples (per class) for the requested split.
    """
    idx = np.arange(len(labels))
    try:
        return train_test_split(idx, test_size=fraction, stratify=labels, random_state=seed)
    except ValueError as exc:
        raise CascadeError(f"{what}: data set too small for the requested splits ({len(labels)} samples): {exc}") from None
