"""Property tests (hypothesis) of the evaluator's invariants, through its entry point.

tests/test_properties.py checks item 6 of issue 5 on the threshold functions with a few
distinct scores; this checks the same invariants on what ``operating_points`` reports
from a random per-sample table (continuous scores with ties, several seeds, both modes
and both threshold sources), as ``cascade run`` computes them.
"""

import numpy as np
import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from cascade.evaluator import Route, operating_points

C0, C1 = 2.0, 30.0
TARGETS = [0.0, 0.001, 0.01, 0.05, 0.2]


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
                "seed": seed, "split": split, "index": np.arange(n), "score": score,
                "little_correct": rng.random(n) < draw(st.floats(0, 1)),
                "big_correct": rng.random(n) < draw(st.floats(0, 1)),
            }))
    return pd.concat(frames, ignore_index=True)


@settings(max_examples=60, deadline=None)
@given(samples_table())
def test_reported_operating_points_keep_their_invariants(samples):
    routes = {
        ("white_box", "m"): Route("score", "little_correct", "big_correct", C0, C1),
        ("black_box", "m"): Route("score", "little_correct", None, C0, C1),
    }
    points = operating_points(samples, routes, {"white_box": TARGETS, "black_box": TARGETS})
    assert len(points) == samples["seed"].nunique() * 2 * 2 * len(TARGETS)
    # cost between the little network alone and both networks on every input
    assert ((points["cost_mflops"] >= C0 - 1e-9) & (points["cost_mflops"] <= C0 + C1 + 1e-9)).all()
    # read off the test split and applied to it: the target holds
    test_tuned = points[points["threshold_source"] == "test"]
    assert (test_tuned["ad"] <= test_tuned["target_ad"] + 1e-12).all()
    # white-box, nothing kept on the little network: the system is the big one, AD exactly 0
    white = points[(points["mode"] == "white_box") & (points["skipping_rate"] == 0)]
    assert (white["ad"] == 0).all()
    # a looser target never keeps fewer inputs on the little network (same split, same seed)
    for _, group in test_tuned.groupby(["seed", "mode"]):
        sr = group.sort_values("target_ad")["skipping_rate"].to_numpy()
        assert (np.diff(sr) >= 0).all()
