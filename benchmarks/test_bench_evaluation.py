"""Speed benchmarks (pytest-benchmark): `make bench`. In the plain test run
(`--benchmark-disable`) each body runs once, as a smoke test.

- operating points for a million inputs (DESIGN.md: about a second): the sweep and the
  selection of a two-stage and a four-stage cascade, and ``operating_points`` over a
  million-row per-sample table;
- routed inference vs the ideal speed-up ``t_big / (t_little + AR * t_big)``.
"""

import numpy as np
import pandas as pd
import pytest
import torch

from baselines.confidence import MaxSoftmaxScore
from cascade import Router
from cascade.evaluation import Variant, cascade_point, cascade_sweep, operating_points, select_by_accuracy
from cascade.deploy.router import ScoredStage
from tasks.networks import build_cnn, build_mlp

torch.set_num_threads(2)
N = 1_000_000
TARGETS = (0.0, 0.001, 0.005, 0.01)


@pytest.mark.parametrize("stages", [2, 4])
def test_cascade_sweep_million_inputs(benchmark, stages):
    rng = np.random.default_rng(0)
    scores = rng.random((N, stages - 1)).round(4)  # many ties
    correct = np.concatenate([rng.random((N, stages - 1)) < 0.3 + 0.7 * scores, rng.random((N, 1)) < 0.99], axis=1)
    costs = [1.0 * 4**k for k in range(stages)]
    ref = correct[:, -1].mean()

    def run():
        sw = cascade_sweep(scores, correct, costs)
        return [select_by_accuracy([sw], N * (ref - t)) for t in TARGETS]

    selections = benchmark(run)
    # every threshold's correct count and cost computed another way: input i exits at stage k
    # for thresholds in (max(s_i0..s_i,k-1), max(s_i0..s_ik)] (the last stage: below the
    # first bound), so each (input, stage) adds to one interval of the distinct scores u
    u = np.unique(scores)  # ascending: the candidate thresholds
    m = np.maximum.accumulate(scores, axis=1)
    lower = np.concatenate([np.full((N, 1), -np.inf), m], axis=1)  # [N, K]
    upper = np.concatenate([m, np.full((N, 1), np.inf)], axis=1)
    lo, hi = np.searchsorted(u, lower, side="right"), np.searchsorted(u, upper, side="right")
    cum = np.cumsum(costs)

    def interval_sum(weights: np.ndarray) -> np.ndarray:
        w = np.ascontiguousarray(weights, dtype=np.float64).ravel()
        diff = np.bincount(lo.ravel(), w, len(u) + 1) - np.bincount(hi.ravel(), w, len(u) + 1)
        return np.cumsum(diff)[:-1]  # [len(u)] the total at threshold u[j]

    correct_at = interval_sum(correct.astype(np.float64))
    cost_at = interval_sum(np.broadcast_to(cum, correct.shape))
    for t, s in zip(TARGETS, selections):
        ok = correct_at >= N * (ref - t) - 1e-9
        want_cost = min(cost_at[ok].min(), N * cum[-1]) if ok.any() else N * cum[-1]
        point = cascade_point(s.threshold, scores, correct, costs)
        assert s.feasible and point.cost_mflops * N == pytest.approx(want_cost, rel=1e-12), t
        best = correct_at[ok & (cost_at == want_cost)].max() if (ok & (cost_at == want_cost)).any() else None
        assert best is None or point.system_accuracy * N == best, t


def test_operating_points_million_rows(benchmark):
    rng = np.random.default_rng(1)
    half = N // 2
    score = rng.random(N).round(4)
    samples = pd.DataFrame({
        "seed": 0, "split": np.repeat(["cal", "test"], half), "index": np.tile(np.arange(half), 2),
        "stage0_score_msp": score, "stage0_correct": rng.random(N) < 0.3 + 0.7 * score,
        "big_correct": rng.random(N) < 0.99,
    })
    variants = [Variant("msp", "white_box", "", ("stage0_score_msp",), ("stage0_correct", "big_correct"), (1.0, 10.0)),
                Variant("msp", "black_box", "", ("stage0_score_msp",), ("stage0_correct", None), (1.0, None))]
    rows = benchmark(lambda: operating_points(samples, variants, {"white_box": list(TARGETS),
                                                                   "black_box": list(TARGETS)}))
    assert len(rows) == 2 * 3 * len(TARGETS)  # modes x sources (test, val, guaranteed) x targets
    test_tuned = [r for r in rows if r["threshold_source"] == "test"]
    assert all(r["ad"] <= r["target_ad"] + 1e-12 for r in test_tuned)


@pytest.fixture(scope="module")
def mnist_nets():
    torch.manual_seed(0)
    little = build_mlp((1, 28, 28), 10, hidden=[64]).eval()
    big = build_cnn((1, 28, 28), 10, channels=[32, 64], hidden=128).eval()
    return little, big, torch.randn(512, 1, 28, 28)


@pytest.mark.parametrize("which", [0, 1], ids=["little", "big"])
def test_network_alone(benchmark, mnist_nets, which):
    net, x = mnist_nets[which], mnist_nets[2]
    with torch.no_grad():
        out = benchmark(lambda: net(x)).output
        # what was timed is the network's answer for the batch: row by row it is the same
        rows = torch.cat([net(x[i:i + 1]).output for i in range(4)])
    assert out.shape == (512, 10)
    torch.testing.assert_close(out[:4], rows, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("appeal_rate", [0.05, 0.2])
def test_routed(benchmark, mnist_nets, appeal_rate):
    little, big, x = mnist_nets
    with torch.no_grad():
        msp = MaxSoftmaxScore().score(little(x))
    threshold = float(torch.quantile(msp.double(), appeal_rate))  # appeal the least confident rows
    router = Router([ScoredStage(little, MaxSoftmaxScore())], threshold, big)
    out = benchmark(lambda: router(x))
    assert abs(out.appeal_rate - appeal_rate) < 0.01
    assert not out.output.isnan().any()  # the big network answered every appealed row
