"""Facial keypoints (AppealNet App. D): Kaggle's ``training.csv`` or synthetic faces.

The task regresses the 15 keypoints (30 coordinates) of a 96x96 grey face. The loss is
squared L2 over the labelled coordinates (:class:`cascade.MaskedL2TaskLoss`; missing
keypoints are NaN and masked out of the loss and of the error), and an output is correct
when its RMSE over the labelled keypoints is under ``threshold`` pixels (4 in the paper).
Targets are normalized to ``(c - 48) / 48`` for training; the criterion's ``scale``
maps errors back to pixels.

Data: ``task.csv`` names a file in Kaggle's format (relative paths are under the data
root); without it, synthetic faces (:mod:`tasks.faces`) are generated once into
``<data root>/synthetic_faces/`` and read back through the same loader.
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, Sequence

import numpy as np
import pandas as pd
import torch
from pydantic import Field, PositiveInt
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from cascade import NETWORKS, TASKS, DataError, FeatureNet, MaskedL2TaskLoss, Preprocessing, Splits, Task, TaskOptions
from cascade.core.files import atomic_path
from tasks.data import DATA_ENV, resolve_data_root
from tasks.faces import GENERATOR_VERSION, IMAGE_COLUMN, IMAGE_SIZE, KEYPOINT_COLUMNS, write_faces_csv

log = logging.getLogger("cascade")

_PIXELS = IMAGE_SIZE * IMAGE_SIZE
#: targets are trained as ``(c - 48) / 48``; errors are reported in pixels
_HALF = IMAGE_SIZE / 2


# ----------------------------------------------------------------------------- the CSV


@dataclass(frozen=True)
class KeypointData:
    """The rows of a Kaggle-format keypoints file that parsed.

    Attributes:
        images: ``[N, 96, 96]`` float32 grey levels in [0, 255].
        keypoints: ``[N, 30]`` float32 pixel coordinates in Kaggle's column order; NaN
            where a keypoint is not labelled.
        lines: ``[N]`` the file line of each row (the header is line 1).
        skipped: file lines of the malformed rows that were skipped.
    """

    images: np.ndarray
    keypoints: np.ndarray
    lines: np.ndarray
    skipped: list[int]

    @property
    def complete(self) -> np.ndarray:
        """Bool ``[N]``: every keypoint of the row is labelled."""
        return ~np.isnan(self.keypoints).any(axis=1)


def _parse_image(text: object) -> tuple[np.ndarray | None, str]:
    """An ``Image`` field as 9216 grey levels, or ``(None, why)``."""
    if not isinstance(text, str) or not text.strip():
        return None, "empty Image field"
    parts = text.split()
    if len(parts) != _PIXELS:
        return None, f"Image has {len(parts)} values, expected {_PIXELS} ({IMAGE_SIZE}x{IMAGE_SIZE})"
    try:
        pixels = np.array(parts, dtype=np.float32)
    except ValueError:
        bad = next(p for p in parts if not _is_number(p))
        return None, f"Image has a non-numeric value {bad[:20]!r}"
    if not np.isfinite(pixels).all() or pixels.min() < 0 or pixels.max() > 255:
        return None, "Image has a value outside the grey levels 0..255"
    return pixels, ""


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def read_keypoints_csv(path: str | Path, on_malformed: Literal["error", "skip"] = "error") -> KeypointData:
    """Read Kaggle's facial-keypoints ``training.csv`` format.

    The 30 coordinate columns (``left_eye_center_x`` ... ``mouth_center_bottom_lip_y``)
    and ``Image`` (9216 space-separated grey levels of a 96x96 image, row-major) are
    required; other columns are ignored. Empty coordinates are kept as NaN (missing
    keypoints). A row is malformed when its CSV fields don't match the header, a
    coordinate is not a finite number, or its image is not 9216 grey levels in 0..255.

    Args:
        path: the CSV file.
        on_malformed: ``"error"`` raises on the first malformed row; ``"skip"`` drops
            malformed rows, logs how many, and lists their lines in ``skipped``.

    Returns:
        The parsed rows.

    Raises:
        DataError: missing file, missing columns, a malformed row (naming its line) when
            ``on_malformed == "error"``, or no usable row at all.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: keypoints file not found")
    wrong_width: list[int] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # blank lines are kept as rows (then reported as malformed) so that row i is
            # line i + 2 of the file, apart from lines with the wrong number of fields
            frame = pd.read_csv(path, dtype={IMAGE_COLUMN: str}, skip_blank_lines=False,
                                on_bad_lines="error" if on_malformed == "error" else "warn")
    except pd.errors.ParserError as exc:
        # pandas names the line ("Expected 31 fields in line 5, saw 32")
        raise DataError(f"{path}: malformed CSV: {str(exc).removeprefix('Error tokenizing data. C error: ').strip()}") from None
    except (pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a keypoints CSV ({exc})") from None
    for w in caught:
        if issubclass(w.category, pd.errors.ParserWarning):
            wrong_width += [int(n) for n in re.findall(r"line (\d+)", str(w.message))]
    missing = [c for c in (*KEYPOINT_COLUMNS, IMAGE_COLUMN) if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)} (expected Kaggle's training.csv format)")

    # the file line of each parsed row: data starts at line 2, minus lines pandas dropped
    n_lines = len(frame) + len(wrong_width)
    dropped = set(wrong_width)
    lines = np.array([ln for ln in range(2, n_lines + 2) if ln not in dropped][: len(frame)])

    coords = frame[list(KEYPOINT_COLUMNS)]
    numeric = coords.apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    given = coords.notna().to_numpy()
    bad_coord = given & ~np.isfinite(numeric)  # text that is not a number, or inf
    images = np.empty((len(frame), _PIXELS), dtype=np.float32)
    ok = np.ones(len(frame), dtype=bool)
    skipped = list(wrong_width)
    for i, text in enumerate(frame[IMAGE_COLUMN].tolist()):
        why = ""
        if bad_coord[i].any():
            j = int(np.flatnonzero(bad_coord[i])[0])
            why = f"{KEYPOINT_COLUMNS[j]} is not a number: {str(coords.iat[i, j])[:20]!r}"
        else:
            pixels, why = _parse_image(text)
            if pixels is not None:
                images[i] = pixels
        if why:
            if on_malformed == "error":
                raise DataError(f"{path}: line {lines[i]}: {why} (set task.on_malformed: skip to skip such rows)")
            ok[i] = False
            skipped.append(int(lines[i]))
    if skipped:
        log.warning("%s: skipped %d malformed row(s), lines %s", path, len(skipped),
                    ", ".join(map(str, sorted(skipped)[:10])) + (" ..." if len(skipped) > 10 else ""))
    if not ok.any():
        raise DataError(f"{path}: no usable row")
    return KeypointData(
        images=images[ok].reshape(-1, IMAGE_SIZE, IMAGE_SIZE),
        keypoints=numeric[ok].astype(np.float32),
        lines=lines[ok],
        skipped=sorted(skipped),
    )


# ----------------------------------------------------------------------------- the task


class SyntheticFacesOptions(TaskOptions):
    """The embedded synthetic faces (used when ``task.csv`` is not set)."""

    size: Annotated[int, Field(gt=0)] = 5000
    seed: int = 0
    partial_fraction: Annotated[float, Field(ge=0, le=1)] = 0.3


class KeypointOptions(TaskOptions):
    """Options of the ``keypoints`` task (the keys under ``task:``)."""

    #: a Kaggle-format training.csv; relative paths are under the data root; None: synthetic faces
    csv: str | None = None
    data_root: str | None = None
    synthetic: SyntheticFacesOptions = Field(default_factory=SyntheticFacesOptions)
    #: keep only rows with all 15 keypoints labelled (Kaggle: 2,140 of 7,049)
    complete_only: bool = False
    on_malformed: Literal["error", "skip"] = "error"
    cal_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.15
    test_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.2
    #: RMSE in pixels below which an output is correct (App. D: 4)
    threshold: Annotated[float, Field(gt=0)] = 4.0


@TASKS.register("keypoints")
class KeypointTask(Task):
    """Facial keypoints: a 96x96 grey face in, 30 coordinates out, black-box oracle.

    Splits are a random permutation fixed by the seed: ``test_fraction`` for test,
    ``cal_fraction`` for calibration, the rest for training (the paper: 80 % / 20 %
    train / test; the calibration split comes out of its training part).
    """

    Options = KeypointOptions
    input_shape = (1, IMAGE_SIZE, IMAGE_SIZE)
    num_outputs = len(KEYPOINT_COLUMNS)
    preprocessing = Preprocessing(raw_max=255.0)
    #: the outputs are coordinates scaled to [-1, 1]: (pixel - 48) / 48
    output_names = KEYPOINT_COLUMNS
    default_little = {"name": "keypoint_cnn"}
    default_big = None  # App. D: the big side is a black-box oracle answering the truth

    def __init__(self, options: KeypointOptions | None = None):
        super().__init__(options)
        self.criterion = MaskedL2TaskLoss(threshold=self.options.threshold, scale=_HALF)
        self._data: KeypointData | None = None

    def csv_path(self) -> Path:
        """The file read: ``task.csv`` (under the data root if relative), or the synthetic cache.

        Raises:
            DataError: the synthetic faces cannot be written to the data root.
        """
        o = self.options
        root = resolve_data_root(o.data_root)
        if o.csv is not None:
            path = Path(o.csv).expanduser()
            return path if path.is_absolute() else root / path
        s = o.synthetic
        path = root / "synthetic_faces" / f"faces_v{GENERATOR_VERSION}_seed{s.seed}_n{s.size}_p{s.partial_fraction:g}.csv"
        if not path.is_file():
            log.info("generating %d synthetic faces into %s", s.size, path)
            try:
                write_faces_csv(path, s.size, s.seed, s.partial_fraction)
            except OSError as exc:
                raise DataError(f"{path}: cannot write synthetic faces ({exc}); set task.data_root or ${DATA_ENV}") from None
        return path

    @classmethod
    def data_problems(cls, options: KeypointOptions, configured_only: bool) -> list[str]:
        """A missing ``task.csv``, found at validation (see :func:`cascade.config.validate`);
        the synthetic faces need no file. With ``configured_only``, a relative ``csv`` is
        checked only when the config also sets ``data_root``."""
        if options.csv is None:
            return []
        path = Path(options.csv).expanduser()
        if not path.is_absolute():
            if configured_only and not options.data_root:
                return []
            path = resolve_data_root(options.data_root) / path
        return [] if path.is_file() else [f"csv: {path}: keypoints file not found"]

    def load(self) -> KeypointData:
        """The data (read once per task instance), after ``complete_only``.

        Raises:
            DataError: see :func:`read_keypoints_csv`.
        """
        if self._data is None:
            path = self.csv_path()
            if self.options.csv is not None and not path.is_file():
                raise DataError(
                    f"{path}: keypoints file not found; get training.csv from Kaggle's facial-keypoints-detection "
                    f"competition and set task.csv (relative paths are under task.data_root or ${DATA_ENV})"
                )
            data = read_keypoints_csv(path, self.options.on_malformed)
            if self.options.complete_only:
                keep = data.complete
                if not keep.any():
                    raise DataError(f"{path}: complete_only is set but no row has all 15 keypoints")
                data = KeypointData(data.images[keep], data.keypoints[keep], data.lines[keep], data.skipped)
            self._data = data
        return self._data

    def build_splits(self, seed: int) -> Splits:
        o = self.options
        if o.cal_fraction + o.test_fraction >= 1:
            raise DataError("task: cal_fraction + test_fraction must be < 1")
        data = self.load()
        n = len(data.images)
        n_test, n_cal = int(round(o.test_fraction * n)), int(round(o.cal_fraction * n))
        if min(n_test, n_cal, n - n_test - n_cal) < 1:
            raise DataError(f"keypoints: {n} rows are too few for the requested splits")
        perm = np.random.default_rng(seed).permutation(n)
        parts = (perm[n_test + n_cal:], perm[n_test:n_test + n_cal], perm[:n_test])
        x = torch.from_numpy(data.images).unsqueeze(1) / 255.0  # [N, 1, 96, 96]; a copy: the cache stays in grey levels
        y = torch.from_numpy((data.keypoints - _HALF) / _HALF)  # [N, 30], NaN kept (masked)
        return Splits(*(TensorDataset(x[np.sort(p)], y[np.sort(p)]) for p in parts))

    @torch.no_grad()
    def write_routing_figure(self, path: Path, network: nn.Module, dataset: Dataset, kept: np.ndarray, caption: str,
                             per_group: int = 8) -> bool:
        """Sample faces with their true (green) and predicted (red) keypoints, kept vs appealed.

        Args:
            path: the PNG to write.
            network: the routed little network (its ``output`` are normalized coordinates).
            dataset: the split routed, ``(x, y)`` pairs.
            kept: bool ``[N]``, True where the input stays on the little network.
            caption: the figure's title (which network and threshold).
            per_group: faces drawn from each group, chosen at random (seed 0).

        Returns:
            True: the figure is written (atomically).
        """
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rng = np.random.default_rng(0)
        groups = {"kept": np.flatnonzero(kept), "appealed": np.flatnonzero(~kept)}
        fig, axes = plt.subplots(2, per_group, figsize=(1.6 * per_group, 4.4), squeeze=False)
        network.eval()
        device = next(network.parameters()).device
        for row, (label, idx) in zip(axes, groups.items()):
            pick = np.sort(rng.choice(idx, min(per_group, len(idx)), replace=False)) if len(idx) else []
            for ax in row:
                ax.axis("off")
            if not len(pick):
                row[0].text(0, 0.5, f"no input {label}", fontsize=8)
            for ax, i in zip(row, pick):
                x, y = dataset[int(i)]
                pred = network(x.unsqueeze(0).to(device)).output.float().cpu()
                rmse = float(self.criterion.rmse(pred, y.unsqueeze(0))[0])
                ax.imshow(x[0].numpy(), cmap="gray", vmin=0, vmax=1)
                true, guess = (y.numpy() * _HALF + _HALF).reshape(15, 2), (pred[0].numpy() * _HALF + _HALF).reshape(15, 2)
                ax.scatter(true[:, 0], true[:, 1], s=7, c="lime", label="true")
                ax.scatter(guess[:, 0], guess[:, 1], s=7, c="red", marker="x", label="predicted")
                ax.set_title(f"{label}\nRMSE {rmse:.1f} px", fontsize=7)
        fig.suptitle(caption, fontsize=8)
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
        plt.close(fig)
        return True


# ----------------------------------------------------------------------------- the network


@NETWORKS.register("keypoint_cnn")
def build_keypoint_cnn(
    input_shape: tuple[int, ...],
    num_outputs: int,
    channels: Sequence[PositiveInt] = (16, 32, 64),
    hidden: PositiveInt = 128,
    stem_stride: PositiveInt = 2,
    dropout: float = 0.1,
) -> FeatureNet:
    """App. D's approximator: 3 convolutional layers, then 2 fully-connected layers.

    Convolutions (5x5 with stride ``stem_stride`` for the first, 3x3 after), each followed
    by ReLU and a 2x2 max-pool; then a hidden fully-connected layer (the shared features)
    and the linear output layer, with ``dropout`` on the inputs of both (what MC dropout
    samples).
    The strided first layer keeps a 96x96 input at about 6.5 MMACs, so the case study
    trains on two CPU cores.

    Args:
        input_shape: ``(C, H, W)``.
        num_outputs: 30 for the 15 keypoints.
        channels: the three convolutions' widths.
        hidden: width of the hidden fully-connected layer.
        stem_stride: stride of the first convolution.
        dropout: dropout rate before each fully-connected layer (0 disables it).

    Raises:
        ValueError: not three convolutions, or the input too small for them.
    """
    if len(channels) != 3:
        raise ValueError(f"keypoint_cnn has 3 convolutional layers, got channels={list(channels)}")
    c, h, w = input_shape
    layers: list[nn.Module] = []
    for i, out_c in enumerate(channels):
        k, stride = (5, stem_stride) if i == 0 else (3, 1)
        layers += [nn.Conv2d(c, out_c, k, stride=stride, padding=k // 2), nn.ReLU(), nn.MaxPool2d(2)]
        h, w = (h + stride - 1) // stride // 2, (w + stride - 1) // stride // 2
        c = out_c
    if h < 1 or w < 1:
        raise ValueError(f"input {input_shape} too small for keypoint_cnn")
    # dropout before and after the hidden layer: MC dropout then samples both
    # fully-connected layers, not only the output layer
    def drop() -> list[nn.Module]:
        return [nn.Dropout(dropout)] if dropout > 0 else []

    layers += [nn.Flatten(), *drop(), nn.Linear(c * h * w, hidden), nn.ReLU(), *drop()]
    return FeatureNet(nn.Sequential(*layers), nn.Linear(hidden, num_outputs), hidden)
