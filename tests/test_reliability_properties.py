"""Property tests (hypothesis) of the evaluation's invariants, through its entry point.

tests/test_properties.py checks the invariants on the sweep and selection functions with a
few distinct scores; this checks them on what ``operating_points`` reports from a random
per-sample table (continuous scores with ties, several seeds, both modes, both threshold
sources, budgets), as ``cascade run`` computes them, for a two-stage system (K = 2).
"""

import numpy as np
import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from cascade.evaluation import Variant, aggregate, operating_points

C0, C1 = 2.0, 30.0
TARGETS = [0.0, 0.001, 0.01, 0.05, 0.2]
BUDGETS = [0.1, 0.3, 0.6]
WHITE = Variant("m", "white_box", "", ("stage0_score_m",), ("stage0_correct", "big_correct"), (C0, C1))
BLACK = Variant("m", "black_box", "", ("stage0_score_m",), ("stage0_correct", None), (C0, C1))


@st.composite
def samples_table(draw) -> pd.DataFrame:
    frames = []
    for seed in range(draw(st.integers(1, 2))):
        for split in ("cal", "test"):
            n = draw(st.integers(1, 40))
            rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
            score = rng.random(n)
            if draw(st.booleans()):  # many ties
                score = np.round(score, 1)
            frames.append(pd.DataFrame({
                "seed": seed, "split": split, "index": np.arange(n), "stage0_score_m": score,
                "stage0_correct": rng.random(n) < draw(st.floats(0, 1)),
                "big_correct": rng.random(n) < draw(st.floats(0, 1)),
            }))
    return pd.concat(frames, ignore_index=True)


@settings(max_examples=60, deadline=None)
@given(samples_table())
def test_reported_operating_points_keep_their_invariants(samples):
    rows = operating_points(samples, [WHITE, BLACK], {"white_box": TARGETS, "black_box": TARGETS}, BUDGETS)
    points = pd.DataFrame(rows)
    seeds = samples["seed"].nunique()
    # seeds x modes x (3 sources x targets + 2 sources x budgets)
    assert len(points) == seeds * 2 * (3 * len(TARGETS) + 2 * len(BUDGETS))
    # cost between the little network alone and both networks on every input
    assert ((points["cost_mflops"] >= C0 - 1e-9) & (points["cost_mflops"] <= C0 + C1 + 1e-9)).all()
    assert np.allclose(points["relative_cost"], points["cost_mflops"] / C1)
    assert np.allclose(points["skipping_rate"] + points["appeal_rate"], 1.0)
    target = points[points["selection"] == "target_ad"]
    budget = points[points["selection"] == "budget"]
    # read off the test split and applied to it: the target holds (keeping nothing meets any)
    test_tuned = target[target["threshold_source"] == "test"]
    assert (test_tuned["ad"] <= test_tuned["target_ad"] + 1e-12).all() and test_tuned["feasible"].all()
    # guaranteed: always feasible; a zero target is never certified: everything to the last stage
    guaranteed = target[target["threshold_source"] == "guaranteed"]
    assert guaranteed["feasible"].all() and (guaranteed["delta"] == 0.1).all()
    zero = guaranteed[guaranteed["target_ad"] == 0]
    assert (zero["threshold"] == np.inf).all() and (zero["appeal_rate"] == 1).all() and (zero["ad"] == 0).all()
    # black-box AD is 1 - accuracy
    black = points[points["mode"] == "black_box"]
    assert np.allclose(black["ad"], 1 - black["system_accuracy"])
    # white-box, nothing kept on the little network: the system is the big one, AD exactly 0
    white = points[(points["mode"] == "white_box") & (points["skipping_rate"] == 0)]
    assert (white["ad"] == 0).all()
    # a budget read off the test split is met there (C0 = 2 fits every budget >= 2 / 30)
    test_budget = budget[budget["threshold_source"] == "test"]
    assert (test_budget["cost_mflops"] <= test_budget["target_mflops"] + 1e-9).all() and test_budget["feasible"].all()
    assert np.allclose(test_budget["target_mflops"], test_budget["budget_fraction"] * C1)
    # a looser target never keeps fewer inputs on the little network (same split, same seed),
    # and a larger budget never gives a less accurate point
    for _, group in pd.concat([test_tuned, guaranteed]).groupby(["seed", "mode", "threshold_source"]):
        sr = group.sort_values("target_ad")["skipping_rate"].to_numpy()
        assert (np.diff(sr) >= 0).all()
    for _, group in test_budget.groupby(["seed", "mode"]):
        acc = group.sort_values("budget_fraction")["system_accuracy"].to_numpy()
        assert (np.diff(acc) >= -1e-12).all()
    # the aggregate over seeds is the mean of the per-seed rows
    agg = pd.DataFrame(aggregate(rows))
    assert len(agg) == 2 * (3 * len(TARGETS) + 2 * len(BUDGETS))
    means = points.groupby(["mode", "selection", "threshold_source", "target_ad", "budget_fraction"],
                           dropna=False)["cost_mflops"].mean().reset_index()
    merged = agg.merge(means, on=["mode", "selection", "threshold_source", "target_ad", "budget_fraction"],
                       suffixes=("", "_mean"))
    assert len(merged) == len(agg) and np.allclose(merged["cost_mflops"], merged["cost_mflops_mean"])
