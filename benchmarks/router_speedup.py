"""Routed inference's measured speed-up next to the ideal ``t_big / (t_little + AR * t_big)``,
for a little network and one or more big ones from the registry (default: the paper's
CIFAR MobileNetV2 little, ResNet-18 and ResNet-101 big), a batch of 256 and appeal rates
(AR) of 5, 10, 15 and 20 %, on the GPU (CUDA events) or the CPU (``perf_counter``).

    python benchmarks/router_speedup.py [--device cuda] [--little mobilenet_v2_cifar]
        [--big resnet18_cifar --big resnet101_cifar] [--batch 256] [--rates 0.05,0.1,0.15,0.2]
        [--repeats 50] [--input 3,32,32] [--classes 10]

On a CPU the defaults take long (ResNet-101 runs a batch of 256 in tens of seconds);
``--little mlp --big cnn --input 1,28,28 --repeats 10`` is the MNIST-sized pair.

The little network's score is its max softmax probability; the threshold is set between
the batch's sorted scores so that exactly round(AR * batch) inputs are appealed. Every
time is the median of ``--repeats`` runs after warm-up (cascade.nn.cost.median_time_ms);
the networks are untrained, which changes nothing about their speed. Three routed paths:

- ``router``: ``cascade.Router`` as deployed: one host sync per routed stage
  (``active[~stop]``, which sizes the next stage's batch); the answered rows are written
  with ``torch.where``.
- ``one-sync``: the mask and the gather of the appealed inputs stay torch ops on the
  device; ``nonzero`` is the one sync left, and it is needed: it sizes the big
  network's batch.
- ``static``: no sync: ``torch.nonzero_static`` fills a fixed-capacity bucket
  (round(AR * batch) rounded up to a multiple of 8, padded with a dummy row); the big
  network runs on the whole bucket and the padding's answers are dropped. A deployment
  would size the bucket from the calibrated appeal rate plus a margin, and send a
  batch's overflow (more appeals than the capacity) through a second pass.

On CUDA the ``syncs`` column counts the synchronizing calls of one routed batch
(``torch.cuda.set_sync_debug_mode``). ``big on AR rows`` is the big network alone on a
batch of the appealed size: the ideal assumes it costs ``AR * t_big``, and small batches
do not (a GPU is under-used by them).
"""

from __future__ import annotations

import argparse
import math
import warnings
from functools import partial

import torch

from baselines.confidence import MaxSoftmaxScore
from cascade import NETWORKS, Router
from cascade.nn.cost import latency_device, median_time_ms
from cascade.core.errors import CascadeError
from cascade.deploy.router import ScoredStage

#: the bucket capacity of the static path is a multiple of this (tensor cores like it)
BUCKET = 8


def one_sync_route(stage: ScoredStage, big: torch.nn.Module, threshold: float, x: torch.Tensor) -> torch.Tensor:
    """Routed outputs ``[B, K]`` with one host sync: the size of the big network's batch."""
    out = stage(x)
    appeal = out.q.double() < threshold  # [B] bool, on the device; as Router: stop where q >= threshold
    idx = appeal.nonzero().squeeze(1)  # the sync: the big network's batch size is data-dependent
    output = out.output.clone()
    if len(idx):
        output.index_copy_(0, idx, big(x[idx]).output.to(output.dtype))
    return output


def static_route(stage: ScoredStage, big: torch.nn.Module, threshold: float, capacity: int,
                 x: torch.Tensor) -> torch.Tensor:
    """Routed outputs ``[B, K]`` without host syncs: the big network runs on a bucket of
    ``capacity`` rows; appeals beyond it keep the little network's answer."""
    n = len(x)
    out = stage(x)
    appeal = out.q.double() < threshold  # [B] bool
    idx = torch.nonzero_static(appeal, size=capacity, fill_value=n).squeeze(1)  # [C], padded with n
    answers = big(x[idx.clamp(max=n - 1)]).output  # [C, K]; the padding runs on row n - 1, wasted work
    output = torch.cat([out.output, out.output.new_empty(1, out.output.shape[1])])  # row n takes the padding
    output.index_copy_(0, idx, answers.to(output.dtype))
    return output[:n]


def count_syncs(fn, device: torch.device) -> int | None:
    """Synchronizing CUDA calls made by ``fn()`` (None off CUDA)."""
    if device.type != "cuda":
        return None
    before = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(before)
    return sum("synchroniz" in str(w.message) for w in caught)


