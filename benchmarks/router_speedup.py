"""Prints routed inference's measured speed-up next to the ideal one, on MNIST-sized
networks (the mnist config's little MLP and big CNN), batch 512, 2 threads.

    python benchmarks/router_speedup.py
"""

import time

import torch

from baselines.confidence import MaxSoftmaxScore
from cascade import Router
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
    torch.set_num_threads(2)
    torch.manual_seed(0)
    little = build_mlp((1, 28, 28), 10, hidden=[64]).eval()
    big = build_cnn((1, 28, 28), 10, channels=[32, 64], hidden=128).eval()
    x = torch.randn(512, 1, 28, 28)
    with torch.no_grad():
        t_little = best_time(lambda: little(x))
        t_big = best_time(lambda: big(x))
        msp = MaxSoftmaxScore().score(little(x)).double()
        print(f"little {t_little * 1e3:.2f} ms, big {t_big * 1e3:.2f} ms per batch of 512")
        print("| appeal rate | routed (ms) | speed-up | ideal | measured / ideal |\n|---:|---:|---:|---:|---:|")
        for ar in (0.02, 0.05, 0.1, 0.2, 0.5):
            router = Router(little, MaxSoftmaxScore(), float(torch.quantile(msp, ar)), big)
            t = best_time(lambda: router(x))
            ideal = t_big / (t_little + ar * t_big)
            print(f"| {ar:.2f} | {t * 1e3:.2f} | {t_big / t:.2f}x | {ideal:.2f}x | {t_big / t / ideal:.2f} |")


if __name__ == "__main__":
    main()
