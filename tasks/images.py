"""Image folders in torchvision's ``ImageFolder`` layout (``<folder>/<class>/<image>``),
decoded once into uint8 arrays and cached on disk, for the tasks that read images.

Decoding tens of thousands of small files takes tens of seconds; a later run finds the
arrays in the cache (``$CASCADE_CACHE``, else ``~/.cache/cascade``, under ``images/``)
and loads them in about a second. The cache file is keyed by the folder's contents: the
sorted relative paths, sizes and modification times of its images (cheap to list,
changed by any edit), and by how they were decoded (channels, size).
"""

from __future__ import annotations

import hashlib
import logging
import os
import zipfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cascade import CascadeError, DataError
from cascade.deploy.bundle import IMAGE_SUFFIXES
from cascade.core.files import atomic_path

log = logging.getLogger("cascade")

# IMAGE_SUFFIXES: the file endings read as images, as a bundle routes them (others, a
# .DS_Store or a README, are ignored)
#: the environment variable that points at the cache folder
CACHE_ENV = "CASCADE_CACHE"
#: bump when the cache file's contents change meaning
_CACHE_VERSION = 1
#: images per decoding job
_CHUNK = 512


def resolve_cache_dir(configured: str | None) -> Path:
    """The cache folder: the config key if set, else ``$CASCADE_CACHE``, else ``~/.cache/cascade``."""
    if configured:
        return Path(configured).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path.home() / ".cache" / "cascade"


def class_folders(folder: Path) -> list[str]:
    """Sorted names of ``folder``'s sub-folders (hidden ones skipped): the classes, whose
    index is their position in this list, as torchvision's ``ImageFolder`` numbers them.

    Raises:
        DataError: ``folder`` is missing or holds no sub-folder.
    """
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder")
    names = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    if not names:
        raise DataError(f"{folder}: no class folders; expected the ImageFolder layout {folder}/<class>/<image>")
    return names


def check_same_classes(train: Path, test: Path) -> list[str]:
    """The class folders of ``train``, after checking that ``test`` has the same ones.

    Raises:
        DataError: a missing folder, or class folders that differ, naming both folders.
    """
    a, b = class_folders(train), class_folders(test)
    if a != b:
        only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        diff = "; ".join(f"only in {p.name}/: {', '.join(d)}" for p, d in ((train, only_a), (test, only_b)) if d)
        raise DataError(f"{train} and {test}: different class folders ({diff}); both need the same classes")
    return a


@dataclass(frozen=True)
class ImageListing:
    """The images of a folder in ``ImageFolder`` layout, in class then path order.

    Attributes:
        folder: the folder.
        classes: the class names; ``labels`` index into them.
        files: each image's path relative to ``folder`` (``"<class>/.../<name>"``).
        labels: int64 ``[N]``.
        key: a hex digest of the relative paths, sizes and modification times.
    """

    folder: Path
    classes: tuple[str, ...]
    files: tuple[str, ...]
    labels: np.ndarray
    key: str


