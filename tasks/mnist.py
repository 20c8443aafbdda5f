"""MNIST read through ``torchvision.datasets.MNIST`` from a data root."""

from __future__ import annotations

from typing import Annotated

import numpy as np
import torch
from pydantic import Field
from torch.utils.data import TensorDataset

from cascade import TASKS, CascadeError, CrossEntropyTaskLoss, Splits, Task, TaskOptions
from tasks.data import DATA_ENV, resolve_data_root, stratified_split

_MEAN, _STD = 0.1307, 0.3081


class MnistOptions(TaskOptions):
    data_root: str | None = None
    cal_size: Annotated[int, Field(gt=0)] = 5000
    train_size: Annotated[int, Field(gt=0)] | None = None
    download: bool = False


@TASKS.register("mnist")
class MnistTask(Task):
    """The 60,000 / 10,000 digits. The calibration split (``cal_size``, stratified by the
    seed) comes out of the official training set; the test split is the official one.

    Data root: ``task.data_root``, else ``$CASCADE_DATA``, else ``~/.cache/cascade/data``;
    torchvision's layout ``<root>/MNIST/raw/*-ubyte``.
    """

    Options = MnistOptions
    input_shape = (1, 28, 28)
    num_outputs = 10
    default_little = {"name": "mlp", "hidden": [32]}
    default_big = {"name": "cnn", "channels": [32, 64], "hidden": 128}

    def __init__(self, options: MnistOptions | None = None):
        super().__init__(options)
        self.criterion = CrossEntropyTaskLoss()

    def _load(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        from torchvision.datasets import MNIST

        root = resolve_data_root(self.options.data_root)
        try:
            ds = MNIST(root=str(root), train=train, download=self.options.download)
        except RuntimeError as exc:
            raise CascadeError(
                f"MNIST not found in {root / 'MNIST' / 'raw'} ({exc}); set task.data_root or ${DATA_ENV}"
            ) from None
        x = (ds.data.float().div(255.0).sub(_MEAN).div(_STD)).unsqueeze(1)  # [N, 1, 28, 28]
        return x, ds.targets.long()

    def build_splits(self, seed: int) -> Splits:
        x, y = self._load(train=True)
        x_test, y_test = self._load(train=False)
        rest, cal = stratified_split(y.numpy(), self.options.cal_size, seed, "mnist")
        if self.options.train_size is not None and self.options.train_size < len(rest):
            rng = np.random.default_rng(seed)
            rest = rng.choice(rest, self.options.train_size, replace=False)
        rest, cal = np.sort(rest), np.sort(cal)
        return Splits(TensorDataset(x[rest], y[rest]), TensorDataset(x[cal], y[cal]), TensorDataset(x_test, y_test))
