"""The inputs ``cascade route`` reads (a ``.npy`` array, a CSV of features, a folder of images), routed.

Every reader keeps where each input came from (its CSV line, its image file), so an
error names the input by its absolute index in the file and its line or file, never by
its row inside a batch. Images are refused above :data:`MAX_IMAGE_PIXELS` (width x
height) before they are decoded: ``cascade serve`` takes arrays only and decodes no
image, so this is the one image limit of the deploy path.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from cascade.deploy.bundle import IMAGE_SUFFIXES, Bundle, RoutedBatch
from cascade.core.enums import TaskKind
from cascade.core.errors import CascadeError

#: the most pixels (width x height) an input image may have: 50 M, e.g. 7071 x 7071
#: (a decoded RGB image of that size takes 150 MB; PIL itself refuses twice its own 89 M)
MAX_IMAGE_PIXELS = 50_000_000


@dataclass
class InputFile:
    """Raw inputs read from one file or folder.

    Attributes:
        path: the file or folder.
        names: ``[N]`` each input's name: its index, or its image file's name.
        values: ``[N, ...]`` the raw inputs (a read-only memory map for ``.npy``).
        first_line: a CSV's line number (1-based) of input 0; None for other formats.
    """

    path: Path
    names: list[str]
    values: np.ndarray
    first_line: int | None = None

    def __len__(self) -> int:
        return len(self.names)

    def where(self, i: int) -> str:
        """Input ``i`` in words, for messages: ``input 300 (line 302)``."""
        if self.first_line is not None:
            return f"input {i} (line {self.first_line + i})"
        if self.names[i] != str(i):
            return f"input {i} ({self.names[i]})"
        return f"input {i}"


def load_inputs(path: str | Path, bundle: Bundle, *, header: bool | None = None,
                max_pixels: int = MAX_IMAGE_PIXELS) -> InputFile:
    """Raw inputs from a file or folder, and a name for each (row number or file name).

    - ``.npy``: an array ``[N, *input_shape]`` (or ``[N, D]``, rows flattened) of real
      numbers (no pickled objects);
    - ``.csv``: one input per row, its values flattened; see ``header``;
    - a folder of images: each resized to the input's height and width, grey or RGB by
      its channels, pixel values mapped to the task's raw range.

    Args:
        path: the file or folder.
        bundle: the bundle the inputs are for (their width, image preprocessing).
        header: a CSV's first row is a header (True), data (False), or (None) a header
            when it is not numeric or equals ``0, 1, ..., D-1`` (what pandas writes for a
            frame with no column names, ``pd.DataFrame(x).to_csv(index=False)``).
        max_pixels: images with more pixels are refused before they are decoded.

    Raises:
        CascadeError: a missing path, an unreadable file, a wrong width or dtype, a cell
            that is not a finite number (naming its line), an image over ``max_pixels``,
            a task with no image preprocessing.
    """
    path = Path(path)
    if path.is_dir():
        return _read_images(path, bundle, max_pixels)
    if not path.is_file():
        raise CascadeError(f"{path}: not found")
    if path.suffix.lower() == ".npy":
        return _read_npy(path, bundle)
    if path.suffix.lower() == ".csv":
        return _read_csv(path, bundle, header)
    raise CascadeError(f"{path}: give a .npy array, a .csv of features, or a folder of images")


def _read_npy(path: Path, bundle: Bundle) -> InputFile:
    try:
        # a memory map: a header that claims more rows than the file holds fails here, and
        # a large array is read batch by batch, never whole
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise CascadeError(f"{path}: not a numpy array file ({exc})") from None
    if not isinstance(arr, np.ndarray) or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool) \
            or np.issubdtype(arr.dtype, np.complexfloating):
        raise CascadeError(f"{path}: dtype {getattr(arr, 'dtype', type(arr).__name__)} is not a real number type")
    shape, width = tuple(bundle.input_shape), int(np.prod(bundle.input_shape))
    if arr.ndim == 2 and arr.shape[1] == width and shape != (width,):
        arr = arr.reshape(len(arr), *shape)  # flattened rows, as a CSV holds them (a view: still a memory map)
    grey = shape[0] == 1 and arr.shape[1:] == shape[1:]  # grey images without a channel axis
    if arr.ndim < 1 or (arr.shape[1:] != shape and not grey and arr.shape != shape):
        want = ", ".join(map(str, shape))
        flat = f" (or [N, {width}], each row flattened)" if len(shape) > 1 else ""
        raise CascadeError(f"{path}: an array of shape {list(arr.shape)}; this bundle takes [N, {want}]{flat}")
    if arr.shape == shape and not grey:  # one input
        arr = arr.reshape(1, *shape)
    return InputFile(path, [str(i) for i in range(len(arr))], arr)


def _read_csv(path: Path, bundle: Bundle, header: bool | None) -> InputFile:
    width = int(np.prod(bundle.input_shape))
    try:
        frame = pd.read_csv(path, header=None, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise CascadeError(f"{path}: not a readable CSV ({str(exc).splitlines()[0]})") from None
    values = frame.apply(pd.to_numeric, errors="coerce")
    if header is None and len(values):
        first = values.iloc[0]
        if first.isna().all():  # column names
            header = True
        elif first.notna().all():  # numbers: a header only if it is pandas' 0..D-1
            header = bool(len(first) == values.shape[1] and (first.to_numpy() == np.arange(len(first))).all())
        else:
            raise CascadeError(f"{path}: line 1 mixes numbers and text: pass --header if it names the columns, "
                               "--no-header if it is an input")
    skip = 1 if header and len(values) else 0
    values = values.iloc[skip:]
    if values.shape[1] != width:
        raise CascadeError(f"{path}: {values.shape[1]} columns; this bundle's input {list(bundle.input_shape)} "
                           f"has {width} values per row")
    arr = values.to_numpy(np.float64)
    bad = ~np.isfinite(arr)
    if bad.any():
        row, col = (int(v[0]) for v in np.nonzero(bad))
        cell = frame.iat[row + skip, col]
        raise CascadeError(f"{path}: line {row + skip + 1}: a cell that is not a finite number (input {row}, "
                           f"column {col + 1}: {cell!r})")
    arr = arr.astype(np.float32).reshape(len(arr), *bundle.input_shape)
    return InputFile(path, [str(i) for i in range(len(arr))], arr, first_line=skip + 1)


def _read_images(folder: Path, bundle: Bundle, max_pixels: int) -> InputFile:
    from PIL import Image, UnidentifiedImageError  # optional heavy dependency: only image folders need it

    shape = bundle.input_shape
    if bundle._pre is None or len(shape) != 3 or shape[0] not in (1, 3):
        raise CascadeError(f"{folder}: this bundle's task declares no image input (Task.preprocessing, a "
                           f"[1 or 3, H, W] input; it takes {list(shape)}); route a .npy array instead")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise CascadeError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    channels, height, width = shape
    raw_max = bundle._pre[0]
    images = []
    for f in files:
        try:
            # PIL warns between its own limit and twice it, and raises above: our limit decides
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(f) as im:  # reads the header only: the size is known before decoding
                    if im.width * im.height > max_pixels:
                        raise CascadeError(f"{f}: {im.width}x{im.height} pixels, over the limit of {max_pixels:,} "
                                           "(--max-pixels); resize it first")
                    im = im.convert("L" if channels == 1 else "RGB").resize((width, height), Image.BILINEAR)
                    a = np.asarray(im, dtype=np.float32)
        except Image.DecompressionBombError as exc:
            raise CascadeError(f"{f}: over the pixel limit ({exc})") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:  # PIL: SyntaxError = broken file
            raise CascadeError(f"{f}: not a readable image ({exc})") from None
        a = a[None] if channels == 1 else a.transpose(2, 0, 1)
        images.append(a * (raw_max / 255.0))
    return InputFile(folder, [f.name for f in files], np.stack(images))


def route_inputs(bundle: Bundle, inputs: InputFile, batch: int = 256, progress: bool = False) -> pd.DataFrame:
    """Route ``inputs`` batch by batch: one row per input, ``input, prediction (or one
    column per output), stage, score, mflops, pending``; an appealed input of a black-box
    bundle gets no answer here (``pending``).

    Raises:
        CascadeError: no inputs; an input with NaN or infinite values (named by its index
            in the file); a batch the bundle refuses (its shape, its dtype).
    """
    if len(inputs) == 0:
        raise CascadeError(f"{inputs.path}: no inputs")
    parts = []
    for start in tqdm(range(0, len(inputs), batch), desc="route", unit="batch", disable=not progress):
        rows = np.asarray(inputs.values[start:start + batch])
        flat = rows.reshape(len(rows), -1)
        bad = ~np.isfinite(flat).all(axis=1) if flat.dtype.kind == "f" else np.zeros(len(rows), bool)
        if bad.any():  # named by its index in the file, not its row in the batch
            raise CascadeError(f"{inputs.path}: {inputs.where(start + int(np.flatnonzero(bad)[0]))} has NaN or "
                               "infinite values")
        try:
            parts.append(bundle.route(rows))
        except CascadeError as exc:  # a problem of the whole batch (its shape, its dtype)
            raise CascadeError(f"{inputs.path}: inputs {start}-{start + len(rows) - 1}: {exc}") from None
    r = RoutedBatch(*(torch.cat([getattr(p, f.name) for p in parts]) for f in fields(RoutedBatch)))
    pending = r.pending.numpy()
    preds = bundle.predictions(r.output)  # no answer is made up for the oracle's rows
    classes = bundle.kind == TaskKind.CLASSIFICATION
    answers = pd.DataFrame({"prediction": preds} if classes else preds,
                           columns=None if classes else bundle.output_names)
    answers.loc[pending] = None
    return pd.concat([pd.DataFrame({"input": inputs.names}), answers,
                      pd.DataFrame({"stage": r.stage.numpy(), "score": r.score.numpy(), "mflops": r.mflops.numpy(),
                                    "pending": pending})], axis=1)
