"""A deployed cascade: an exported bundle, loaded and routed with no training code.

A bundle is the folder ``cascade export`` writes (:mod:`cascade.export`)::

    manifest.json     what it is: input shape, preprocessing, output names, thresholds,
                      each stage's cost, the operating point it was chosen for
    stage_0.pt2       each routed stage as a torch.export program:
    stage_1.pt2 ...   preprocessed batch [B, *input_shape] -> (output [B, D], score [B])
    stage_{K-1}.pt2   the big network (white-box only; a black-box bundle's last stage is
                      an oracle outside it)

:class:`Bundle` needs nothing but torch, numpy and that folder: no config, no task
class, no pickled code (``torch.export.load`` reads a serialized graph and its
weights). The routing branch is plain Python here, outside the graphs: stage ``k``
runs only on the rows no earlier stage kept, and answers where its score is at least
its threshold.
"""

from __future__ import annotations

import json
import math
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cascade.errors import CascadeError

#: the manifest formats this code reads
FORMAT_VERSION = 1
#: image files ``load_inputs`` reads from a folder
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_INTEGER_TYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


@dataclass
class RoutedBatch:
    """What a bundle did with each input of a batch (every field has length ``B``).

    Attributes:
        output: ``[B, D]`` each input's answer. A ``pending`` row holds the last routed
            stage's answer: the fallback while the oracle cannot be reached.
        stage: ``[B]`` the stage that answered; ``num_stages - 1`` is the last side
            (pending rows too).
        score: ``[B]`` float64, the score of the last routed stage that ran on the input.
        mflops: ``[B]`` float64, MFLOPs spent on the input here (the last stage counted
            when it ran here).
        pending: ``[B]`` bool, appealed but not answered here (a black-box bundle, or
            ``run_last=False``): the caller asks the oracle.
    """

    output: Tensor
    stage: Tensor
    score: Tensor
    mflops: Tensor
    pending: Tensor

    def __len__(self) -> int:
        return len(self.stage)


