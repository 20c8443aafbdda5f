"""Property tests (hypothesis) of the evaluation's invariants on random per-sample arrays,
and the check that the cascade with K = 2 gives the old two-stage operating points.

Scores are drawn from a few distinct values, so ties are common.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cascade.evaluation import cascade_point, cascade_sweep, exit_stages, select_by_accuracy, select_by_cost

LEVELS = [0.0, 0.1, 0.25, 0.5, 0.5, 0.75, 0.9, 1.0]


@st.composite
def split(draw, stages=st.just(2)):
    """``scores [N, K-1]``, ``correct [N, K]`` bool."""
    k = draw(stages)
    n = draw(st.integers(1, 60))
    scores = np.array(draw(st.lists(st.sampled_from(LEVELS), min_size=n * (k - 1), max_size=n * (k - 1))))
    correct = np.array(draw(st.lists(st.booleans(), min_size=n * k, max_size=n * k)))
    return scores.reshape(n, k - 1), correct.reshape(n, k)


def costs_of(k):
    return st.lists(st.floats(0.001, 100), min_size=k, max_size=k)


@settings(max_examples=200, deadline=None)
@given(split(st.integers(2, 4)), st.lists(st.floats(-0.1, 1.1), min_size=2, max_size=6))
def test_exits_only_move_later_as_the_threshold_rises(data, thresholds):
    scores, correct = data
    taus = [exit_stages(scores, t) for t in sorted(thresholds)]
    assert all((a <= b).all() for a, b in zip(taus, taus[1:]))
    # so the skipping rate (not at the last stage) never rises with the threshold
    k = correct.shape[1]
    srs = [1 - cascade_point(t, scores, correct, [1.0] * k).exit_fractions[-1] for t in sorted(thresholds)]
    assert all(a >= b for a, b in zip(srs, srs[1:]))


@settings(max_examples=200, deadline=None)
@given(split(st.integers(2, 4)), st.data())
def test_nothing_kept_means_no_degradation(data, draw):
    scores, correct = data
    k = correct.shape[1]
    costs = draw.draw(costs_of(k))
    sw = cascade_sweep(scores, correct, costs)
    p = cascade_point(float(sw.threshold[0]), scores, correct, costs)
    assert p.exit_fractions[-1] == 1.0
    assert p.system_accuracy == correct[:, -1].mean()  # AD exactly 0 against the last stage alone
    assert p.cost_mflops == pytest.approx(sum(costs))


@settings(max_examples=200, deadline=None)
@given(split(st.integers(2, 4)), st.floats(-0.1, 1.1), st.data())
def test_cost_between_the_first_stage_and_all_stages(data, threshold, draw):
    scores, correct = data
    costs = draw.draw(costs_of(correct.shape[1]))
    p = cascade_point(threshold, scores, correct, costs)
    assert costs[0] - 1e-9 <= p.cost_mflops <= sum(costs) + 1e-9
    assert sum(p.exit_fractions) == pytest.approx(1.0)


@settings(max_examples=200, deadline=None)
@given(split(st.integers(2, 4)), st.data())
def test_every_swept_point_is_what_its_threshold_gives(data, draw):
    scores, correct = data
    costs = draw.draw(costs_of(correct.shape[1]))
    sw = cascade_sweep(scores, correct, costs)
    assert (np.diff(sw.threshold) < 0).all()  # one point per distinct threshold, most expensive first
    assert (np.diff(sw.total_mflops) <= 1e-9).all()
    for i, t in enumerate(sw.threshold):
        p = cascade_point(t, scores, correct, costs)
        assert sw.system_accuracy[i] == pytest.approx(p.system_accuracy)
        assert sw.cost_mflops[i] == pytest.approx(p.cost_mflops)
        assert (sw.exit_counts[i] / sw.n).tolist() == pytest.approx(p.exit_fractions)


@settings(max_examples=300, deadline=None)
@given(split(), st.sampled_from([0.0, 0.001, 0.005, 0.01, 0.05, 0.1, 0.3]), st.booleans())
def test_operating_point_meets_its_target_on_its_own_split(data, target, black_box):
    scores, correct = data
    if black_box:
        correct[:, 1] = True
    n = len(scores)
    ref = correct[:, 1].mean()
    sel = select_by_accuracy([cascade_sweep(scores, correct, (1.0, 10.0))], n * (ref - target))
    assert sel.feasible  # keeping nothing always meets a non-negative target
    p = cascade_point(sel.threshold, scores, correct, (1.0, 10.0))
    assert ref - p.system_accuracy <= target + 1e-12
    # and it keeps the most it can: lowering to the next distinct score breaks the target
    lower = scores[scores < sel.threshold]
    if lower.size:
        worse = cascade_point(float(lower.max()), scores, correct, (1.0, 10.0))
        assert ref - worse.system_accuracy > target + 1e-12


@settings(max_examples=200, deadline=None)
@given(split(st.integers(2, 4)), st.floats(0.0, 1.0), st.data())
def test_budget_point_fits_and_nothing_fitting_is_more_accurate(data, fraction, draw):
    scores, correct = data
    costs = draw.draw(costs_of(correct.shape[1]))
    budget = fraction * sum(costs)
    sw = cascade_sweep(scores, correct, costs)
    sel = select_by_cost([sw], budget)
    p = cascade_point(sel.threshold, scores, correct, costs)
    fits = sw.cost_mflops <= budget + 1e-9
    assert sel.feasible == bool(fits.any())
    if sel.feasible:
        assert p.cost_mflops <= budget + 1e-9
        assert p.system_accuracy >= sw.system_accuracy[fits].max() - 1e-12
    else:
        assert p.cost_mflops == pytest.approx(sw.cost_mflops.min())


# ---------------------------------------------------------------- K = 2 gives the old operating points
# The two-stage evaluator before the redesign (cascade/thresholds.py, removed), kept here as
# the reference: sort by score descending; keeping the k highest-scoring inputs is a point
# only where the k-th and (k+1)-th scores differ; AD = acc(big) - acc(system); the selected
# threshold keeps the most inputs with AD <= target (in inputs: target * N + 1e-9).


def old_sweep(score, little, big):
    order = np.argsort(-score, kind="stable")
    s = score[order]
    gain = little[order].astype(np.int64) - big[order].astype(np.int64)
    n_big = int(big.sum())
    correct = np.concatenate([[n_big], n_big + np.cumsum(gain)])  # index = number kept
    kept = np.flatnonzero(np.concatenate([[True], s[:-1] > s[1:], [True]]))
    threshold = np.where(kept == 0, np.nextafter(s[0], np.inf), s[np.maximum(kept - 1, 0)])
    return kept, threshold, correct[kept], n_big


def old_select(score, little, big, target):
    kept, threshold, system_correct, n_big = old_sweep(score, little, big)
    ok = (n_big - system_correct) <= target * len(score) + 1e-9
    return float(threshold[np.flatnonzero(ok)[-1]])


def old_apply(threshold, score, little, big, c0, c1):
    keep = score >= threshold
    sr = float(keep.mean())
    acc = float(np.where(keep, little, big).mean())
    return {"skipping_rate": sr, "system_accuracy": acc, "ad": float(big.mean()) - acc, "cost": c0 + (1 - sr) * c1}


def test_two_stage_cascade_gives_the_old_operating_points():
    rng = np.random.default_rng(20240608)
    targets = [0.0, 0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0]
    cases = 3000
    for case in range(cases):
        n = int(rng.integers(1, 50))
        levels = rng.integers(1, 8)  # few distinct values: ties are the rule, not the exception
        score = rng.integers(0, levels, n) / levels if case % 4 else rng.random(n)
        little = rng.random(n) < rng.random()
        big = np.ones(n, bool) if case % 3 == 0 else rng.random(n) < rng.random()  # black-box: always right
        c0, c1 = float(rng.uniform(0.01, 10)), float(rng.uniform(0.01, 100))
        target = float(rng.choice(targets)) if case % 2 else float(rng.uniform(0, 0.3))
        old_thr = old_select(score, little, big, target)
        old = old_apply(old_thr, score, little, big, c0, c1)

        scores, correct = score[:, None], np.stack([little, big], axis=1)
        ref = big.mean()
        sel = select_by_accuracy([cascade_sweep(scores, correct, (c0, c1))], n * (ref - target))
        new = cascade_point(sel.threshold, scores, correct, (c0, c1))
        where = f"case {case}: n={n} target={target} score={score.tolist()} little={little.tolist()} big={big.tolist()}"
        assert sel.feasible, where
        assert sel.threshold == old_thr, where
        assert new.exit_fractions[0] == old["skipping_rate"], where  # both kept / n
        assert new.system_accuracy == pytest.approx(old["system_accuracy"], abs=1e-12), where
        assert ref - new.system_accuracy == pytest.approx(old["ad"], abs=1e-12), where
        assert new.cost_mflops == pytest.approx(old["cost"], rel=1e-12), where
