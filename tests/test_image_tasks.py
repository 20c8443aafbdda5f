"""Image tasks: batched augmentation (known answers), the decode-once image cache, the
cifar10 and image_folder tasks on tiny trees written here, their one-line errors, and a
tiny end-to-end run."""

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

import tasks.images as images_mod
from cascade import DataError, Task, TaskOptions
from cascade.training.augment import random_crop_flip
from tasks.cifar10 import CLASSES, Cifar10Options, Cifar10Task
from tasks.image_folder import SPLIT_SEED, ImageFolderOptions, ImageFolderTask
from tasks.images import list_images, load_images
from tests.conftest import run_quick

SMALL = ("cat", "dog", "frog")


def write_tree(folder: Path, classes=SMALL, n: int = 6, size=(32, 32), fmt: str = "PNG", seed: int = 0,
               mode: str = "RGB") -> dict[str, np.ndarray]:
    """``folder/<class>/<i>.<ext>`` images of random pixels; their pixels by relative path."""
    rng = np.random.default_rng(seed)
    ext = {"PNG": "png", "JPEG": "jpg"}[fmt]
    pixels = {}
    for c in classes:
        (folder / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            shape = (*size, 3) if mode == "RGB" else size
            arr = rng.integers(0, 256, shape, dtype=np.uint8)
            Image.fromarray(arr, mode).save(folder / c / f"{i:03d}.{ext}", fmt)
            pixels[f"{c}/{i:03d}.{ext}"] = arr
    return pixels


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A private cache folder, also as $CASCADE_CACHE (never the user's own cache)."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("CASCADE_CACHE", str(folder))
    return folder


@pytest.fixture
def decode_calls(monkeypatch) -> list[Path]:
    """Every image file the cache decodes."""
    calls: list[Path] = []
    real = images_mod._decode_one

    def counting(path, *args):
        calls.append(path)
        return real(path, *args)

    monkeypatch.setattr(images_mod, "_decode_one", counting)
    return calls


# -- augmentation ------------------------------------------------------------------------


def test_random_crop_flip_known_answer():
    x = torch.arange(18, dtype=torch.float32).reshape(2, 1, 3, 3)
    torch.manual_seed(0)  # draws offsets dy = [2, 0], dx = [2, 0], then flips [True, False]
    out = random_crop_flip(x, padding=1)
    # image 0: rows 2-4, columns 2-4 of the zero-padded image, mirrored
    assert out[0, 0].tolist() == [[0, 5, 4], [0, 8, 7], [0, 0, 0]]
    # image 1: rows 0-2, columns 0-2 (the top-left corner), not mirrored
    assert out[1, 0].tolist() == [[0, 0, 0], [0, 9, 10], [0, 12, 13]]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_crop_flip_equals_padded_window(seed):
    x = torch.randn(64, 3, 8, 6)
    torch.manual_seed(seed)
    out = random_crop_flip(x, padding=2)
    torch.manual_seed(seed)  # the documented draws: offsets [2, B] (rows, then columns), then flips
    dy, dx = torch.randint(0, 5, (2, 64))
    flips = torch.rand(64) < 0.5
    padded = F.pad(x, (2, 2, 2, 2))
    for b in range(64):
        window = padded[b, :, dy[b]:dy[b] + 8, dx[b]:dx[b] + 6]
        assert torch.equal(out[b], window.flip(2) if flips[b] else window)
    assert 10 < int(flips.sum()) < 54  # both branches exercised


def test_random_flip_only_and_padding_is_zeros():
    x = torch.randn(64, 2, 5, 7)
    torch.manual_seed(3)
    out = random_crop_flip(x, padding=0)
    same = [torch.equal(o, i) for o, i in zip(out, x)]
    mirrored = [torch.equal(o, torch.flip(i, [2])) for o, i in zip(out, x)]
    assert all(s or m for s, m in zip(same, mirrored)) and any(same) and any(mirrored)
    # crop of an all-ones batch: zeros only where the window leaves the image, ones in a rectangle
    ones = random_crop_flip(torch.ones(128, 1, 32, 32), padding=4)
    assert set(ones.unique().tolist()) <= {0.0, 1.0}
    rows, cols = (ones[:, 0].amax(dim=2) > 0).sum(1), (ones[:, 0].amax(dim=1) > 0).sum(1)
    assert torch.equal(ones.sum(dim=(1, 2, 3)), (rows * cols).float())
    assert rows.min() >= 28 and cols.min() >= 28 and (rows < 32).any() and (ones == 1).all(dim=(1, 2, 3)).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.uint8])