def list_images(folder: Path, classes: Sequence[str] | None = None) -> ImageListing:
    """List the images under each class folder of ``folder`` (recursively, sorted).

    Args:
        folder: the folder.
        classes: the class folders to read, in label order (default: all of them).

    Raises:
        DataError: a missing folder, a missing class folder, or a class folder with no
            image (naming it and the file endings read).
    """
    classes = tuple(class_folders(folder) if classes is None else classes)
    files: list[str] = []
    labels: list[int] = []
    stats: list[str] = []
    for label, name in enumerate(classes):
        top = folder / name
        if not top.is_dir():
            raise DataError(f"{top}: no such class folder")
        n = len(files)
        for rel, entry in _images_under(str(top), f"{name}/"):
            st = entry.stat()
            files.append(rel)
            stats.append(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n")
        if len(files) == n:
            raise DataError(f"{top}: no images (files ending in {', '.join(IMAGE_SUFFIXES)})")
        labels += [label] * (len(files) - n)
    key = hashlib.sha256("".join(stats).encode()).hexdigest()
    return ImageListing(folder, classes, tuple(files), np.asarray(labels, dtype=np.int64), key)


def first_image(folder: Path, classes: Sequence[str]) -> Path | None:
    """The first image in :func:`list_images`' order, found without listing the rest."""
    for name in classes:
        for _, entry in _images_under(str(folder / name), ""):
            return Path(entry.path)
    return None


def _images_under(top: str, rel: str) -> Iterator[tuple[str, os.DirEntry]]:
    """``(rel + path below top, entry)`` of each image file under ``top``: sorted by name,
    recursively, hidden entries skipped. ``os.scandir`` lists a folder of 50,000 images,
    with their sizes and times, in about half a second."""
    with os.scandir(top) as it:
        entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    for e in entries:
        if e.is_dir():
            yield from _images_under(e.path, f"{rel}{e.name}/")
        elif os.path.splitext(e.name)[1].lower() in IMAGE_SUFFIXES:
            yield rel + e.name, e


def image_size(path: Path) -> tuple[int, int]:
    """``(height, width)`` of an image file, read from its header only.

    Raises:
        DataError: a file that does not open as an image.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return img.height, img.width
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: not a readable image ({exc})") from None


@dataclass
class DecodedImages:
    """A folder's images as arrays.

    Attributes:
        images: uint8 ``[N, C, H, W]``.
        labels: int64 ``[N]``, indices into ``classes``.
        classes: the class names.
        pixel_sums: float64 ``[N, 2, C]``: per image and channel, the sum and the sum of
            squares of its pixel values scaled to [0, 1] (per-channel mean and std of any
            subset without a pass over the pixels: :meth:`channel_stats`).
    """

    images: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]
    pixel_sums: np.ndarray

    def channel_stats(self, index: np.ndarray | None = None) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and standard deviation of the pixel values in [0, 1] of the
        images ``index`` (all of them by default), rounded to 4 decimals."""
        sums = self.pixel_sums if index is None else self.pixel_sums[index]
        count = len(sums) * self.images.shape[2] * self.images.shape[3]
        mean = sums[:, 0].sum(axis=0) / count
        var = np.maximum(sums[:, 1].sum(axis=0) / count - mean**2, 0.0)
        return tuple(round(float(m), 4) for m in mean), tuple(round(max(float(s), 1e-4), 4) for s in np.sqrt(var))


def normalize(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 images ``[N, C, H, W]`` as float32 ``(x / 255 - mean[c]) / std[c]``."""
    c = images.shape[1]
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], dtype=torch.float32).expand(c).reshape(1, c, 1, 1)
    shift = torch.tensor([m / s for m, s in zip(mean, std)], dtype=torch.float32).expand(c).reshape(1, c, 1, 1)
    return torch.from_numpy(images).float().mul_(scale).sub_(shift)


def load_images(
    folder: Path,
    cache_dir: Path,
    *,
    size: tuple[int, int],
    channels: int = 3,
    resize: bool = False,
    classes: Sequence[str] | None = None,
    size_hint: str = "",
) -> DecodedImages:
    """The images of ``folder`` (``ImageFolder`` layout) as arrays, from the cache when
    it holds this folder's current contents, else decoded (on up to as many threads as
    torch uses) and written to the cache atomically (a cache that cannot be written is
    a warning). The cache keeps one file per folder, the latest decoding.

    Args:
        folder: the folder.
        cache_dir: the cache root (see :func:`resolve_cache_dir`); files go to its
            ``images/`` folder.
        channels: 1 (grey) or 3 (RGB); images are converted.
        size: ``(height, width)``: the size every image must have, or (with ``resize``)
            is resized to (bilinear).
        resize: resize images of another size instead of refusing them.
        classes: the class folders, in label order (default: all of them).
        size_hint: appended to the error for an image of another size (how to fix it).

    Raises:
        DataError: a missing folder or class folder, an empty class folder, a file that
            does not decode as an image, or (without ``resize``) an image of another
            size; each one line naming the file.
    """
    listing = list_images(folder, classes)
    key = hashlib.sha256(f"v{_CACHE_VERSION} c{channels} s{size} r{resize} {listing.classes} {listing.key}".encode())
    place = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:8]  # two folders never share a file
    stem = f"{folder.resolve().parent.name}_{folder.name}-{place}"
    path = cache_dir / "images" / f"{stem}-{key.hexdigest()[:20]}.npz"
    cached = _read_cache(path, len(listing.files))
    if cached is not None:
        return DecodedImages(cached["images"], listing.labels, listing.classes, cached["pixel_sums"])
    images, sums = decode_images(listing, channels, size, resize, size_hint)
    try:
        _write_cache(path, stem, images=images, pixel_sums=sums)
    except (OSError, CascadeError) as exc:  # a read-only or full disk: the run goes on, decoding again next time
        log.warning("%s: could not cache the decoded images (%s); set task.cache_dir or $%s to a writable folder",
                    path.parent, exc, CACHE_ENV)
    return DecodedImages(images, listing.labels, listing.classes, sums)


def decode_images(
    listing: ImageListing, channels: int, size: tuple[int, int], resize: bool, size_hint: str = ""
) -> tuple[np.ndarray, np.ndarray]:
    """Decode every image of ``listing``: uint8 ``[N, C, H, W]`` and the per-image pixel
    sums of :class:`DecodedImages`. Arguments and errors as in :func:`load_images`."""
    n, (h, w) = len(listing.files), size
    log.info("decoding the %d images of %s once (cached afterwards)", n, listing.folder)
    images = np.empty((n, channels, h, w), dtype=np.uint8)
    sums = np.empty((n, 2, channels), dtype=np.float64)

    def decode(start: int) -> None:  # fills rows start..start+_CHUNK: the jobs never share a row
        stop = min(start + _CHUNK, n)
        for i in range(start, stop):
            images[i] = _decode_one(listing.folder / listing.files[i], channels, size, resize, size_hint)
        part = images[start:stop].reshape(stop - start, channels, -1) / 255.0  # [n, C, H*W]
        sums[start:stop, 0] = part.sum(axis=2)
        sums[start:stop, 1] = np.square(part).sum(axis=2)

    # Pillow releases the GIL while it decodes, so threads share the cores
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    pool = ThreadPoolExecutor(max(1, min(torch.get_num_threads(), cores, 8)))
    try:
        for job in [pool.submit(decode, start) for start in range(0, n, _CHUNK)]:
            job.result()  # re-raises a job's DataError
    finally:
        pool.shutdown(cancel_futures=True)  # after an error, decode no further chunk
    return images, sums


def _decode_one(path: Path, channels: int, size: tuple[int, int], resize: bool, size_hint: str) -> np.ndarray:
    """One image file as uint8 ``[C, H, W]``."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert("L" if channels == 1 else "RGB")  # decodes: a damaged file fails here
            if (img.height, img.width) != size:
                if not resize:
                    raise DataError(f"{path}: {img.height}x{img.width} pixels, expected {size[0]}x{size[1]}{size_hint}")
                img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            arr = np.asarray(img)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: not a readable image ({exc})") from None
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)


def _read_cache(path: Path, n: int) -> dict[str, np.ndarray] | None:
    """The cached arrays at ``path``, or None when absent or unreadable (then decoded again)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in ("images", "pixel_sums")}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        log.warning("%s: unreadable image cache (%s); decoding again", path, exc)
        return None
    if len(arrays["images"]) != n or len(arrays["pixel_sums"]) != n:
        log.warning("%s: image cache holds %d images, the folder %d; decoding again", path, len(arrays["images"]), n)
        return None
    return arrays


def _write_cache(path: Path, stem: str, **arrays: np.ndarray) -> None:
    """Write ``arrays`` to ``path`` atomically (a temporary file renamed), then remove
    this folder's older cache files (same ``stem``, another key)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # the umask applies; a failed write leaves no file
        np.savez(f, **arrays)
    for old in path.parent.iterdir():
        if old.name.startswith(f"{stem}-") and old.suffix == ".npz" and old != path:
            old.unlink(missing_ok=True)
    log.info("cached the decoded images in %s", path)
