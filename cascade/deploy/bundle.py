"""A deployed cascade: an exported bundle, loaded and routed with no training code.

A bundle is the folder ``cascade export`` writes (:mod:`cascade.deploy.export`)::

    manifest.json     what it is: input shape, preprocessing, output names, thresholds,
                      each stage's cost and SHA-256, the operating point it was chosen for
    stage_0.pt2       each routed stage as a torch.export program:
    stage_1.pt2 ...   preprocessed batch [B, *input_shape] -> (output [B, D], score [B])
    stage_{K-1}.pt2   the big network (white-box only; a black-box bundle's last stage is
                      an oracle outside it)

:class:`Bundle` needs nothing but torch, numpy and that folder: no config, no task
class. A bundle is data: :meth:`Bundle.load` validates the manifest with one schema
(:mod:`cascade.deploy.manifest`), opens only plain file names inside the folder, checks each
file's SHA-256, and refuses a stage program holding anything ``torch.export.load``
would unpickle, exec or eval (:mod:`cascade.deploy.pt2`) before torch reads it. The routing
branch is plain Python, outside the graphs (:func:`cascade.deploy.kernel.route_rows`): stage
``k`` runs only on the rows no earlier stage kept, and answers where its score is at least
its threshold.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cascade.core.enums import TaskKind
from cascade.core.errors import CascadeError, described
from cascade.deploy.kernel import route_rows
from cascade.deploy.manifest import MANIFEST, Manifest, parse_manifest, read_manifest
from cascade.deploy.pt2 import load_program

#: a stage file larger than this is refused before it is read into memory
MAX_STAGE_BYTES = 4 << 30
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

    def __init__(self, path: Path, manifest: dict[str, Any], routed: list, last: Any | None,
                 spec: Manifest | None = None):
        self.path, self.manifest = path, manifest
        self._routed, self._last = routed, last
        if spec is None:  # built in code, not by load(): the same checks
            spec = parse_manifest(manifest, str(path / MANIFEST))
        self.kind: TaskKind = spec.kind
        self.input_shape: tuple[int, ...] = tuple(spec.input.shape)
        self.output_names: list[str] = list(spec.output_names)
        # null: no input stops there (a guaranteed point that certified no threshold)
        self.thresholds: list[float] = [math.inf if t is None else float(t) for t in spec.thresholds]
        self.stage_mflops: list[float | None] = [s.mflops for s in spec.stages]
        pre = spec.preprocessing
        self._pre = None if pre is None else (float(pre.raw_max), [float(m) for m in pre.mean],
                                              [float(s) for s in pre.std])

    @property
    def num_stages(self) -> int:
        return len(self._routed) + 1

    @property
    def has_last_stage(self) -> bool:
        return self._last is not None

    @property
    def name(self) -> str:
        p = self.manifest["operating_point"]
        at = (f"appeal budget {p['appeal_budget']:g}" if p.get("appeal_budget") is not None
              else f"AD {p['target_ad']:g}")
        return f"{self.manifest['task']} {p['method']} ({p['mode']}, {at}, {p['threshold_source']})"

    # -- loading -------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path) -> Bundle:
        """Read a bundle folder, treating everything in it as untrusted data.

        In order: the manifest against its schema (:func:`cascade.deploy.manifest.read_manifest`;
        file names are plain names, refused before any file is opened); each listed file's
        SHA-256 against the manifest; each stage program's archive, member by member, before
        torch reads those same bytes (:func:`cascade.deploy.pt2.load_program`); then each program
        once on a zero input, whose outputs must be ``[1, len(output_names)]`` and ``[1]``.

        Raises:
            CascadeError: one line naming the file and the key or archive member: a missing
                folder, manifest or file; a manifest of another format version or failing
                its schema; a file whose hash differs; a program holding pickles or code, or
                that torch.export cannot read, or whose outputs do not fit the manifest.
        """
        path = Path(path)
        mf = path / MANIFEST
        if not mf.is_file():
            raise CascadeError(f"{mf}: not found; is {path} a folder written by `cascade export`?")
        spec, manifest = read_manifest(mf)
        contents = {name: _read_checked(path / name, mf, key, digest) for key, name, digest in spec.files()}
        programs = [None if s.file is None else load_program(str(path / s.file), contents[s.file])
                    for s in spec.stages]
        for k, program in enumerate(programs):
            if program is not None:
                _check_outputs(path / spec.stages[k].file, program, spec)
        return cls(path, manifest, programs[:-1], programs[-1], spec)

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
        # row-major, as every later stage's gathered rows are (a batch read from a CSV is
        # column-major, and the programs' float32 sums differ with the layout)
        routing = route_rows(x.contiguous(), self._routed, self.thresholds)
        score = torch.full((n,), float("nan"), dtype=torch.float64)
        mflops = torch.zeros(n, dtype=torch.float64)
        output = torch.full((n, len(self.output_names)), float("nan"))
        for v in routing.visits:
            output[v.rows] = v.output.float()  # later stages overwrite: a pending row keeps the last routed answer
            score[v.rows] = v.score
            mflops[v.rows] += self.stage_mflops[v.stage]
        active = routing.remaining
        pending = torch.zeros(n, dtype=torch.bool)
        if len(active):
            if run_last and self._last is not None:
                output[active] = self._last(x[active])[0].float()
                mflops[active] += self.stage_mflops[last]
            else:
                pending[active] = True
        stage = routing.exit_stage
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
        if self.kind == TaskKind.CLASSIFICATION:
            return [self.output_names[i] for i in output.argmax(dim=1).tolist()]
        return output.tolist()


def _read_checked(file: Path, mf: Path, key: str, digest: str) -> bytes:
    """The bytes of a file the manifest lists, if their SHA-256 is the manifest's."""
    try:
        size = file.stat().st_size
        if size > MAX_STAGE_BYTES:
            raise CascadeError(f"{file}: {size >> 20} MiB, larger than a stage file may be ({MAX_STAGE_BYTES >> 30} "
                               "GiB)")
        data = file.read_bytes()
    except FileNotFoundError:
        raise CascadeError(f"{file}: not found (listed in {mf} as {key})") from None
    except OSError as exc:
        raise CascadeError(f"{file}: cannot be read ({exc.strerror or exc})") from None
    if hashlib.sha256(data).hexdigest() != digest:
        hash_key = key.removesuffix(".file") + ".sha256" if key.endswith(".file") else key + "_sha256"
        raise CascadeError(f"{file}: SHA-256 differs from {mf}'s {hash_key}: this is not the file exported with "
                           "that manifest (swapped, truncated or modified); export the run again")
    return data


