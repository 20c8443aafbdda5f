"""Settings where a learned appeal decision should win: label noise in the training data,
a specialist big network, and distribution shift between training and test.

Each is a transform of a seed's :class:`~cascade.contracts.task.Splits`, configured by the
``perturb:`` key and fixed by the seed, applied to in-memory tensor data:

- ``label_noise``: a fraction of the *training* split's labels replaced by a uniformly
  drawn other class (calibration and test stay clean, so AD is still measured right);
- ``big_classes`` / ``big_other_fraction``: the big network trains on every training
  input of ``big_classes`` and only this fraction of the others' (a specialist);
- ``shift``: the *test* split corrupted (Hendrycks & Dietterich 2019's families): Gaussian
  noise, Gaussian blur, JPEG compression or contrast, at severity 1-5, in pixel space (the
  task's :class:`~cascade.contracts.task.Preprocessing` undone, then redone); with
  ``splits: [cal, test]`` the calibration split too, as a user who calibrates on the data
  they will serve would (the thresholds and the post-hoc fits then see the shift).
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

from cascade.core.errors import CascadeError
from cascade.contracts.task import Preprocessing, Splits

#: per severity 1..5: noise std (pixels in [0, 1]), blur sigma (pixels), JPEG quality, contrast factor
SEVERITIES = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
    "blur": (0.5, 0.75, 1.0, 1.25, 1.5),
    "jpeg": (80, 65, 58, 50, 40),
    "contrast": (0.4, 0.3, 0.2, 0.1, 0.05),
}


#: where the calibration split's corruption draws its noise from: apart from the test split's (``seed``)
_CAL_SEED_OFFSET = 10_000


class ShiftConfig(BaseModel):
    """``shift: {corruption: gaussian_noise, severity: 3, splits: [test]}``: ``splits`` are the
    splits corrupted: ``[test]`` (thresholds chosen on clean data) or ``[cal, test]``."""

    model_config = ConfigDict(extra="forbid")
    corruption: Literal["gaussian_noise", "blur", "jpeg", "contrast"]
    severity: Annotated[int, Field(ge=1, le=5)] = 3
    splits: list[Literal["cal", "test"]] = Field(default_factory=lambda: ["test"], min_length=1)

    @field_validator("splits")
    @classmethod
    def _test_always(cls, v: list[str]) -> list[str]:
        if "test" not in v or len(set(v)) != len(v):
            raise ValueError(f"must be [test] or [cal, test] (the test split is always the shifted one); got {v}")
        return v


class PerturbConfig(BaseModel):
    """``perturb:`` what makes the data harder than a clean benchmark (none by default)."""

    model_config = ConfigDict(extra="forbid")
    label_noise: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    big_classes: list[Annotated[int, Field(ge=0)]] | None = Field(default=None, min_length=1)
    big_other_fraction: Annotated[float, Field(ge=0.0, le=1.0)] = 0.1
    shift: ShiftConfig | None = None

    @property
    def active(self) -> bool:
        return self.label_noise > 0 or self.big_classes is not None or self.shift is not None


def _tensors(dataset: Dataset, split: str) -> tuple[Tensor, Tensor]:
    if not isinstance(dataset, TensorDataset):
        raise CascadeError(f"perturb: the {split} split is a {type(dataset).__name__}; perturbations need in-memory "
                           "tensor data (a TensorDataset)")
    return dataset.tensors[0], dataset.tensors[1]


def noisy_labels(y: Tensor, fraction: float, num_classes: int, seed: int) -> Tensor:
    """``y`` with ``round(fraction * N)`` labels, drawn without replacement, each replaced by
    a uniformly drawn *other* class."""
    g = torch.Generator().manual_seed(seed)
    n = len(y)
    flip = torch.randperm(n, generator=g)[: round(fraction * n)]
    shift = torch.randint(1, num_classes, (len(flip),), generator=g)
    out = y.clone()
    out[flip] = (y[flip] + shift) % num_classes
    return out


def specialist_rows(y: Tensor, classes: list[int], other_fraction: float, seed: int) -> Tensor:
    """Sorted indices of every row of ``classes`` and ``other_fraction`` of the others'."""
    g = torch.Generator().manual_seed(seed)
    mine = torch.isin(y, torch.tensor(classes))
    others = (~mine).nonzero().squeeze(1)
    keep = others[torch.randperm(len(others), generator=g)[: round(other_fraction * len(others))]]
    return torch.cat([mine.nonzero().squeeze(1), keep]).sort().values


