"""A user's own labelled images, one folder per class (torchvision's ``ImageFolder`` layout)."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import Tensor
from torch.utils.data import TensorDataset

from cascade import (
    TASKS,
    CrossEntropyTaskLoss,
    DataError,
    Preprocessing,
    Splits,
    Task,
    TaskOptions,
)
from cascade.training.augment import random_crop_flip
from tasks.data import stratified_split
from tasks.images import (
    DecodedImages,
    check_same_classes,
    class_folders,
    first_image,
    image_size,
    load_images,
    normalize,
    resolve_cache_dir,
)

#: the seed of the test split cut out of a single folder (``test_fraction``): the same
#: test images for every run seed, and the normalization statistics of the rest
SPLIT_SEED = 0
#: the calibration share of the training images when neither cal_size nor cal_fraction is set
DEFAULT_CAL_FRACTION = 0.1

_PositiveInt = Annotated[int, Field(gt=0)]
_Fraction = Annotated[float, Field(gt=0, lt=1)]


class ImageFolderOptions(TaskOptions):
    #: ``<root>/train/<class>/<image>`` and ``<root>/test/<class>/<image>``, or (with
    #: ``test_fraction``) ``<root>/<class>/<image>``
    root: str
    test_fraction: _Fraction | None = None
    #: resize every image to ``size`` (an int for square images, or ``[height, width]``);
    #: unset: every image must have the size of the first one
    size: _PositiveInt | tuple[_PositiveInt, _PositiveInt] | None = None
    channels: Literal[1, 3] = 3
    #: the calibration split, out of the training images: a count or a fraction (default 0.1)
    cal_size: _PositiveInt | None = None
    cal_fraction: _Fraction | None = None
    #: training-batch augmentation: ``crop_flip`` (random crop of the zero-padded image and
    #: horizontal flip, for photos of objects), ``flip``, or ``none`` (the default: a flip
    #: changes the meaning of text, digits or left/right anatomy)
    augment: Literal["crop_flip", "flip", "none"] = "none"
    #: pixels of zero padding for ``crop_flip``
    padding: Annotated[int, Field(ge=1)] = 4
    #: where decoded images are cached (default ``$CASCADE_CACHE``, else ``~/.cache/cascade``)
    cache_dir: str | None = None

    @model_validator(mode="after")
    def _one_cal_option(self) -> ImageFolderOptions:
        if self.cal_size is not None and self.cal_fraction is not None:
            raise ValueError("set cal_size or cal_fraction, not both")
        return self


@TASKS.register("image_folder")
class ImageFolderTask(Task):
    """Classification of a user's own images: one sub-folder per class, the classes
    numbered in sorted folder order (as torchvision's ``ImageFolder`` does).

    Layouts: ``<root>/train/<class>/<image>`` with ``<root>/test/<class>/<image>`` (the
    same class folders), or ``<root>/<class>/<image>`` with ``test_fraction``, which cuts
    a stratified test split out of it with a fixed seed (:data:`SPLIT_SEED`: the same for
    every run seed). The calibration split (``cal_size`` or ``cal_fraction``, stratified
    by the run seed) comes out of the rest. Images are converted to ``channels``, decoded
    once and cached (see :mod:`tasks.images`).

    The input shape, the classes and the normalization depend on the data, so they are
    read from the folder when the task is built: ``input_shape`` and ``output_names``
    from a scan of the class folders and the first image's header; ``preprocessing``
    (per-channel mean and std of the training and calibration images) when first read,
    from the decoded images. Building the task (also to export a finished run) needs
    the folder, or at least its cache.

    Raises:
        DataError: (when built) a missing folder, a layout that does not match
            ``test_fraction``, class folders that differ between ``train/`` and
            ``test/``, or fewer than 2 classes.
    """

    Options = ImageFolderOptions
    default_little: ClassVar[dict[str, Any]] = {"name": "mobilenet_v2_cifar"}
    default_big: ClassVar[dict[str, Any]] = {"name": "resnet18_cifar"}

    def __init__(self, options: ImageFolderOptions | None = None):
        if options is None:
            raise DataError("image_folder: set task.root, the folder of class folders")
        super().__init__(options)
        self.criterion = CrossEntropyTaskLoss()
        problems = self.data_problems(options, configured_only=False)
        if problems:
            raise DataError(f"task.{problems[0]}")
        root = Path(options.root).expanduser()
        if options.test_fraction is None:
            self._train_dir, self._test_dir = root / "train", root / "test"
            classes = check_same_classes(self._train_dir, self._test_dir)
        else:
            self._train_dir, self._test_dir = root, None
            classes = class_folders(root)
        if len(classes) < 2:
            raise DataError(f"{self._train_dir}: one class folder ({classes[0]}); a classifier needs at least 2")
        self.output_names = tuple(classes)
        self.num_outputs = len(classes)
        first = first_image(self._train_dir, classes)
        if first is None:
            raise DataError(f"{self._train_dir / classes[0]}: no images")
        self._size_hint = ""
        if options.size is None:
            size = image_size(first)
            self._size_hint = f" (the size of {first}); set task.size: [h, w] to resize every image"
        else:
            size = (options.size, options.size) if isinstance(options.size, int) else tuple(options.size)
        self.input_shape = (options.channels, *size)

    @classmethod
    def data_problems(cls, options: ImageFolderOptions, configured_only: bool) -> list[str]:
        """A missing ``root``, or a layout that does not match ``test_fraction``.

        Args:
            options: the task's options.
            configured_only: unused: ``root`` is always set by the config.

        Returns:
            ``"<option>: <message>"`` per problem.
        """
        root = Path(options.root).expanduser()
        if not root.is_dir():
            return [f"root: {root}: no such folder"]
        split = [p for p in ("train", "test") if (root / p).is_dir()]
        if options.test_fraction is not None and split == ["train", "test"]:
            return [(f"test_fraction: {root} has train/ and test/ folders; remove test_fraction to use them, or point "
                    "root at one folder of class folders")]
        if options.test_fraction is None and split != ["train", "test"]:
            have = f"has {split[0]}/ but no {'test' if split == ['train'] else 'train'}/" if split else \
                "has no train/ and test/ folders"
            return [(f"test_fraction: {root} {have}; set test_fraction (e.g. 0.2) to split its class folders into "
                    "train and test, or give it train/<class>/ and test/<class>/")]
        return []

    def augment(self, x: Tensor) -> Tensor:
        """The ``augment`` option: random crop (``padding``) and flip, flip only, or none."""
        if self.options.augment == "crop_flip":
            return random_crop_flip(x, padding=self.options.padding)
        if self.options.augment == "flip":
            return random_crop_flip(x, padding=0)
        return x

    @property
    def augments(self) -> bool:
        return self.options.augment != "none"

    @property
    def preprocessing(self) -> Preprocessing:  # type: ignore[override]  (read from the data)
        """Pixel values 0-255 scaled to [0, 1], then normalized by the per-channel mean and
        std of the training and calibration images (decodes them if not cached)."""
        mean, std = self._data["stats"]
        return Preprocessing(raw_max=255.0, mean=mean, std=std)

    @cached_property
    def _data(self) -> dict[str, Any]:
        """The decoded images: ``pool`` (training and calibration) and ``test``, each
        ``(uint8 images, labels)``, and ``stats`` (mean, std) of the pool."""
        o = self.options
        cache = resolve_cache_dir(o.cache_dir)
        size = tuple(self.input_shape[1:])

        def load(folder: Path) -> DecodedImages:
            return load_images(folder, cache, size=size, channels=o.channels, resize=o.size is not None,
                               classes=self.output_names, size_hint=self._size_hint)

        train = load(self._train_dir)
        if self._test_dir is not None:
            test = load(self._test_dir)
            return {"pool": (train.images, train.labels), "test": (test.images, test.labels),
                    "stats": train.channel_stats()}
        pool, held_out = (np.sort(i) for i in stratified_split(train.labels, o.test_fraction, SPLIT_SEED,
                                                                 "image_folder (test_fraction)"))
        return {"pool": (train.images[pool], train.labels[pool]),
                "test": (train.images[held_out], train.labels[held_out]), "stats": train.channel_stats(pool)}

    def build_splits(self, seed: int) -> Splits:
        o = self.options
        (x, y), (x_test, y_test) = self._data["pool"], self._data["test"]
        mean, std = self._data["stats"]
        cal_part = o.cal_size if o.cal_size is not None else (o.cal_fraction or DEFAULT_CAL_FRACTION)
        rest, cal = (np.sort(i) for i in stratified_split(y, cal_part, seed, "image_folder (calibration split)"))

        def dataset(images: np.ndarray, labels: np.ndarray) -> TensorDataset:
            return TensorDataset(normalize(images, mean, std), torch.from_numpy(labels))

        return Splits(dataset(x[rest], y[rest]), dataset(x[cal], y[cal]), dataset(x_test, y_test))
