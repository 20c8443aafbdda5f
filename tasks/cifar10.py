"""CIFAR-10 (60,000 32x32 colour images, 10 classes) from an ``ImageFolder`` copy or
torchvision's original files."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field
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
from tasks.data import describe_data_root, resolve_data_root, stratified_split
from tasks.images import check_same_classes, load_images, normalize, resolve_cache_dir

log = logging.getLogger("cascade")

#: CIFAR-10's classes in label order (also the sorted class folder names)
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
#: per-channel mean and std of the training images' pixel values in [0, 1]
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
#: torchvision's folder of the original ("python version") files, and its files
_BATCHES = "cifar-10-batches-py"
_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
_TEST_FILES = ("test_batch",)
_META = "batches.meta"


class Cifar10Options(TaskOptions):
    data_root: str | None = None
    #: ``image_folder``: ``<data_root>/<folder>/{train,test}/<class>/<image>``;
    #: ``torchvision``: ``<data_root>/cifar-10-batches-py/`` (torchvision's original files)
    format: Literal["image_folder", "torchvision"] = "image_folder"
    folder: str = "cifar10-jpeg"
    cal_size: Annotated[int, Field(gt=0)] = 5000
    train_size: Annotated[int, Field(gt=0)] | None = None
    #: where decoded images are cached (default ``$CASCADE_CACHE``, else ``~/.cache/cascade``)
    cache_dir: str | None = None


@TASKS.register("cifar10")
class Cifar10Task(Task):
    """CIFAR-10: 50,000 training and 10,000 test images. The calibration split
    (``cal_size``, stratified by the seed) comes out of the official training set (and
    ``train_size``, when set, subsamples what is left); the test split is the official one.
    Training batches are augmented with a random crop of the 4-pixel zero-padded image
    and a random horizontal flip.

    Data root: ``task.data_root``, else ``$CASCADE_DATA``, else ``~/.cache/cascade/data``.
    Two layouts (``format``):

    - ``image_folder`` (default): ``<root>/<folder>/train/<class>/<image>`` and
      ``.../test/<class>/<image>`` (``folder`` defaults to ``cifar10-jpeg``), the class
      folders named as in :data:`CLASSES`. The images are decoded once and cached as
      uint8 arrays in ``cache_dir``; later runs load the cache in about a second.
    - ``torchvision``: the original "python version" files where
      ``torchvision.datasets.CIFAR10(root)`` finds them: ``<root>/cifar-10-batches-py/``
      holding ``data_batch_1`` ... ``data_batch_5``, ``test_batch`` (pickled dicts with
      ``data``: uint8 ``[N, 3072]``, one row per image in channel, row, column order, and
      ``labels``: N ints) and ``batches.meta`` (``label_names``). Read directly (allowing
      only numpy arrays in the pickles), without torchvision's checksum of the files.
    """

    Options = Cifar10Options
    input_shape = (3, 32, 32)
    num_outputs = 10
    output_names = CLASSES
    preprocessing = Preprocessing(raw_max=255.0, mean=MEAN, std=STD)
    default_little: ClassVar[dict[str, Any]] = {"name": "mobilenet_v2_cifar"}
    default_big: ClassVar[dict[str, Any]] = {"name": "resnet18_cifar"}

    def __init__(self, options: Cifar10Options | None = None):
        super().__init__(options)
        self.criterion = CrossEntropyTaskLoss()
        self._arrays: dict[str, tuple[np.ndarray, np.ndarray]] | None = None  # uint8 images, labels per part

    def augment(self, x: Tensor) -> Tensor:
        """Random 32x32 crop of the 4-pixel zero-padded batch and random horizontal flip."""
        return random_crop_flip(x, padding=4)

    @classmethod
    def data_problems(cls, options: Cifar10Options, configured_only: bool) -> list[str]:
        """Missing CIFAR-10 folders or files (see :func:`cascade.config.validate`).

        Args:
            options: the task's options.
            configured_only: check only a ``data_root`` the config sets, not
                ``$CASCADE_DATA`` or the default root.

        Returns:
            ``"data_root: <message>"`` per problem.
        """
        if configured_only and not options.data_root:
            return []
        root = resolve_data_root(options.data_root)
        where = describe_data_root(options.data_root)
        if not root.is_dir():
            return [f"data_root: {root}: no such folder ({where})"]
        if options.format == "torchvision":
            folder = root / _BATCHES
            missing = [f for f in (*_TRAIN_FILES, *_TEST_FILES, _META) if not (folder / f).is_file()]
            if missing:
                return [(f"data_root: {folder}: missing {', '.join(missing)} (torchvision's CIFAR-10 files, from "
                         f"{where}; or set format: image_folder)")]
            return []
        folder = root / options.folder
        missing = [f"{p}/" for p in ("train", "test") if not (folder / p).is_dir()]
        if missing:
            return [(f"data_root: {folder}: missing {', '.join(missing)} (ImageFolder layout train/<class>/<image>, "
                     f"from {where}; or set folder:, or format: torchvision)")]
        return []

    def _load(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """uint8 images ``[N, 3, 32, 32]`` and int64 labels of ``train`` and ``test``,
        read once per task."""
        if self._arrays is not None:
            return self._arrays
        problems = self.data_problems(self.options, configured_only=False)
        if problems:
            raise DataError(f"cifar10: {problems[0].removeprefix('data_root: ')}")
        root = resolve_data_root(self.options.data_root)
        if self.options.format == "torchvision":
            self._arrays = {part: _read_batches(root / _BATCHES, files)
                            for part, files in (("train", _TRAIN_FILES), ("test", _TEST_FILES))}
            _check_meta(root / _BATCHES / _META)
        else:
            folder = root / self.options.folder
            classes = check_same_classes(folder / "train", folder / "test")
            if tuple(classes) != CLASSES:
                raise DataError(f"{folder / 'train'}: class folders {', '.join(classes)}; CIFAR-10 needs "
                                f"{', '.join(CLASSES)}")
            cache = resolve_cache_dir(self.options.cache_dir)
            self._arrays = {}
            for part in ("train", "test"):
                images = load_images(folder / part, cache, size=(32, 32), classes=CLASSES,
                                     size_hint="; CIFAR-10 images are 32x32")
                self._arrays[part] = images.images, images.labels
        return self._arrays

    def build_splits(self, seed: int) -> Splits:
        arrays = self._load()
        x, y = arrays["train"]
        x_test, y_test = arrays["test"]
        rest, cal = stratified_split(y, self.options.cal_size, seed, "cifar10")
        if self.options.train_size is not None and self.options.train_size < len(rest):
            rest = np.random.default_rng(seed).choice(rest, self.options.train_size, replace=False)
        rest, cal = np.sort(rest), np.sort(cal)

        def dataset(images: np.ndarray, labels: np.ndarray) -> TensorDataset:
            return TensorDataset(normalize(images, MEAN, STD), torch.from_numpy(labels))

        return Splits(dataset(x[rest], y[rest]), dataset(x[cal], y[cal]), dataset(x_test, y_test))


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings, numbers and numpy arrays, nothing else: a data
    file cannot run code."""

    #: numpy's array rebuilder, pickled as numpy.core.multiarray._reconstruct by numpy 1,
    #: numpy._core.multiarray._reconstruct by numpy 2
    _RECONSTRUCT = np.ndarray.__reduce__(np.empty(0))[0]
    _ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset(
        {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")})

    def find_class(self, module: str, name: str) -> Any:
        if name == "_reconstruct" and module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            return self._RECONSTRUCT
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only numpy arrays are allowed)")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with open(path, "rb") as f:
            data = _ArrayUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise DataError(f"{path}: not a CIFAR-10 batch file ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: not a CIFAR-10 batch file (a pickled {type(data).__name__}, expected a dict)")
    return data


def _read_batches(folder: Path, files: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Images ``[N, 3, 32, 32]`` and labels of torchvision's CIFAR-10 batch ``files``."""
    images, labels = [], []
    for name in files:
        path = folder / name
        d = _unpickle(path)
        data, y = d.get("data"), d.get("labels")
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            got = f"{data.dtype} {list(data.shape)}" if isinstance(data, np.ndarray) else type(data).__name__
            raise DataError(f"{path}: 'data' must be uint8 [N, 3072] (32x32 RGB images), got {got}")
        if not isinstance(y, list) or len(y) != len(data):
            got = f"{len(y)} labels" if isinstance(y, list) else f"'labels' of type {type(y).__name__}"
            raise DataError(f"{path}: {got} for {len(data)} images")
        y = np.asarray(y, dtype=np.int64)
        bad = np.flatnonzero((y < 0) | (y >= len(CLASSES)))
        if len(bad):
            raise DataError(f"{path}: index {bad[0]}: label {y[bad[0]]} outside the classes 0..{len(CLASSES) - 1}")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(y)
    return np.concatenate(images), np.concatenate(labels)


def _check_meta(path: Path) -> None:
    names = _unpickle(path).get("label_names")
    if names is None or tuple(names) != CLASSES:
        raise DataError(f"{path}: label_names {names!r} are not CIFAR-10's ({', '.join(CLASSES)})")
