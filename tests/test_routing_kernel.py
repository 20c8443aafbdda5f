"""The routing rule exists once: the torch kernel that :class:`cascade.Router` and
:class:`cascade.Bundle` route with gives the exit stages of the evaluation's numpy sweep
(:func:`cascade.evaluation.exit_stages`), on random scores and thresholds, ties at the
threshold included."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cascade.deploy.kernel import route_rows
from cascade.evaluation import exit_stages

#: a few values, so that scores tie with each other and with the threshold
_GRID = [0.0, 0.25, 0.5, 0.5000000001, 0.75, 1.0]
_scores = st.one_of(st.sampled_from(_GRID), st.floats(0.0, 1.0))


@st.composite
def _cases(draw, float32: bool = False):
    n, d = draw(st.integers(0, 12)), draw(st.integers(1, 4))
    scores = np.array(draw(st.lists(st.lists(_scores, min_size=d, max_size=d), min_size=n, max_size=n)),
                      dtype=np.float32 if float32 else np.float64).reshape(n, d)
    flat = scores.ravel().astype(np.float64).tolist()
    # a threshold equal to a score (a tie), one between the grid's values, or an unreachable one
    threshold = draw(st.one_of(st.sampled_from(flat or [0.5]), _scores, st.just(float("inf"))))
    return scores, threshold


def _stages(scores: np.ndarray) -> list:
    """Stage ``k`` of a batch of row indices ``[m, 1]``: (those indices, their column-``k`` score)."""
    table = torch.from_numpy(scores)

    def stage(k: int):
        def run(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            seen.append((k, x[:, 0].tolist()))
            return x, table[x[:, 0], k]

        return run

    seen: list = []
    return [stage(k) for k in range(scores.shape[1])], seen


def _route(scores: np.ndarray, thresholds: list[float]):
    stages, seen = _stages(scores)
    rows = torch.arange(len(scores)).unsqueeze(1)
    return route_rows(rows, stages, thresholds), seen


@settings(max_examples=300, deadline=None)
@given(_cases())
def test_the_kernel_gives_the_sweeps_exit_stages(case):
    scores, threshold = case
    routing, _ = _route(scores, [threshold] * scores.shape[1])
    assert routing.exit_stage.tolist() == exit_stages(scores, threshold).tolist()


@settings(max_examples=200, deadline=None)
@given(_cases(float32=True))
def test_the_kernel_compares_float32_scores_in_float64_as_the_sweep(case):
    scores, threshold = case
    routing, _ = _route(scores, [threshold] * scores.shape[1])
    assert routing.exit_stage.tolist() == exit_stages(scores, threshold).tolist()


@settings(max_examples=200, deadline=None)
@given(_cases(), st.data())
def test_the_kernel_runs_each_stage_on_the_rows_no_earlier_stage_kept(case, data):
    scores, _ = case
    n, d = scores.shape
    thresholds = data.draw(st.lists(_scores, min_size=d, max_size=d))
    routing, seen = _route(scores, thresholds)
    stop = scores >= np.asarray(thresholds)  # [N, K-1], per-stage thresholds
    expected = np.where(stop.any(axis=1), stop.argmax(axis=1), d)
    assert routing.exit_stage.tolist() == expected.tolist()
    for k, rows in seen:  # stage k saw exactly the rows that reached it, and never an empty batch
        assert rows == [i for i in range(n) if expected[i] >= k] and rows
    assert routing.remaining.tolist() == [i for i in range(n) if expected[i] == d]
    for v in routing.visits:
        assert v.stop.tolist() == (expected[v.rows.numpy()] == v.stage).tolist()
        assert v.score.dtype == torch.float64


def test_the_kernel_keeps_a_score_equal_to_its_threshold():
    scores = np.array([[0.5, 0.0], [0.4999, 0.7], [0.1, 0.2]])
    routing, _ = _route(scores, [0.5, 0.7])
    assert routing.exit_stage.tolist() == [0, 1, 2]


def test_a_float32_score_is_compared_with_the_float64_threshold_in_float64():
    scores = np.array([[0.5], [0.75]], dtype=np.float32)
    threshold = 0.5000000001  # float32(threshold) == 0.5: a float32 comparison would keep row 0
    routing, _ = _route(scores, [threshold])
    assert routing.exit_stage.tolist() == exit_stages(scores, threshold).tolist() == [1, 0]