def test_random_crop_flip_keeps_shape_dtype_device_and_uses_global_generator(dtype):
    x = torch.arange(4 * 3 * 6 * 6).reshape(4, 3, 6, 6).to(dtype)
    torch.manual_seed(5)
    a = random_crop_flip(x)
    state = torch.get_rng_state()
    torch.manual_seed(5)
    b = random_crop_flip(x)
    assert a.shape == x.shape and a.dtype == dtype and a.device == x.device and torch.equal(a, b)
    torch.manual_seed(5)
    torch.randint(0, 9, (2, 4)), torch.rand(4)  # the draws it makes, and no others
    assert torch.equal(state, torch.get_rng_state())
    assert random_crop_flip(x[:0]).shape == (0, 3, 6, 6)
    with pytest.raises(ValueError):
        random_crop_flip(x[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_random_crop_flip_on_gpu_matches_cpu():
    x = torch.randn(16, 3, 32, 32)
    torch.manual_seed(0)
    cpu = random_crop_flip(x)
    torch.manual_seed(0)
    gpu = random_crop_flip(x.cuda())
    assert gpu.device.type == "cuda" and torch.equal(gpu.cpu(), cpu)


def test_task_augment_default_and_augments_flag(tmp_path, cache):
    class Plain(Task):
        input_shape, num_outputs = (1, 2, 2), 2

        def build_splits(self, seed):  # pragma: no cover - not called
            raise NotImplementedError

    x = torch.randn(2, 1, 2, 2)
    assert Plain(TaskOptions()).augment(x) is x and not Plain(TaskOptions()).augments
    assert Cifar10Task().augments
    write_tree(tmp_path / "imgs", n=3)
    assert not ImageFolderTask(ImageFolderOptions(root=str(tmp_path / "imgs"), test_fraction=0.34)).augments
    task = ImageFolderTask(ImageFolderOptions(root=str(tmp_path / "imgs"), test_fraction=0.34, augment="flip"))
    torch.manual_seed(0)
    out = task.augment(x)
    assert task.augments and all(torch.equal(o, i) or torch.equal(o, i.flip(2)) for o, i in zip(out, x))


# -- the image cache ---------------------------------------------------------------------


def test_load_images_decodes_pixels_labels_and_stats(tmp_path, cache):
    pixels = write_tree(tmp_path / "imgs", n=4, size=(5, 7))
    got = load_images(tmp_path / "imgs", cache, size=(5, 7))
    listing = list_images(tmp_path / "imgs")
    assert got.classes == SMALL and got.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    expected = np.stack([pixels[f].transpose(2, 0, 1) for f in listing.files])
    assert got.images.dtype == np.uint8 and np.array_equal(got.images, expected)  # PNG: lossless
    mean, std = got.channel_stats()
    scaled = expected / 255.0
    assert mean == pytest.approx(scaled.mean(axis=(0, 2, 3)), abs=1e-4)
    assert std == pytest.approx(scaled.std(axis=(0, 2, 3)), abs=1e-4)
    sub = np.array([1, 5, 9])
    assert got.channel_stats(sub)[0] == pytest.approx(scaled[sub].mean(axis=(0, 2, 3)), abs=1e-4)
    grey = load_images(tmp_path / "imgs", cache, size=(5, 7), channels=1)
    assert grey.images.shape == (12, 1, 5, 7)


def test_cache_written_once_reused_and_replaced_when_a_file_changes(tmp_path, cache, decode_calls):
    write_tree(tmp_path / "imgs")
    first = load_images(tmp_path / "imgs", cache, size=(32, 32))
    assert len(decode_calls) == 18
    files = list((cache / "images").iterdir())
    assert len(files) == 1 and files[0].suffix == ".npz"  # written atomically: no temporary file left
    again = load_images(tmp_path / "imgs", cache, size=(32, 32))
    assert len(decode_calls) == 18 and np.array_equal(again.images, first.images)  # from the cache
    # another file content (new size and time) is another key: decoded again, the old file replaced
    changed = tmp_path / "imgs" / "dog" / "002.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(changed)
    os.utime(changed, ns=(1_000_000_000, 1_000_000_000))
    updated = load_images(tmp_path / "imgs", cache, size=(32, 32))
    assert len(decode_calls) == 36 and not updated.images[8].any() and first.images[8].any()
    assert [p.name for p in (cache / "images").iterdir()] != [files[0].name]
    assert len(list((cache / "images").iterdir())) == 1
    # other decoding options are another key (the folder keeps one cache file, the latest)
    load_images(tmp_path / "imgs", cache, size=(32, 32), channels=1)
    [entry] = (cache / "images").iterdir()
    assert len(decode_calls) == 54
    entry.write_bytes(b"not a zip")  # a damaged cache file is decoded again
    load_images(tmp_path / "imgs", cache, size=(32, 32), channels=1)
    assert len(decode_calls) == 72
    entry.write_bytes(entry.read_bytes()[:5000])  # a truncated one too
    load_images(tmp_path / "imgs", cache, size=(32, 32), channels=1)
    assert len(decode_calls) == 90


def test_a_cache_that_cannot_be_written_is_a_warning(tmp_path, caplog):
    write_tree(tmp_path / "imgs", n=2)
    (tmp_path / "file").write_text("not a folder")
    got = load_images(tmp_path / "imgs", tmp_path / "file", size=(32, 32))
    assert got.images.shape == (6, 3, 32, 32) and "could not cache the decoded images" in caplog.text


def test_unreadable_and_truncated_images_name_the_file(tmp_path, cache):
    write_tree(tmp_path / "a", fmt="JPEG")
    bad = tmp_path / "a" / "dog" / "003.jpg"
    bad.write_bytes(b"this is not an image")
    with pytest.raises(DataError) as exc:
        load_images(tmp_path / "a", cache, size=(32, 32))
    assert one_line(exc).startswith(f"{bad}: not a readable image")
    write_tree(tmp_path / "b", fmt="JPEG")
    cut = tmp_path / "b" / "frog" / "001.jpg"
    cut.write_bytes(cut.read_bytes()[:200])
    with pytest.raises(DataError) as exc:
        load_images(tmp_path / "b", cache, size=(32, 32))
    assert one_line(exc).startswith(f"{cut}: not a readable image")
    assert not (cache / "images").exists() or not list((cache / "images").iterdir())  # nothing cached


# -- image_folder ------------------------------------------------------------------------


def test_image_folder_single_folder_splits(tmp_path, cache):
    write_tree(tmp_path / "imgs", n=10, size=(12, 16), fmt="JPEG")
    (tmp_path / "imgs" / "notes.txt").write_text("ignored")
    (tmp_path / "imgs" / "cat" / ".DS_Store").write_bytes(b"\0")
    opts = ImageFolderOptions(root=str(tmp_path / "imgs"), test_fraction=0.2, cal_size=6)
    task = ImageFolderTask(opts)
    assert task.input_shape == (3, 12, 16) and task.num_outputs == 3 and task.output_names == SMALL
    s0, s1 = task.build_splits(0), task.build_splits(1)
    assert (len(s0.train), len(s0.cal), len(s0.test)) == (18, 6, 6)
    for split in (s0.cal, s0.test):  # stratified: 2 of each class
        assert np.bincount(split.tensors[1].numpy(), minlength=3).tolist() == [2, 2, 2]
    assert torch.equal(s0.test.tensors[0], s1.test.tensors[0])  # the test split is the same for every seed
    assert not torch.equal(s0.cal.tensors[0], s1.cal.tensors[0])  # the calibration split follows the seed
    assert s0.train.tensors[0].dtype == torch.float32 and s0.train.tensors[1].dtype == torch.int64
    # normalized by the statistics of the train + calibration images (known: their raw pixels)
    images = load_images(tmp_path / "imgs", cache, size=(12, 16))
    from tasks.data import stratified_split

    pool = np.sort(stratified_split(images.labels, 0.2, SPLIT_SEED, "x")[0])
    raw = images.images[pool] / 255.0
    pre = task.preprocessing
    assert pre.raw_max == 255.0 and pre.mean == pytest.approx(raw.mean(axis=(0, 2, 3)), abs=1e-4)
    assert pre.std == pytest.approx(raw.std(axis=(0, 2, 3)), abs=1e-4)
    pooled = torch.cat([s0.train.tensors[0], s0.cal.tensors[0]])
    assert pooled.mean(dim=(0, 2, 3)).abs().max() < 1e-3 and (pooled.std(dim=(0, 2, 3)) - 1).abs().max() < 1e-2


def test_image_folder_train_test_layout_resize_and_grey(tmp_path, cache):
    write_tree(tmp_path / "d" / "train", n=6, size=(20, 24))
    write_tree(tmp_path / "d" / "test", n=2, size=(40, 30), seed=1)
    opts = ImageFolderOptions(root=str(tmp_path / "d"), size=[16, 18], channels=1, cal_fraction=0.5)
    task = ImageFolderTask(opts)
    assert task.input_shape == (1, 16, 18) and len(task.preprocessing.mean) == 1
    s = task.build_splits(0)
    assert (len(s.train), len(s.cal), len(s.test)) == (9, 9, 6)
    assert s.test.tensors[0].shape == (6, 1, 16, 18)
    assert ImageFolderTask(ImageFolderOptions(root=str(tmp_path / "d"), size=8)).input_shape == (3, 8, 8)


def test_image_folder_errors_are_one_line(tmp_path, cache):
    with pytest.raises(DataError) as exc:
        ImageFolderTask(ImageFolderOptions(root=str(tmp_path / "nope")))
    assert one_line(exc) == f"task.root: {tmp_path / 'nope'}: no such folder"
    write_tree(tmp_path / "flat", n=3)
    with pytest.raises(DataError, match="set test_fraction"):
        ImageFolderTask(ImageFolderOptions(root=str(tmp_path / "flat")))
    # class folders that differ between train/ and test/: both folders named
    write_tree(tmp_path / "m" / "train", classes=("cat", "dog"), n=2)
    write_tree(tmp_path / "m" / "test", classes=("cat", "frog"), n=2)
    with pytest.raises(DataError) as exc:
        ImageFolderTask(ImageFolderOptions(root=str(tmp_path / "m")))
    msg = one_line(exc)
    assert str(tmp_path / "m" / "train") in msg and str(tmp_path / "m" / "test") in msg
    assert "only in train/: dog" in msg and "only in test/: frog" in msg
    with pytest.raises(DataError, match="remove test_fraction"):
        ImageFolderTask(ImageFolderOptions(root=str(tmp_path / "m"), test_fraction=0.2))
    # images of several sizes without task.size
    write_tree(tmp_path / "mixed", n=3)
    odd = tmp_path / "mixed" / "frog" / "001.png"
    Image.fromarray(np.zeros((28, 28, 3), np.uint8)).save(odd)
    task = ImageFolderTask(ImageFolderOptions(root=str(tmp_path / "mixed"), test_fraction=0.34))
    with pytest.raises(DataError) as exc:
        task.build_splits(0)
    assert one_line(exc).startswith(f"{odd}: 28x28 pixels, expected 32x32") and "set task.size" in str(exc.value)
    write_tree(tmp_path / "one", classes=("cat",), n=3)
    with pytest.raises(DataError, match="at least 2"):
        ImageFolderTask(ImageFolderOptions(root=str(tmp_path / "one"), test_fraction=0.3))
    (tmp_path / "flat" / "empty").mkdir()
    with pytest.raises(DataError, match=f"{tmp_path / 'flat' / 'empty'}: no images"):
        ImageFolderTask(ImageFolderOptions(root=str(tmp_path / "flat"), test_fraction=0.3)).build_splits(0)
    with pytest.raises(ValueError, match="not both"):
        ImageFolderOptions(root="x", cal_size=3, cal_fraction=0.1)


# -- cifar10 -----------------------------------------------------------------------------


def test_cifar10_image_folder_copy(tmp_path, cache, decode_calls):
    folder = tmp_path / "data" / "cifar10-jpeg"
    write_tree(folder / "train", classes=CLASSES, n=5, fmt="JPEG")
    write_tree(folder / "test", classes=CLASSES, n=2, fmt="JPEG", seed=1)
    opts = Cifar10Options(data_root=str(tmp_path / "data"), cal_size=10, train_size=20)
    assert Cifar10Task.data_problems(opts, configured_only=True) == []
    task = Cifar10Task(opts)
    s = task.build_splits(0)
    assert (len(s.train), len(s.cal), len(s.test)) == (20, 10, 20) and len(decode_calls) == 70
    assert np.bincount(s.cal.tensors[1].numpy()).tolist() == [1] * 10
    assert s.train.tensors[0].shape[1:] == (3, 32, 32) and task.output_names == CLASSES
    assert not torch.equal(task.build_splits(1).cal.tensors[0], s.cal.tensors[0])
    Cifar10Task(opts).build_splits(0)  # a new task (a new run) reads the cache
    assert len(decode_calls) == 70
    # a copy whose class folders are not CIFAR-10's
    (folder / "train" / "truck").rename(folder / "train" / "lorry")
    (folder / "test" / "truck").rename(folder / "test" / "lorry")
    with pytest.raises(DataError, match="CIFAR-10 needs airplane"):
        Cifar10Task(opts).build_splits(0)


def test_cifar10_missing_folders(tmp_path, monkeypatch):
    opts = Cifar10Options(data_root=str(tmp_path / "nope"))
    assert Cifar10Task.data_problems(opts, True) == [f"data_root: {tmp_path / 'nope'}: no such folder (task.data_root)"]
    (tmp_path / "cifar10-jpeg" / "train").mkdir(parents=True)
    [problem] = Cifar10Task.data_problems(Cifar10Options(data_root=str(tmp_path)), True)
    assert problem.startswith(f"data_root: {tmp_path / 'cifar10-jpeg'}: missing test/ (ImageFolder layout")
    [problem] = Cifar10Task.data_problems(Cifar10Options(data_root=str(tmp_path), format="torchvision"), True)
    assert "cifar-10-batches-py: missing data_batch_1, data_batch_2" in problem
    monkeypatch.delenv("CASCADE_DATA", raising=False)
    assert Cifar10Task.data_problems(Cifar10Options(), configured_only=True) == []  # the default root: run checks it
    with pytest.raises(DataError, match="^cifar10: .*missing test/"):
        Cifar10Task(Cifar10Options(data_root=str(tmp_path))).build_splits(0)


def write_batches(folder: Path, n: int = 20) -> dict[str, tuple[np.ndarray, list[int]]]:
    """torchvision's cifar-10-batches-py files (pickled dicts, protocol 2 as the originals)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, n)]
        labels[:10] = list(range(10))  # every class
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, "data": data, "labels": labels, "filenames": ["x.png"] * n}, f, 2)
        written[name] = data, labels
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": list(CLASSES), "num_vis": 3072}, f, 2)
    return written


def test_cifar10_torchvision_files(tmp_path):
    written = write_batches(tmp_path / "cifar-10-batches-py")
    task = Cifar10Task(Cifar10Options(data_root=str(tmp_path), format="torchvision", cal_size=10))
    assert Cifar10Task.data_problems(task.options, True) == []
    x, y = task._load()["train"]
    data, labels = written["data_batch_3"]
    assert x.shape == (100, 3, 32, 32) and np.array_equal(x[40:60].reshape(20, -1), data)
    assert y[40:60].tolist() == labels
    # row 0's first 1024 values are its red plane, in row-major order
    assert np.array_equal(x[40, 0], data[0, :1024].reshape(32, 32))
    s = task.build_splits(0)
    assert (len(s.train), len(s.cal), len(s.test)) == (90, 10, 20)
    expected = (torch.from_numpy(written["test_batch"][0][0].reshape(3, 32, 32)).float() / 255
                - torch.tensor(task.preprocessing.mean)[:, None, None]) / torch.tensor(task.preprocessing.std)[:, None, None]
    assert torch.allclose(s.test.tensors[0][0], expected, atol=1e-5)


def test_cifar10_torchvision_refuses_code_and_bad_batches(tmp_path):
    write_batches(tmp_path / "cifar-10-batches-py")
    evil = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    evil.write_bytes(pickle.dumps({"data": os.system}, 2))
    opts = Cifar10Options(data_root=str(tmp_path), format="torchvision")
    with pytest.raises(DataError) as exc:
        Cifar10Task(opts).build_splits(0)
    assert one_line(exc).startswith(f"{evil}: not a CIFAR-10 batch file") and "refusing" in str(exc.value)
    with open(evil, "wb") as f:
        pickle.dump({"data": np.zeros((3, 100), np.uint8), "labels": [0, 1, 2]}, f, 2)
    with pytest.raises(DataError, match=r"data_batch_2: 'data' must be uint8 \[N, 3072\]"):
        Cifar10Task(opts).build_splits(0)


# -- through the CLI ---------------------------------------------------------------------


def tiny_config(path: Path, task: dict) -> Path:
    net = {"name": "cnn", "channels": [4], "hidden": 8}
    quick = {"epochs": 1, "batch_size": 16, "lr": 0.01}
    # tiny networks (not the task's CIFAR defaults), one mode: the fixed costs of a run dominate
    cfg = {"name": "tiny_images", "task": task, "seeds": [0], "modes": ["black_box"], "little": net,
           "big": net, "big_train": quick, "pretrain": quick, "finetune": quick, "methods": ["msp"]}
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_cascade_run_on_a_tiny_image_folder(tmp_path, cache, monkeypatch):
    write_tree(tmp_path / "imgs", n=12, size=(16, 16), fmt="JPEG")
    task = {"name": "image_folder", "root": str(tmp_path / "imgs"), "test_fraction": 0.25, "augment": "crop_flip",
            "padding": 2}
    shapes = []
    real = ImageFolderTask.augment

    def augment(self, x):  # the training batches go through the task's augmentation
        shapes.append(tuple(x.shape[1:]))
        return real(self, x)

    monkeypatch.setattr(ImageFolderTask, "augment", augment)
    out = run_quick(tmp_path, tiny_config(tmp_path / "tiny.yaml", task))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "image_folder" and shapes and set(shapes) == {(3, 16, 16)}
    samples = pd.read_csv(out / "samples.csv")
    assert samples["index"].nunique() == 9  # the test split: a quarter of 3 x 12 images


def test_cli_bad_root_is_exit_2_and_one_line(tmp_path, capsys, cache):
    from cascade.cli import main

    config = tiny_config(tmp_path / "bad.yaml", {"name": "image_folder", "root": str(tmp_path / "missing")})
    assert main(["run", str(config), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"task.root: {tmp_path / 'missing'}: no such folder" in err
    config = tiny_config(tmp_path / "c.yaml", {"name": "cifar10", "data_root": str(tmp_path / "missing")})
    assert main(["validate", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{tmp_path / 'missing'}: no such folder" in err
