"""MNIST read through ``torchvision.datasets.MNIST`` from a data root."""

from __future__ import annotations

import logging
from typing import Annotated, Literal

import numpy as np
import torch
from pydantic import Field
from torch.utils.data import TensorDataset

from cascade import TASKS, CrossEntropyTaskLoss, DataError, Preprocessing, Splits, Task, TaskOptions
from tasks.data import check_labels, describe_data_root, read_idx_header, resolve_data_root, stratified_split

log = logging.getLogger("cascade")

_MEAN, _STD = 0.1307, 0.3081
#: torchvision's file names, ``(images, labels)`` per part
_FILES = {True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


class MnistOptions(TaskOptions):
    data_root: str | None = None
    cal_size: Annotated[int, Field(gt=0)] = 5000
    train_size: Annotated[int, Field(gt=0)] | None = None
    download: bool = False
    #: a label outside 0..9: stop with an error naming the file and index, or skip (and count) it
    on_malformed: Literal["error", "skip"] = "error"


@TASKS.register("mnist")
class MnistTask(Task):
    """The 60,000 / 10,000 digits. The calibration split (``cal_size``, stratified by the
    seed) comes out of the official training set; the test split is the official one.

    Data root: ``task.data_root``, else ``$CASCADE_DATA``, else ``~/.cache/cascade/data``;
    torchvision's layout ``<root>/MNIST/raw/*-ubyte`` (uncompressed IDX files).
    """

    Options = MnistOptions
    input_shape = (1, 28, 28)
    num_outputs = 10
    preprocessing = Preprocessing(raw_max=255.0, mean=(_MEAN,), std=(_STD,))
    default_little = {"name": "mlp", "hidden": [32]}
    default_big = {"name": "cnn", "channels": [32, 64], "hidden": 128}

    def __init__(self, options: MnistOptions | None = None):
        super().__init__(options)
        self.criterion = CrossEntropyTaskLoss()

    @classmethod
    def data_problems(cls, options: MnistOptions, configured_only: bool) -> list[str]:
        """Missing MNIST files (see :func:`cascade.config.validate`).

        Args:
            options: the task's options.
            configured_only: check only a ``data_root`` the config sets, not
                ``$CASCADE_DATA`` or the default root.

        Returns:
            ``"data_root: <message>"`` per problem.
        """
        if options.download or (configured_only and not options.data_root):
            return []
        root = resolve_data_root(options.data_root)
        where = describe_data_root(options.data_root)
        if not root.is_dir():
            return [f"data_root: {root}: no such folder ({where})"]
        raw = root / "MNIST" / "raw"
        missing = [f for part in _FILES.values() for f in part if not (raw / f).is_file()]
        if missing:
            return [f"data_root: {raw}: missing {', '.join(missing)} (torchvision's MNIST layout, from {where}; "
                    "or set download: true)"]
        return []

    def _load(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        root = resolve_data_root(self.options.data_root)
        raw = root / "MNIST" / "raw"
        if not self.options.download:  # check the files first: torchvision's own errors name no file
            problems = self.data_problems(self.options, configured_only=False)
            if problems:
                raise DataError(f"mnist: {problems[0].removeprefix('data_root: ')}")
            images, labels = (raw / f for f in _FILES[train])
            n_images = read_idx_header(images, 3, (28, 28))
            n_labels = read_idx_header(labels, 1)
            if n_images != n_labels:
                raise DataError(f"{labels}: {n_labels} labels for the {n_images} images of {images.name}")
        from torchvision.datasets import MNIST

        try:
            ds = MNIST(root=str(root), train=train, download=self.options.download)
        except (RuntimeError, AssertionError, ValueError, KeyError, OSError) as exc:
            raise DataError(f"{raw}: MNIST could not be read ({type(exc).__name__}: {exc}); "
                            f"set task.data_root or $CASCADE_DATA") from None
        x = (ds.data.float().div(255.0).sub(_MEAN).div(_STD)).unsqueeze(1)  # [N, 1, 28, 28]
        y = ds.targets.long()
        keep = check_labels(y.numpy(), self.num_outputs, str(raw / _FILES[train][1]), self.options.on_malformed)
        if not keep.all():
            keep_t = torch.from_numpy(keep)
            x, y = x[keep_t], y[keep_t]
        return x, y

    def build_splits(self, seed: int) -> Splits:
        x, y = self._load(train=True)
        x_test, y_test = self._load(train=False)
        rest, cal = stratified_split(y.numpy(), self.options.cal_size, seed, "mnist")
        if self.options.train_size is not None and self.options.train_size < len(rest):
            rng = np.random.default_rng(seed)
            rest = rng.choice(rest, self.options.train_size, replace=False)
        rest, cal = np.sort(rest), np.sort(cal)
        return Splits(TensorDataset(x[rest], y[rest]), TensorDataset(x[cal], y[cal]), TensorDataset(x_test, y_test))
