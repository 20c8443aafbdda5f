"""scikit-learn's handwritten digits (8x8 grey images, 10 classes), embedded with it."""

from __future__ import annotations

from typing import Annotated

import numpy as np
import torch
from pydantic import Field, model_validator
from torch.utils.data import TensorDataset

from cascade import TASKS, CrossEntropyTaskLoss, Preprocessing, Splits, Task, TaskOptions
from tasks.data import stratified_split


class DigitsOptions(TaskOptions):
    cal_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.2
    test_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.3

    @model_validator(mode="after")
    def _room_for_training(self) -> "DigitsOptions":
        if self.cal_fraction + self.test_fraction >= 1:
            total = self.cal_fraction + self.test_fraction
            raise ValueError(f"cal_fraction + test_fraction must be < 1 (got {total:g}), or nothing is left to train on")
        return self


@TASKS.register("digits")
class DigitsTask(Task):
    """1,797 digits; stratified train / calibration / test splits fixed by the seed.

    Little network: an MLP with 32 hidden units (~2.4 kMACs). Big: a two-layer CNN
    (~0.35 MMACs), over 100x the little one's cost.
    """

    Options = DigitsOptions
    input_shape = (1, 8, 8)
    num_outputs = 10
    preprocessing = Preprocessing(raw_max=16.0)  # grey levels 0-16
    default_little = {"name": "mlp", "hidden": [32]}
    default_big = {"name": "cnn", "channels": [32, 64], "hidden": 128}

    def __init__(self, options: DigitsOptions | None = None):
        super().__init__(options)
        self.criterion = CrossEntropyTaskLoss()

    def build_splits(self, seed: int) -> Splits:
        from sklearn.datasets import load_digits

        o = self.options
        digits = load_digits()
        x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)  # [N, 1, 8, 8]
        y = torch.tensor(digits.target, dtype=torch.long)
        labels = digits.target
        rest, test = stratified_split(labels, o.test_fraction, seed, "digits")
        cal_share = o.cal_fraction / (1 - o.test_fraction)
        tr, cal = stratified_split(labels[rest], cal_share, seed, "digits")
        train, cal = rest[tr], rest[cal]
        return Splits(*(TensorDataset(x[i], y[i]) for i in (np.sort(train), np.sort(cal), np.sort(test))))
