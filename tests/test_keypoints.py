"""The facial-keypoints case study: Kaggle CSV loader, synthetic faces, masked loss and
RMSE criterion (known answers), the keypoint network, and the two regression baselines."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cascade import (
    CascadeError,
    DataError,
    FeatureNet,
    MaskedL2TaskLoss,
    MethodContext,
    StageOutput,
    TaskKind,
    Trainer,
)
from cascade.cli import main
from cascade.nn.cost import measure_cost
from cascade.methods import MethodKind, build_methods
from tasks.faces import IMAGE_COLUMN, KEYPOINT_COLUMNS, KEYPOINT_NAMES, generate_faces, write_faces_csv
from tasks.keypoints import KeypointTask, build_keypoint_cnn, read_keypoints_csv
from baselines.regression import ErrorHeadScore, McDropoutScore
from tests.conftest import REPO

PIXELS = 96 * 96


def _row(value: int, coords: list, image: str | None = None) -> dict:
    row = dict(zip(KEYPOINT_COLUMNS, coords))
    row[IMAGE_COLUMN] = image if image is not None else " ".join([str(value)] * PIXELS)
    return row


@pytest.fixture
def small_csv(tmp_path):
    """Four rows (file lines 2-5): complete, two keypoints missing, malformed (9215 pixels), complete."""
    full = [float(10 + i) for i in range(30)]
    partial = list(full)
    partial[0] = partial[1] = partial[28] = partial[29] = None  # left eye centre and bottom lip missing
    rows = [
        _row(7, full),
        _row(8, partial),
        _row(9, full, image=" ".join(["9"] * (PIXELS - 1))),
        _row(255, [c + 1 for c in full]),
    ]
    path = tmp_path / "training.csv"
    pd.DataFrame(rows, columns=[*KEYPOINT_COLUMNS, IMAGE_COLUMN]).to_csv(path, index=False, na_rep="")
    return path


# ----------------------------------------------------------------------------- the loader


def test_loader_error_names_the_file_and_line(small_csv):
    with pytest.raises(DataError, match=r"training\.csv: line 4: Image has 9215 values, expected 9216") as exc:
        read_keypoints_csv(small_csv)
    assert "\n" not in str(exc.value)


def test_loader_skips_and_counts_malformed_rows_and_keeps_missing_values(small_csv):
    data = read_keypoints_csv(small_csv, on_malformed="skip")
    assert data.skipped == [4]
    assert data.lines.tolist() == [2, 3, 5]
    assert data.images.shape == (3, 96, 96) and data.keypoints.shape == (3, 30)
    # grey levels as written; row-major 96x96
    assert data.images[0, 0, 0] == 7 and data.images[2, 95, 95] == 255
    # missing coordinates are kept as NaN, the row is kept
    assert np.isnan(data.keypoints[1, [0, 1, 28, 29]]).all()
    assert np.isfinite(np.delete(data.keypoints[1], [0, 1, 28, 29])).all()
    assert data.keypoints[0, 0] == 10.0 and data.keypoints[2, 29] == 40.0
    assert data.complete.tolist() == [True, False, True]


def test_loader_rejects_non_numeric_values(tmp_path):
    full = [1.0] * 30
    path = tmp_path / "bad.csv"
    image = " ".join(["3"] * (PIXELS - 1) + ["x7"])
    pd.DataFrame([_row(1, full), _row(2, full, image=image)]).to_csv(path, index=False)
    with pytest.raises(DataError, match=r"bad\.csv: line 3: Image has a non-numeric value 'x7'"):
        read_keypoints_csv(path)
    coords = list(full)
    coords[4] = "abc"
    pd.DataFrame([_row(1, full), _row(2, coords)]).to_csv(path, index=False)
    with pytest.raises(DataError, match=r"line 3: left_eye_inner_corner_x is not a number: 'abc'"):
        read_keypoints_csv(path)


def test_loader_reports_a_row_with_too_many_fields(tmp_path):
    good = ",".join(["1"] * 30 + [" ".join(["5"] * PIXELS)])
    path = tmp_path / "wide.csv"
    path.write_text(",".join([*KEYPOINT_COLUMNS, IMAGE_COLUMN]) + "\n" + good + "\n" + good + ",9\n" + good + "\n")
    with pytest.raises(DataError, match=r"wide\.csv: malformed CSV: .*line 3"):
        read_keypoints_csv(path)
    data = read_keypoints_csv(path, on_malformed="skip")
    assert data.skipped == [3] and data.lines.tolist() == [2, 4]


def test_loader_requires_kaggle_columns(tmp_path):
    path = tmp_path / "test.csv"
    pd.DataFrame({"ImageId": [1], IMAGE_COLUMN: [" ".join(["1"] * PIXELS)]}).to_csv(path, index=False)
    with pytest.raises(DataError, match="missing column"):
        read_keypoints_csv(path)
    with pytest.raises(DataError, match="not found"):
        read_keypoints_csv(tmp_path / "nope.csv")


def test_cli_turns_a_malformed_row_into_exit_2_without_traceback(small_csv, tmp_path, capsys):
    code = main(["run", str(REPO / "configs" / "keypoints.yaml"), "--quick", "--out", str(tmp_path / "out"),
                 "--set", f"task.csv={small_csv}"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "line 4" in err and str(small_csv) in err and "Traceback" not in err


# ----------------------------------------------------------------------------- synthetic faces


def test_synthetic_faces_are_fixed_by_the_seed_and_independent_of_the_size():
    # 70 faces span two chunks of 64; the first 20 are the same when only 20 are asked for
    a, b = generate_faces(20, seed=5), generate_faces(70, seed=5)
    assert len(b.images) == 70
    assert np.array_equal(a.images, b.images[:20])
    assert np.array_equal(a.keypoints, b.keypoints[:20], equal_nan=True)
    c = generate_faces(20, seed=6)
    assert not np.array_equal(a.images, c.images)


def test_synthetic_faces_keypoints_lie_in_the_image_where_drawn():
    faces = generate_faces(200, seed=1, partial_fraction=0.25)
    kp = faces.keypoints
    assert faces.images.shape == (200, 96, 96) and faces.images.dtype == np.uint8
    assert np.nanmin(kp) >= 0 and np.nanmax(kp) <= 95
    # partial rows keep exactly Kaggle's 4-keypoint subset (8 coordinates)
    n_labelled = (~np.isnan(kp)).sum(axis=1)
    assert set(n_labelled.tolist()) == {8, 30} and 20 < (n_labelled == 8).sum() < 80
    # the pupil is drawn at the eye centre: darker than the 15x15 patch around it (easy faces)
    easy = np.flatnonzero(faces.difficulty < 0.1)
    assert len(easy) > 20
    for i in easy:
        for name in ("left_eye_center", "right_eye_center"):
            j = KEYPOINT_NAMES.index(name)
            if np.isnan(kp[i, 2 * j]):
                continue
            x, y = np.rint(kp[i, 2 * j:2 * j + 2]).astype(int)
            assert faces.images[i, y, x] < faces.images[i, y - 7:y + 8, x - 7:x + 8].mean()
    # a spread of difficulty: most faces easy, some hard
    assert np.mean(faces.difficulty < 0.3) > 0.5 and np.mean(faces.difficulty > 0.6) > 0.05


def test_synthetic_csv_round_trips_through_the_loader(tmp_path):
    path = write_faces_csv(tmp_path / "faces.csv", 40, seed=2)
    faces, data = generate_faces(40, seed=2), read_keypoints_csv(path)
    assert np.array_equal(data.images, faces.images.astype(np.float32))
    np.testing.assert_allclose(data.keypoints, faces.keypoints, atol=5e-5)  # written with 4 decimals
    assert np.array_equal(np.isnan(data.keypoints), np.isnan(faces.keypoints))


# ----------------------------------------------------------------------------- loss and criterion


def test_masked_l2_and_rmse_known_answers():
    crit = MaskedL2TaskLoss(threshold=4.0, scale=2.0)
    nan = float("nan")
    output = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    target = torch.tensor([[1.0, nan, 5.0, 0.0], [nan, nan, nan, nan], [2.0, 2.0, 2.0, 2.0]])
    # row 0: observed coords 0, 2, 3 -> squared errors 0, 4, 16 -> loss 20 / 3;
    #        rmse = sqrt(20 / 3) * scale 2 = 5.1640 px >= 4 -> wrong
    # row 1: nothing labelled -> loss 0, rmse 0, correct (no evidence against it)
    # row 2: all four errors 1 -> loss 1, rmse 1 * 2 = 2 px < 4 -> correct
    torch.testing.assert_close(crit.per_sample(output, target), torch.tensor([20 / 3, 0.0, 1.0]))
    torch.testing.assert_close(crit.rmse(output, target), torch.tensor([2 * math.sqrt(20 / 3), 0.0, 2.0]))
    assert crit.correct(output, target).tolist() == [False, True, True]
    torch.testing.assert_close(crit.errors(output, target)["rmse"], crit.rmse(output, target))


def test_keypoint_task_is_regression_with_a_black_box_oracle_of_unknown_cost():
    task = KeypointTask()
    assert isinstance(task.criterion, MaskedL2TaskLoss) and task.criterion.kind == TaskKind.REGRESSION
    assert task.input_shape == (1, 96, 96) and task.num_outputs == 30
    # App. D: no big network; the oracle answers the truth and its cost is not known
    assert task.default_big is None and task.oracle_mflops is None
    # a config listing no methods gets the regression defaults: AppealNet, then the error head
    defaults = build_methods(None, task.criterion.kind)
    assert [(m.label, m.kind) for m in defaults] == [("appealnet", MethodKind.TRAINED),
                                                     ("error_head", MethodKind.POST_HOC)]
    assert all(task.criterion.kind in m.cls.task_kinds for m in defaults)


def test_keypoint_task_criterion_is_4_pixels_on_normalized_targets():
    crit = KeypointTask().criterion
    y = torch.zeros(2, 30)
    # normalized targets (c - 48) / 48: an error of e pixels on every coordinate is
    # e / 48 after normalization, and its RMSE is back to e pixels
    out = torch.stack([torch.full((30,), 3.9 / 48), torch.full((30,), 4.0 / 48)])
    torch.testing.assert_close(crit.rmse(out, y), torch.tensor([3.9, 4.0]))
    assert crit.correct(out, y).tolist() == [True, False]  # "< 4 px", strictly


# ----------------------------------------------------------------------------- the task


def test_task_splits_normalize_and_keep_missing_targets(tmp_path):
    opts = KeypointTask.Options.model_validate(
        {"data_root": str(tmp_path), "synthetic": {"size": 150, "partial_fraction": 0.5},
         "cal_fraction": 0.2, "test_fraction": 0.2}
    )
    task = KeypointTask(opts)
    s0, again, other = task.build_splits(0), KeypointTask(opts).build_splits(0), task.build_splits(1)
    assert [len(s0.train), len(s0.cal), len(s0.test)] == [90, 30, 30]
    # fixed by the seed, and the same from a second call on the same task (its cached data unchanged)
    assert torch.equal(s0.test.tensors[0], again.test.tensors[0])
    assert torch.equal(task.build_splits(0).test.tensors[0], s0.test.tensors[0])
    assert not torch.equal(other.test.tensors[0], s0.test.tensors[0])
    x, y = s0.train.tensors
    assert x.shape == (90, 1, 96, 96) and 0 <= x.min() and x.max() <= 1
    assert y.shape == (90, 30) and torch.isnan(y).any()
    assert y[~torch.isnan(y)].abs().max() <= 1
    # the synthetic file is cached under the data root and not rewritten
    (csv,) = (tmp_path / "synthetic_faces").glob("*.csv")
    mtime = csv.stat().st_mtime_ns
    KeypointTask(opts).build_splits(1)
    assert csv.stat().st_mtime_ns == mtime
    complete = KeypointTask(opts.model_copy(update={"complete_only": True})).build_splits(0)
    assert not torch.isnan(complete.train.tensors[1]).any()


def test_task_reads_a_relative_csv_under_the_data_root(small_csv, tmp_path):
    task = KeypointTask(KeypointTask.Options(csv="training.csv", data_root=str(tmp_path), on_malformed="skip",
                                             cal_fraction=0.34, test_fraction=0.34))
    assert len(task.load().images) == 3
    missing = KeypointTask(KeypointTask.Options(csv="kaggle/training.csv", data_root=str(tmp_path)))
    with pytest.raises(DataError, match=r"kaggle/training\.csv: keypoints file not found; get training\.csv"):
        missing.build_splits(0)


def test_keypoint_cnn_contract():
    torch.manual_seed(0)
    net = build_keypoint_cnn((1, 96, 96), 30)
    out = net(torch.rand(3, 1, 96, 96))
    assert out.output.shape == (3, 30) and out.features.shape == (3, net.feature_dim)
    out.output.sum().backward()
    assert all(p.grad is not None for p in net.parameters())
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert len(convs) == 3 and len(linears) == 2  # App. D: 3 conv + 2 fully-connected layers
    assert measure_cost(net, (1, 96, 96)).mflops < 10


# ----------------------------------------------------------------------------- baselines


def test_mc_dropout_score_known_answer():
    method = McDropoutScore()
    # two passes, one input, two outputs: (0, 0) and (2, 4). Unbiased variance across the
    # passes: coord 1 (0-1)^2 + (2-1)^2 = 2, coord 2 (0-2)^2 + (4-2)^2 = 8; mean 5;
    # spread sqrt(5) = 2.2361; score 1 / (1 + 2.2361) = 0.30902
    samples = torch.tensor([[[0.0, 0.0]], [[2.0, 4.0]]])
    torch.testing.assert_close(method.score(StageOutput(output=samples)), torch.tensor([1 / (1 + math.sqrt(5))]),
                               check_dtype=False)


def test_mc_dropout_samples_dropout_and_leaves_the_network_in_eval():
    torch.manual_seed(0)
    net = build_keypoint_cnn((1, 96, 96), 30, dropout=0.3).eval()
    scores = McDropoutScore().score_batch(net, torch.rand(4, 1, 96, 96))
    assert scores.shape == (4,) and ((scores > 0) & (scores < 1)).all()
    assert not any(m.training for m in net.modules())
    deterministic = build_keypoint_cnn((1, 96, 96), 30, dropout=0.0)
    ctx = MethodContext(task=KeypointTask(), train=None, seed=0, device=torch.device("cpu"), fit=None)
    with pytest.raises(CascadeError, match=r"mc_dropout needs stage networks with dropout \(e\.g\. little: "):
        McDropoutScore().prepare(deterministic, ctx)


def _fit(model, objective, data, oc, desc):
    opt = torch.optim.Adam(model.parameters(), lr=oc.lr)
    loader = DataLoader(data, batch_size=oc.batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))
    Trainer(model, objective, opt, loader, oc.epochs).train()


def test_error_head_learns_which_inputs_the_frozen_network_gets_wrong():
    # a frozen "network" that always answers 0; the targets are 0 where the input's first
    # value is 0 and 3 where it is 1, so the loss is 0 or 9 and the flag predicts it
    torch.manual_seed(0)
    net = FeatureNet(nn.Identity(), nn.Linear(2, 2), 2)
    nn.init.zeros_(net.head.weight), nn.init.zeros_(net.head.bias)
    flag = (torch.arange(200) % 2).float()
    x = torch.stack([flag, torch.rand(200)], dim=1)
    y = 3 * flag[:, None].repeat(1, 2)
    y[::10, 1] = float("nan")  # a missing target on some rows
    y[4] = float("nan")  # and one row with nothing labelled, left out of the fit
    ctx = MethodContext(task=KeypointTask(), train=TensorDataset(x, y), seed=0, device=torch.device("cpu"), fit=_fit)
    method = ErrorHeadScore()
    method.prepare(net, ctx)
    scores = method.score_batch(net, x)
    assert scores.shape == (200,) and ((scores >= 0) & (scores <= 1)).all()
    assert scores[flag == 0].min() > scores[flag == 1].max()
    assert not any(p.requires_grad for p in method.regressor.parameters())
