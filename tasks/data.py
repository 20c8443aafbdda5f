"""Helpers shared by the concrete tasks: data roots, stratified splits, and checks that
turn a damaged data file into a one-line :class:`DataError` naming the file and row."""

from __future__ import annotations

import logging
import os
import struct
from pathlib import Path
from typing import Literal

import numpy as np
from sklearn.model_selection import train_test_split

from cascade import CascadeError, DataError

log = logging.getLogger("cascade")

#: the environment variable that points at a folder of real data sets
DATA_ENV = "CASCADE_DATA"


def resolve_data_root(configured: str | None) -> Path:
    """The data root: the config key if set, else ``$CASCADE_DATA``, else a user cache."""
    if configured:
        return Path(configured).expanduser()
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]).expanduser()
    return Path.home() / ".cache" / "cascade" / "data"


def describe_data_root(configured: str | None) -> str:
    """Where :func:`resolve_data_root`'s answer came from, for messages."""
    if configured:
        return "task.data_root"
    return f"${DATA_ENV}" if os.environ.get(DATA_ENV) else f"the default data root (set task.data_root or ${DATA_ENV})"


def stratified_split(
    labels: np.ndarray, fraction: float, seed: int, what: str
) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(rest, part)`` with ``part`` a stratified ``fraction`` of the samples
    (a float in (0, 1)) or that many samples (an int).

    Raises:
        CascadeError: too few samples (per class) for the requested split.
    """
    idx = np.arange(len(labels))
    try:
        return train_test_split(idx, test_size=fraction, stratify=labels, random_state=seed)
    except ValueError as exc:
        raise CascadeError(f"{what}: data set too small for the requested splits ({len(labels)} samples): {exc}") from None


def read_idx_header(path: Path, ndim: int, item_shape: tuple[int, ...] = ()) -> int:
    """Check an uncompressed IDX file of unsigned bytes (MNIST's format) against its size.

    Args:
        path: the file.
        ndim: its number of dimensions (3 for images, 1 for labels).
        item_shape: the expected shape of one item (``(28, 28)``), or ``()`` for any.

    Returns:
        The number of items (the first dimension).

    Raises:
        DataError: missing file, a header that is not IDX of unsigned bytes with ``ndim``
            dimensions, an unexpected item shape, or a size that disagrees with the header
            (a truncated or padded file).
    """
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(4 + 4 * ndim)
    if len(head) < 4 + 4 * ndim:
        raise DataError(f"{path}: truncated: {size} bytes, shorter than an IDX header")
    if head[:2] != b"\0\0" or head[2] != 0x08 or head[3] != ndim:
        raise DataError(f"{path}: bad IDX header: magic number 0x{head[:4].hex()}, expected 0x0000080{ndim} "
                        f"(unsigned bytes, {ndim} dimension(s))")
    dims = struct.unpack(f">{ndim}I", head[4:])
    if item_shape and tuple(dims[1:]) != tuple(item_shape):
        raise DataError(f"{path}: bad IDX header: items of shape {list(dims[1:])}, expected {list(item_shape)}")
    expected = 4 + 4 * ndim + int(np.prod(dims, dtype=np.int64))
    if size != expected:
        raise DataError(f"{path}: {'truncated' if size < expected else 'too long'}: {size} bytes, "
                        f"the header says {expected} ({dims[0]} items)")
    return int(dims[0])


def check_labels(
    labels: np.ndarray, num_classes: int, source: str, on_malformed: Literal["error", "skip"] = "error"
) -> np.ndarray:
    """Bool mask of the labels in ``0..num_classes-1``.

    Args:
        labels: ``[N]`` integer labels.
        num_classes: the task's number of classes.
        source: the file they came from, in messages.
        on_malformed: ``"error"`` raises on the first bad label; ``"skip"`` logs how many
            there are and leaves them out of the mask.

    Raises:
        DataError: a label outside the classes, naming the file and index (``"error"``),
            or no valid label at all.
    """
    ok = (labels >= 0) & (labels < num_classes)
    if ok.all():
        return ok
    bad = np.flatnonzero(~ok)
    if on_malformed == "error":
        raise DataError(f"{source}: index {bad[0]}: label {labels[bad[0]]} outside the classes 0..{num_classes - 1} "
                        f"({len(bad)} such labels; set task.on_malformed: skip to drop them)")
    if not ok.any():
        raise DataError(f"{source}: no label within the classes 0..{num_classes - 1}")
    log.warning("%s: skipped %d sample(s) with a label outside 0..%d (indices %s)", source, len(bad),
                num_classes - 1, ", ".join(map(str, bad[:10])) + (" ..." if len(bad) > 10 else ""))
    return ok


def read_image(path: str | Path) -> np.ndarray:
    """An image file as an array (``[H, W]`` grey or ``[H, W, C]``), for tasks that read
    image folders.

    Raises:
        DataError: missing file, or one that does not decode as an image.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: image not found")
    try:
        with Image.open(path) as img:
            img.load()  # decode now: a truncated file fails here, not later in a worker
            return np.asarray(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: not a readable image ({exc})") from None