@torch.no_grad()
def _check_outputs(file: Path, program: Any, spec: Manifest) -> None:
    """Run a program once on a zero input: its outputs must fit the manifest, so that a
    server never starts with a bundle that fails every request."""
    width = len(spec.output_names)
    try:
        result = program(torch.zeros(1, *spec.input.shape))
    except Exception as exc:  # noqa: BLE001  (whatever the graph raises, it cannot route)
        raise CascadeError(f"{file}: fails on one input of the manifest's input.shape {spec.input.shape} "
                           f"({described(exc)})") from None
    if (not isinstance(result, (tuple, list)) or len(result) != 2
            or not all(isinstance(t, Tensor) for t in result)):
        raise CascadeError(f"{file}: does not return (output, score) tensors")
    out, score = result
    if tuple(out.shape) != (1, width):
        raise CascadeError(f"{file}: gives outputs of shape {list(out.shape)} for one input; the manifest's "
                           f"output_names has {width} names")
    if tuple(score.shape) != (1,):
        raise CascadeError(f"{file}: gives scores of shape {list(score.shape)} for one input, not [1]")


def _per_channel(values: list[float], x: Tensor) -> Tensor:
    return torch.tensor(values, dtype=x.dtype).view(1, -1, *([1] * (x.dim() - 2)))