def corrupt(x: Tensor, shift: ShiftConfig, prep: Preprocessing, seed: int) -> Tensor:
    """``x`` (network inputs ``[N, C, H, W]``) corrupted in pixel space, then re-normalized.

    Raises:
        CascadeError: inputs that are not images (``[N, C, H, W]``).
    """
    if x.dim() != 4:
        raise CascadeError(f"perturb.shift: corruptions need image inputs [N, C, H, W]; got shape {list(x.shape)}")
    mean = torch.tensor(prep.mean, dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(prep.std, dtype=x.dtype).view(1, -1, 1, 1)
    pixels = (x * std + mean).clamp(0, 1)  # [N, C, H, W] in [0, 1]
    level = SEVERITIES[shift.corruption][shift.severity - 1]
    if shift.corruption == "gaussian_noise":
        g = torch.Generator().manual_seed(seed)
        pixels = pixels + level * torch.randn(pixels.shape, generator=g, dtype=x.dtype)
    elif shift.corruption == "blur":
        # torchvision: heavy, and needed only for this corruption
        from torchvision.transforms.functional import gaussian_blur

        size = 2 * round(2 * level) + 1
        pixels = gaussian_blur(pixels, [size, size], [level, level])
    elif shift.corruption == "jpeg":
        # torchvision: heavy, and needed only for this corruption
        from torchvision.io import decode_jpeg, encode_jpeg

        as_bytes = (pixels * 255).round().to(torch.uint8)
        pixels = torch.stack([decode_jpeg(encode_jpeg(img, quality=level)) for img in as_bytes]).to(x.dtype) / 255
    else:  # contrast: towards each image's mean
        centre = pixels.mean(dim=(1, 2, 3), keepdim=True)
        pixels = (pixels - centre) * level + centre
    return (pixels.clamp(0, 1) - mean) / std


def perturb_splits(splits: Splits, cfg: PerturbConfig, num_classes: int, prep: Preprocessing | None,
                   seed: int) -> tuple[Splits, Dataset]:
    """``(splits, the big network's training data)`` after ``cfg``'s perturbations.

    Raises:
        CascadeError: data not in memory, label noise or a specialist on a regression
            task, a class outside the task's, or a shift on a task without
            :class:`~cascade.contracts.task.Preprocessing` (pixel space unknown).
    """
    if not cfg.active:
        return splits, splits.train
    x, y = _tensors(splits.train, "train")
    for key, on in (("label_noise", cfg.label_noise > 0), ("big_classes", cfg.big_classes is not None)):
        if on and y.is_floating_point():
            raise CascadeError(f"perturb.{key}: needs class labels, and this task's targets are real numbers "
                               "(a regression task); leave it out")
    if cfg.label_noise > 0:
        y = noisy_labels(y, cfg.label_noise, num_classes, seed)
    train = TensorDataset(x, y)
    big = train
    if cfg.big_classes is not None:
        bad = [c for c in cfg.big_classes if c >= num_classes]
        if bad:
            raise CascadeError(f"perturb.big_classes: {bad} are not classes of this task (0..{num_classes - 1})")
        rows = specialist_rows(y, cfg.big_classes, cfg.big_other_fraction, seed)
        big = TensorDataset(x[rows], y[rows])
    cal, test = splits.cal, splits.test
    if cfg.shift is not None:
        if prep is None:
            raise CascadeError("perturb.shift: the task declares no preprocessing (cascade.Preprocessing), so its "
                               "pixel space is unknown")
        xt, yt = _tensors(splits.test, "test")
        test = TensorDataset(corrupt(xt, cfg.shift, prep, seed), yt)
        if "cal" in cfg.shift.splits:
            xc, yc = _tensors(splits.cal, "cal")
            cal = TensorDataset(corrupt(xc, cfg.shift, prep, seed + _CAL_SEED_OFFSET), yc)
    return Splits(train, cal, test), big