class Bundle:
    """An exported cascade, ready to route.

    Load with :meth:`load`; route with :meth:`route`. Attributes come from the manifest.

    Attributes:
        path: the bundle folder.
        manifest: ``manifest.json`` as a dict.
        kind: ``classification`` or ``regression``.
        input_shape: one input's shape after preprocessing, e.g. ``(1, 28, 28)``.
        output_names: class names (classification) or output names (regression).
        thresholds: ``[K-1]`` stage ``k`` answers where its score is ``>= thresholds[k]``.
        stage_mflops: ``[K]`` each stage's cost (the last: None when unknown).
        num_stages: K, the last side included.
        has_last_stage: True when the big network is in the bundle (white-box).
    """

    def __init__(self, path: Path, manifest: dict[str, Any], routed: list, last: Any | None):
        self.path, self.manifest = path, manifest
        self._routed, self._last = routed, last
        self.kind: str = manifest["kind"]
        self.input_shape: tuple[int, ...] = tuple(manifest["input"]["shape"])
        self.output_names: list[str] = list(manifest["output_names"])
        # null: no input stops there (a guaranteed point that certified no threshold)
        self.thresholds: list[float] = [math.inf if t is None else float(t) for t in manifest["thresholds"]]
        self.stage_mflops: list[float | None] = [s["mflops"] for s in manifest["stages"]]
        pre = manifest.get("preprocessing")
        self._pre = None if pre is None else (float(pre["raw_max"]), [float(m) for m in pre["mean"]],
                                              [float(s) for s in pre["std"]])

    @property
    def num_stages(self) -> int:
        return len(self._routed) + 1

    @property
    def has_last_stage(self) -> bool:
        return self._last is not None

    @property
    def name(self) -> str:
        p = self.manifest["operating_point"]
        return f"{self.manifest['task']} {p['method']} ({p['mode']}, AD {p['target_ad']:g}, {p['threshold_source']})"

    # -- loading -------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path) -> Bundle:
        """Read a bundle folder.

        Raises:
            CascadeError: a missing folder, manifest or stage file; a manifest of another
                format version; a stage file torch.export cannot read.
        """
        path = Path(path)
        mf = path / "manifest.json"
        if not mf.is_file():
            raise CascadeError(f"{mf}: not found; is {path} a folder written by `cascade export`?")
        try:
            manifest = json.loads(mf.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CascadeError(f"{mf}: not valid JSON ({exc})") from None
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        if version != FORMAT_VERSION:
            raise CascadeError(f"{mf}: format_version {version!r}; this cascade reads version {FORMAT_VERSION} "
                               "(export the run again with this version)")
        missing = [k for k in ("kind", "input", "output_names", "thresholds", "stages", "operating_point", "task")
                   if k not in manifest]
        if missing:
            raise CascadeError(f"{mf}: missing key(s) {', '.join(missing)}")
        stages = manifest["stages"]
        programs = []
        for s in stages:
            if s.get("file") is None:
                programs.append(None)
                continue
            file = path / s["file"]
            if not file.is_file():
                raise CascadeError(f"{file}: not found (listed in {mf})")
            if not zipfile.is_zipfile(file):  # torch.export.load would log a traceback before failing
                raise CascadeError(f"{file}: not a torch.export program (not a .pt2 archive)")
            try:
                programs.append(torch.export.load(str(file)).module())
            except Exception as exc:  # noqa: BLE001  (torch raises many types for a corrupt archive)
                raise CascadeError(f"{file}: not a torch.export program ({type(exc).__name__}: "
                                   f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
        if any(p is None for p in programs[:-1]) or len(programs) < 2:
            raise CascadeError(f"{mf}: every routed stage needs a file, and there must be at least two stages")
        if len(manifest["thresholds"]) != len(programs) - 1:
            raise CascadeError(f"{mf}: {len(manifest['thresholds'])} thresholds for {len(programs) - 1} routed stage(s)")
        return cls(path, manifest, programs[:-1], programs[-1])

    # -- inputs --------------------------------------------------------------------------

    def preprocess(self, raw: np.ndarray | Tensor | Sequence) -> Tensor:
        """Raw inputs ``[B, *input_shape]`` (or one ``[*input_shape]``; grey images may
        leave out the channel axis) to the stages' float32 input, through the manifest's
        preprocessing.

        Raises:
            CascadeError: a shape that is not the bundle's, non-numeric or non-finite values.
        """
        x = self.check_preprocessed(raw)
        if self._pre is not None:
            raw_max, mean, std = self._pre
            x = x.div(raw_max)
            x = x.sub(mean[0]).div(std[0]) if len(mean) == 1 and len(std) == 1 else \
                x.sub(_per_channel(mean, x)).div(_per_channel(std, x))
        return x

    def check_preprocessed(self, raw: np.ndarray | Tensor | Sequence) -> Tensor:
        """A batch (or one input) as float32 ``[B, *input_shape]``, checked for shape and
        finite values; no preprocessing."""
        shape = self.input_shape
        try:
            x = raw if isinstance(raw, Tensor) else torch.from_numpy(np.array(raw))  # a copy: writable, ours
        except (ValueError, TypeError) as exc:
            raise CascadeError(f"inputs: not a numeric array ({exc})") from None
        if not (x.is_floating_point() or x.dtype in _INTEGER_TYPES):
            raise CascadeError(f"inputs: dtype {x.dtype} is not a real number type")
        if tuple(x.shape) == shape:
            x = x.unsqueeze(0)
        elif tuple(x.shape[1:]) != shape:
            if shape[0] == 1 and tuple(x.shape[1:]) == shape[1:]:  # grey images without a channel axis
                x = x.unsqueeze(1)
            else:
                want = ", ".join(map(str, shape))
                raise CascadeError(f"inputs of shape {list(x.shape)}: this bundle takes [{want}] or a batch "
                                   f"[B, {want}]")
        x = x.to(torch.float32)
        bad = ~torch.isfinite(x.reshape(len(x), -1)).all(dim=1)
        if bad.any():
            raise CascadeError(f"inputs: row {int(bad.nonzero()[0])} has NaN or infinite values")
        return x

    # -- routing -------------------------------------------------------------------------

    @torch.no_grad()
    def route(self, inputs: np.ndarray | Tensor | Sequence, *, preprocessed: bool = False,
              run_last: bool = True) -> RoutedBatch:
        """Route a batch down the cascade.

        Args:
            inputs: raw inputs (see :meth:`preprocess`), or preprocessed ones.
            preprocessed: the inputs are already the stages' input.
            run_last: answer appealed inputs with the bundle's own last stage when it has
                one; False leaves them ``pending`` (a server sends them to the oracle).

        Returns:
            A :class:`RoutedBatch`.

        Raises:
            CascadeError: see :meth:`preprocess`.
        """
        x = self.check_preprocessed(inputs) if preprocessed else self.preprocess(inputs)
        n, last = len(x), self.num_stages - 1
        stage = torch.full((n,), last, dtype=torch.long)
        score = torch.full((n,), float("nan"), dtype=torch.float64)
        mflops = torch.zeros(n, dtype=torch.float64)
        output = torch.full((n, len(self.output_names)), float("nan"))
        active = torch.arange(n)  # rows still travelling down the cascade
        for k, module in enumerate(self._routed):
            if len(active) == 0:
                break
            out, q = module(x[active])
            q = q.double()  # compared in float64, the precision the run chose its thresholds in
            output[active] = out.float()  # later stages overwrite: a pending row keeps the last routed answer
            score[active] = q
            mflops[active] += self.stage_mflops[k]
            stop = q >= self.thresholds[k]
            stage[active[stop]] = k
            active = active[~stop]
        pending = torch.zeros(n, dtype=torch.bool)
        if len(active):
            if run_last and self._last is not None:
                output[active] = self._last(x[active])[0].float()
                mflops[active] += self.stage_mflops[last]
            else:
                pending[active] = True
        return RoutedBatch(output=output, stage=stage, score=score, mflops=mflops, pending=pending)

    @torch.no_grad()
    def run_last(self, x: Tensor) -> Tensor:
        """The last stage's outputs ``[B, D]`` on a preprocessed batch (white-box bundles).

        Raises:
            CascadeError: a black-box bundle (its last stage is not in it).
        """
        if self._last is None:
            raise CascadeError(f"{self.path}: a black-box bundle has no last stage to run; its last stage is an "
                               "oracle outside it")
        return self._last(self.check_preprocessed(x))[0].float()

    def predictions(self, output: Tensor) -> list:
        """Classification: each row's class name (argmax); regression: each row's values."""
        if self.kind == "classification":
            return [self.output_names[i] for i in output.argmax(dim=1).tolist()]
        return output.tolist()


def _per_channel(values: list[float], x: Tensor) -> Tensor:
    return torch.tensor(values, dtype=x.dtype).view(1, -1, *([1] * (x.dim() - 2)))


def load_inputs(path: str | Path, bundle: Bundle) -> tuple[list[str], np.ndarray]:
    """Raw inputs from a file or folder, and a name for each (row number or file name).

    - ``.npy``: an array ``[N, *input_shape]`` (no pickled objects);
    - ``.csv``: one input per row, its values flattened (a header row is allowed);
    - a folder of images: each resized to the input's height and width, grey or RGB by
      its channels, pixel values mapped to the task's raw range.

    Raises:
        CascadeError: a missing path, an unreadable file, a wrong width or shape, a
            non-numeric cell (naming its row), a task with no image preprocessing.
    """
    path = Path(path)
    if path.is_dir():
        return _read_images(path, bundle)
    if not path.is_file():
        raise CascadeError(f"{path}: not found")
    if path.suffix.lower() == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise CascadeError(f"{path}: not a numpy array file ({exc})") from None
        return [str(i) for i in range(len(arr))] if arr.ndim else [], arr
    if path.suffix.lower() == ".csv":
        return _read_csv(path, bundle)
    raise CascadeError(f"{path}: give a .npy array, a .csv of features, or a folder of images")


def _read_csv(path: Path, bundle: Bundle) -> tuple[list[str], np.ndarray]:
    import pandas as pd

    width = int(np.prod(bundle.input_shape))
    try:
        frame = pd.read_csv(path, header=None, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise CascadeError(f"{path}: not a readable CSV ({str(exc).splitlines()[0]})") from None
    values = frame.apply(pd.to_numeric, errors="coerce")
    first = 0
    if len(values) and values.iloc[0].isna().all():  # a header row
        first = 1
    values = values.iloc[first:]
    if values.shape[1] != width:
        raise CascadeError(f"{path}: {values.shape[1]} columns; this bundle's input {list(bundle.input_shape)} "
                           f"has {width} values per row")
    bad = values.isna().any(axis=1).to_numpy()
    if bad.any():
        row = int(np.flatnonzero(bad)[0]) + first + 1
        raise CascadeError(f"{path}: line {row}: a cell that is not a number")
    arr = values.to_numpy(np.float32).reshape(len(values), *bundle.input_shape)
    return [str(i) for i in range(len(arr))], arr


def _read_images(folder: Path, bundle: Bundle) -> tuple[list[str], np.ndarray]:
    from PIL import Image, UnidentifiedImageError

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
            with Image.open(f) as im:
                im = im.convert("L" if channels == 1 else "RGB").resize((width, height), Image.BILINEAR)
                a = np.asarray(im, dtype=np.float32)
        except (UnidentifiedImageError, OSError) as exc:
            raise CascadeError(f"{f}: not a readable image ({exc})") from None
        a = a[None] if channels == 1 else a.transpose(2, 0, 1)
        images.append(a * (raw_max / 255.0))
    return [f.name for f in files], np.stack(images)
