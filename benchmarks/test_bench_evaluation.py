"""Speed benchmarks (pytest-benchmark): `make bench`. In the plain test run
(`--benchmark-disable`) each body runs once, as a smoke test.

- operating points for a million inputs (DESIGN.md: about a second);
- routed inference vs the ideal speed-up ``t_big / (t_little + AR * t_big)``.
"""

import numpy as np
import pytest
import torch

from cascade import Router, select_threshold, sweep
from baselines.confidence import MaxSoftmaxScore
from tasks.networks import build_cnn, build_mlp

torch.set_num_threads(2)


def test_operating_points_million_inputs(benchmark):
    rng = np.random.default_rng(0)
    n = 1_000_000
    score = rng.random(n).round(4)  # many ties
    little = rng.random(n) < 0.3 + 0.7 * score
    big = rng.random(n) < 0.99

    def run():
        sw = sweep(score, little, big)
        return [select_threshold(sw, t) for t in (0.0, 0.001, 0.005, 0.01)]

    thresholds = benchmark(run)
    assert len(thresholds) == 4 and all(0 <= t <= 1.0001 for t in thresholds)


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
    router = Router(little, MaxSoftmaxScore(), threshold, big)
    out = benchmark(lambda: router(x))
    assert abs(1 - out.kept.float().mean().item() - appeal_rate) < 0.01