def threshold_for(scores: torch.Tensor, appealed: int) -> float:
    """A threshold with exactly ``appealed`` scores below it (scores distinct)."""
    s = scores.double().sort().values.cpu()
    if appealed <= 0:
        return float(s[0])
    if appealed >= len(s):
        return math.inf
    return float((s[appealed - 1] + s[appealed]) / 2)


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(d) for d in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: integers separated by commas, e.g. 3,32,32") from None
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: every dimension must be positive")
    return shape


def _rates(text: str) -> list[float]:
    try:
        rates = [float(r) for r in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: numbers separated by commas, e.g. 0.05,0.1") from None
    if not all(0 < r <= 1 for r in rates):
        raise argparse.ArgumentTypeError(f"{text!r}: appeal rates are in (0, 1]")
    return rates


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--little", default="mobilenet_v2_cifar", help="the routed network (registry name)")
    parser.add_argument("--big", action="append", help="a big network (repeatable; default resnet18_cifar and "
                        "resnet101_cifar)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda, cuda:N or cpu (default: cuda when there is one)")
    parser.add_argument("--batch", type=int, default=256, help="inputs per routed batch (default 256)")
    parser.add_argument("--rates", type=_rates, default=[0.05, 0.1, 0.15, 0.2],
                        help="appeal rates, comma-separated (default 0.05,0.1,0.15,0.2)")
    parser.add_argument("--repeats", type=int, default=50, help="timed runs per figure; the median is kept "
                        "(default 50)")
    parser.add_argument("--input", type=_shape, default=(3, 32, 32), help="one input's shape (default 3,32,32)")
    parser.add_argument("--classes", type=int, default=10, help="classes (default 10)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on the CPU (default 2)")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.repeats < 1:
        parser.error("--batch and --repeats must be at least 1")
    try:
        device = latency_device(args.device)
    except CascadeError as exc:
        parser.error(str(exc))
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shape, n = args.input, args.batch

    def build(name: str) -> torch.nn.Module:
        return NETWORKS.get(name)(shape, args.classes).to(device).eval()

    def ms(fn) -> float:
        return median_time_ms(fn, device, args.repeats, warmup=3)

    little = build(args.little)
    stage = ScoredStage(little, MaxSoftmaxScore())
    x = torch.randn(n, *shape, device=device)
    with torch.no_grad():
        t_little = ms(partial(little, x))
        for big_name in args.big or ["resnet18_cifar", "resnet101_cifar"]:
            print(f"\n{args.little} -> {big_name}, batch {n} on {device} (median of {args.repeats}): ", end="")
            _report(stage, build(big_name), x, t_little, args.rates, ms, device)
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the last big network's memory, for the next


def _report(stage: ScoredStage, big: torch.nn.Module, x: torch.Tensor, t_little: float, rates: list[float], ms,
            device: torch.device) -> None:
    """The table of one little/big pair."""
    n = len(x)
    scores = stage(x).q
    t_big = ms(partial(big, x))
    print(f"t_little {t_little:.2f} ms, t_big {t_big:.2f} ms")
    print("| appeal rate | path | routed (ms) | speed-up | ideal | measured / ideal | big on AR rows (ms) | syncs |\n"
          "|---:|---|---:|---:|---:|---:|---:|---:|")
    for ar in rates:
        k = round(ar * n)
        threshold = threshold_for(scores, k)
        capacity = min(n, max(BUCKET, math.ceil(k / BUCKET) * BUCKET))
        router = Router([stage], threshold, big)
        reference = router(x)
        assert int((~reference.kept).sum()) == k, "ties among the scores: use another --batch"
        scale = reference.output.abs().max().clamp_min(1e-12)
        t_sub = ms(partial(big, x[:max(k, 1)]))
        ideal = t_big / (t_little + k / n * t_big)  # the rate actually appealed, k of n
        paths = {"router": partial(router, x), "one-sync": partial(one_sync_route, stage, big, threshold, x),
                 "static": partial(static_route, stage, big, threshold, capacity, x)}
        for path, fn in paths.items():
            out = fn()
            gap = float((getattr(out, "output", out) - reference.output).abs().max() / scale)
            assert gap < 1e-2, f"{path} disagrees with the router ({gap:.2g} of the outputs' scale)"
            t = ms(fn)
            syncs = count_syncs(fn, device)
            print(f"| {ar:.2f} | {path} | {t:.2f} | {t_big / t:.2f}x | {ideal:.2f}x | {t_big / t / ideal:.2f} | "
                  f"{t_sub:.2f} | {'-' if syncs is None else syncs} |")


if __name__ == "__main__":
    main()
