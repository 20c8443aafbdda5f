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
from cascade.evaluation import Variant, cascade_sweep, operating_points, select_by_accuracy
from cascade.router import ScoredStage
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
    assert len(selections) == 4 and all(s.feasible and 0 <= s.threshold <= 1.0001 for s in selections)
    # a looser target never needs a higher threshold
    assert all(a.threshold >= b.threshold for a, b in zip(selections, selections[1:]))


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


def test_little_alone(benchmark, mnist_nets):
    little, _, x = mnist_nets
    with torch.no_grad():
        benchmark(lambda: little(x))


def test_big_alone(benchmark, mnist_nets):
    _, big, x = mnist_nets
    with torch.no_grad():
        benchmark(lambda: big(x))


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
