"""Prints routed inference's measured speed-up next to the ideal one, on MNIST-sized
networks (the mnist config's little MLP and big CNN), batch 512, 2 threads. The router
is the two-stage cascade: the little MLP scored by its max softmax probability
(``ScoredStage``, one forward pass), then the big CNN on the rows it does not keep.

    python benchmarks/router_speedup.py [--repeat 20]

Each time is the best of ``--repeat`` runs (fewer: quicker, noisier).
"""

import argparse
import time

import torch

from baselines.confidence import MaxSoftmaxScore
from cascade import Router
from cascade.router import ScoredStage
from tasks.networks import build_cnn, build_mlp


def best_time(fn, repeat: int = 20) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20, help="runs per timing; the best is kept (default 20)")
    repeat = max(1, parser.parse_args().repeat)
    torch.set_num_threads(2)
    torch.manual_seed(0)
    little = build_mlp((1, 28, 28), 10, hidden=[64]).eval()
    big = build_cnn((1, 28, 28), 10, channels=[32, 64], hidden=128).eval()
    x = torch.randn(512, 1, 28, 28)
    with torch.no_grad():
        t_little = best_time(lambda: little(x), repeat)
        t_big = best_time(lambda: big(x), repeat)
        msp = MaxSoftmaxScore().score(little(x)).double()
        print(f"little {t_little * 1e3:.2f} ms, big {t_big * 1e3:.2f} ms per batch of 512")
        print("| appeal rate | routed (ms) | speed-up | ideal | measured / ideal |\n|---:|---:|---:|---:|---:|")
        for ar in (0.02, 0.05, 0.1, 0.2, 0.5):
            router = Router([ScoredStage(little, MaxSoftmaxScore())], float(torch.quantile(msp, ar)), big)
            assert abs(router(x).appeal_rate - ar) < 0.01
            t = best_time(lambda: router(x), repeat)
            ideal = t_big / (t_little + ar * t_big)
            print(f"| {ar:.2f} | {t * 1e3:.2f} | {t_big / t:.2f}x | {ideal:.2f}x | {t_big / t / ideal:.2f} |")


if __name__ == "__main__":
    main()
