"""Cost of a network: multiply-accumulates counted by ``torch.utils.flop_counter``, and
latency per batch (:func:`measure_latency`; :func:`list_networks` for the whole registry).

The AppealNet paper's "FLOPs" are multiply-accumulates (MACs); ``FlopCounterMode``
counts a multiply-add as 2 FLOPs, so every figure here is its count divided by 2 and is
reported as "MFLOPs (MACs)". Only the operations the counter knows (matmul, convolution,
attention...) are counted; elementwise ops (activations, softmax) and batch norm are not
(it folds into the convolution before it at deployment). The paper's Table 3 counts its
networks' batch norms too, 2 per output element (as ``thop`` does), 0.4-4.5 % of their
totals: see ``tasks/cifar_networks.py``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from cascade.core.errors import CascadeError
from cascade.core.registry import NETWORKS


@dataclass(frozen=True)
class NetworkCost:
    """Per-input cost: ``mflops`` in millions of multiply-accumulates, ``params`` count."""

    mflops: float
    params: int

    def as_dict(self) -> dict[str, float]:
        return {"mflops": self.mflops, "params": self.params}


def count_params(module: nn.Module) -> int:
    """Number of parameters (trainable or not)."""
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def measure_cost(module: nn.Module, input_shape: tuple[int, ...]) -> NetworkCost:
    """MACs of one forward pass on a single input of ``input_shape`` (no batch dim)."""
    was_training = module.training
    module.eval()
    device = next(module.parameters()).device
    x = torch.zeros(1, *input_shape, device=device)
    with FlopCounterMode(display=False) as counter:
        module(x)
    module.train(was_training)
    return NetworkCost(mflops=counter.get_total_flops() / 2 / 1e6, params=count_params(module))


# -- latency and the registry's costs (`cascade networks`) -------------------------------


def latency_device(name: str) -> torch.device:
    """The device ``name`` (``cpu``, ``cuda``, ``cuda:N``) for latency measurements.

    Raises:
        CascadeError: not a torch device, another kind than cpu or cuda, or no such
            CUDA device on this machine.
    """
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CascadeError(f"device {name!r}: not a device; use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise CascadeError(f"device {name!r}: latency is measured on cpu or cuda only")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CascadeError(f"device {name!r}: no CUDA device is available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CascadeError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def _check_timing(batch: int, repeats: int, warmup: int) -> None:
    for what, value, least in (("batch", batch, 1), ("repeats", repeats, 1), ("warmup", warmup, 0)):
        if value < least:
            raise CascadeError(f"latency: {what} {value}; must be at least {least}")


def median_time_ms(fn: Callable[[], object], device: str | torch.device = "cpu", repeats: int = 10,
                   warmup: int = 3) -> float:
    """Median wall-clock milliseconds of ``fn()``, which runs work on ``device``.

    On CUDA each call is timed with CUDA events on the current stream and waited for
    (``Event.synchronize``), so a figure is the time until the call's work is done, not
    the time to queue its kernels; on the CPU with ``time.perf_counter``. ``warmup``
    untimed calls come first (cuDNN's algorithm search, the caching allocator, caches).

    Args:
        fn: the work to time.
        device: ``cpu``, ``cuda`` or ``cuda:N``.
        repeats: timed calls; the median is returned.
        warmup: untimed calls before them.

    Returns:
        The median milliseconds per call.

    Raises:
        CascadeError: a bad device (see :func:`latency_device`), ``repeats`` below 1,
            ``warmup`` below 0.
    """
    device = latency_device(str(device))
    _check_timing(1, repeats, warmup)
    if device.type == "cpu":
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    with torch.cuda.device(device):
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    return statistics.median(times)


@torch.no_grad()
def measure_latency(
    module: nn.Module, input_shape: tuple[int, ...], batch: int = 256, device: str | torch.device = "cpu",
    repeats: int = 10, warmup: int = 3,
) -> float:
    """Median milliseconds of one forward pass (eval mode, no grad) on a batch of
    ``batch`` random inputs of ``input_shape``, timed by :func:`median_time_ms` (CUDA
    events on CUDA). The module is moved to ``device`` and left there, in the train/eval
    mode it had.

    Args:
        module: the network.
        input_shape: one input's shape (no batch dimension).
        batch: inputs per pass.
        device: ``cpu``, ``cuda`` or ``cuda:N``.
        repeats: timed passes; the median is returned.
        warmup: untimed passes before them.

    Returns:
        The median milliseconds per batch.

    Raises:
        CascadeError: a bad device (see :func:`latency_device`), ``batch`` or ``repeats``
            below 1, ``warmup`` below 0.
    """
    device = latency_device(str(device))
    _check_timing(batch, repeats, warmup)
    was_training = module.training
    module.to(device).eval()
    x = torch.randn(batch, *input_shape, device=device)
    try:
        return median_time_ms(lambda: module(x), device, repeats, warmup)
    finally:
        module.train(was_training)


@dataclass(frozen=True)
class NetworkRow:
    """One registered network's cost for an input shape, or why it has none.

    Attributes:
        name: the registry key.
        mflops: millions of multiply-accumulates per input (None: see ``error``).
        params: parameter count.
        latency_ms: median milliseconds per batch (None: not measured, or ``error``).
        error: why the network has no figures (it needs options, or does not take
            this input), in one line; None when it has them.
    """

    name: str
    mflops: float | None = None
    params: int | None = None
    latency_ms: float | None = None
    error: str | None = None


def list_networks(
    input_shape: tuple[int, ...], num_outputs: int, *, device: str | None = None, batch: int = 256,
    repeats: int = 10, warmup: int = 3,
) -> list[NetworkRow]:
    """Every registered network, built with its default options for ``input_shape`` and
    ``num_outputs``: its MFLOPs and parameters and, with ``device``, its latency (see
    :func:`measure_latency`).

    A network that cannot be built, costed or timed (one that needs options, or does not
    take this input, or runs out of memory) gets a row with the reason in ``error``
    instead of stopping the listing.

    Args:
        input_shape: one input's shape, e.g. ``(3, 32, 32)``.
        num_outputs: classes (or outputs).
        device: where to time a batch (``cpu``, ``cuda``...); None: no timing.
        batch, repeats, warmup: see :func:`measure_latency`.

    Returns:
        One row per registered network, by name.

    Raises:
        CascadeError: a shape or output count that is not positive, a bad device, batch
            or repeats (checked before any network is built).
    """
    shape = tuple(input_shape)
    if not shape or any(not isinstance(d, int) or d < 1 for d in shape):
        raise CascadeError(f"input shape {shape}: every dimension must be a positive integer")
    if num_outputs < 1:
        raise CascadeError(f"outputs {num_outputs}: must be at least 1")
    if device is not None:
        latency_device(device)
        _check_timing(batch, repeats, warmup)
    rows = []
    for name in NETWORKS.names():
        rows.append(_network_row(name, shape, num_outputs, device, batch, repeats, warmup))
        if device is not None and torch.device(device).type == "cuda":
            torch.cuda.empty_cache()  # the next network gets the last one's memory
    return rows


def _network_row(
    name: str, shape: tuple[int, ...], num_outputs: int, device: str | None, batch: int, repeats: int, warmup: int,
) -> NetworkRow:
    """:func:`list_networks`' row of one network; what fails goes in ``error``, in one
    line: these are any user's networks, and the listing goes on."""
    def reason(what: str, exc: Exception) -> str:
        first = (str(exc).strip().splitlines() or [""])[0]
        return f"cannot be {what} for input {shape}: {type(exc).__name__}" + (f": {first}" if first else "")

    try:
        net = NETWORKS.get(name)(shape, num_outputs)
    except Exception as exc:  # noqa: BLE001  (any user's builder; e.g. one with a required option)
        return NetworkRow(name, error=reason("built", exc))
    try:
        cost = measure_cost(net, shape)
    except Exception as exc:  # noqa: BLE001  (e.g. an input too small for its strides)
        return NetworkRow(name, error=reason("run", exc))
    if device is None:
        return NetworkRow(name, cost.mflops, cost.params)
    try:
        return NetworkRow(name, cost.mflops, cost.params, measure_latency(net, shape, batch, device, repeats, warmup))
    except Exception as exc:  # noqa: BLE001  (e.g. out of memory at this batch size)
        return NetworkRow(name, cost.mflops, cost.params, error=reason(f"timed at batch {batch}", exc))
