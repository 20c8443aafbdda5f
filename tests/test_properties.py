"""Property tests (hypothesis) of the evaluator's invariants on random per-sample arrays."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from cascade import apply_threshold, select_threshold, sweep


@st.composite
def split(draw):
    n = draw(st.integers(1, 60))
    # few distinct values, so ties are common
    score = np.array(draw(st.lists(st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.5, 0.75, 0.9, 1.0]), min_size=n, max_size=n)))
    little = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    big = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    return score, little, big


@settings(max_examples=200, deadline=None)
@given(split(), st.lists(st.floats(-0.1, 1.1), min_size=2, max_size=6))
def test_skipping_rate_falls_as_threshold_rises(data, thresholds):
    score, little, big = data
    srs = [apply_threshold(t, score, little, big, 1.0, 10.0).skipping_rate for t in sorted(thresholds)]
    assert all(a >= b for a, b in zip(srs, srs[1:]))


@settings(max_examples=200, deadline=None)
@given(split())
def test_nothing_kept_means_no_degradation(data):
    score, little, big = data
    sw = sweep(score, little, big)
    op = apply_threshold(float(sw.threshold[0]), score, little, big, 1.0, 10.0)
    assert op.skipping_rate == 0.0 and op.ad == 0.0 and op.cost_mflops == 11.0


@settings(max_examples=200, deadline=None)
@given(split(), st.floats(-0.1, 1.1), st.floats(0.001, 100), st.floats(0.0, 1000))
def test_cost_between_c0_and_c0_plus_c1(data, threshold, c0, c1):
    score, little, big = data
    cost = apply_threshold(threshold, score, little, big, c0, c1).cost_mflops
    assert c0 - 1e-9 <= cost <= c0 + c1 + 1e-9


@settings(max_examples=300, deadline=None)
@given(split(), st.sampled_from([0.0, 0.001, 0.005, 0.01, 0.05, 0.1, 0.3]), st.booleans())
def test_operating_point_meets_its_target_on_its_own_split(data, target, black_box):
    score, little, big = data
    if black_box:
        big = np.ones_like(big)
    thr = select_threshold(sweep(score, little, big), target)
    op = apply_threshold(thr, score, little, big, 1.0, 10.0)
    assert op.ad <= target + 1e-12
    # and it is the most that can be kept: lowering to the next distinct score breaks the target
    lower = score[score < thr]
    if lower.size:
        worse = apply_threshold(float(lower.max()), score, little, big, 1.0, 10.0)
        assert worse.ad > target + 1e-12
