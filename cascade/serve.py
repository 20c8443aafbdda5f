"""Serving a bundle over HTTP (``cascade serve``) and its big network as an oracle
(``cascade serve-oracle``).

``cascade serve`` answers ``POST /predict`` with the bundle's routed stages, micro-batching
concurrent requests: a queue collects up to ``max_batch`` inputs or waits ``max_wait_ms``,
one worker thread routes the batch (torch stays off the event loop), and the appealed
inputs go to the last stage: a remote oracle (``oracle_url``), else the bundle's own big
network (white-box), else the little network's answer. The oracle is called with a
timeout, bounded retries and a circuit breaker; while it fails, appealed inputs get the
last routed stage's answer marked ``fallback: true``. Every request is answered: a 4xx
with one line for a malformed input, a 503 only if routing itself fails, never a 500.

The oracle protocol (any service can implement it)::

    POST {oracle_url}/predict   {"inputs": [B, *input_shape] raw inputs, nested lists}
    -> 200                      {"outputs": [B, D] the big network's raw outputs}

fastapi, uvicorn, httpx and prometheus_client are imported here only; ``cascade`` itself
never imports this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import io
import json
import logging
import math
import queue
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import Enum as EnumMetric

from cascade.bundle import Bundle
from cascade.errors import CascadeError

log = logging.getLogger(__name__)

#: Content-Type of a ``numpy.save`` body
NPY_CONTENT_TYPE = "application/x-npy"
#: the latency quantiles ``/metrics`` reports over the recent window
LATENCY_QUANTILES = (0.5, 0.9, 0.99)


# -- circuit breaker ---------------------------------------------------------------------


class BreakerState(str, enum.Enum):
    """A circuit breaker's state: ``closed`` calls go through; ``open`` calls are refused
    until a cool-down has passed; ``half_open`` lets one probe call through, whose result
    closes or re-opens the breaker."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Stops calling a failing service, and probes it again after a cool-down.

    closed --(``failure_threshold`` consecutive failures)--> open --(``cooldown_s``)-->
    half_open --(the probe succeeds)--> closed; half_open --(the probe fails)--> open.

    Args:
        failure_threshold: consecutive failures that open the breaker.
        cooldown_s: seconds an open breaker refuses calls before it lets a probe through.
        clock: monotonic seconds (a test passes a fake one).

    Raises:
        CascadeError: a threshold below 1 or a negative cool-down.
    """

    def __init__(self, failure_threshold: int = 3, cooldown_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic):
        if failure_threshold < 1:
            raise CascadeError(f"breaker failure threshold {failure_threshold}: must be at least 1")
        if not cooldown_s >= 0:
            raise CascadeError(f"breaker cool-down {cooldown_s}: must be at least 0 seconds")
        self.failure_threshold, self.cooldown_s, self._clock = failure_threshold, cooldown_s, clock
        self._state = BreakerState.CLOSED
        self._failures = 0  # consecutive, while closed
        self._opened_at = 0.0
        self._probing = False  # the half-open probe is in flight

    @property
    def state(self) -> BreakerState:
        """The current state; an open breaker whose cool-down has passed is half-open."""
        if self._state is BreakerState.OPEN and self._clock() - self._opened_at >= self.cooldown_s:
            self._state, self._probing = BreakerState.HALF_OPEN, False
        return self._state

    def allow(self) -> bool:
        """May a call go through now? In half-open, only the first caller (the probe) may."""
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.HALF_OPEN and not self._probing:
            self._probing = True
            return True
        return False

    def record_success(self) -> None:
        """A call succeeded: close (a half-open probe's success closes the breaker)."""
        if self._state is not BreakerState.CLOSED:
            log.warning("oracle circuit closed: the oracle answered again")
        self._state, self._failures, self._probing = BreakerState.CLOSED, 0, False

    def record_failure(self) -> None:
        """A call failed: count it while closed (open at the threshold); a failed probe
        re-opens the breaker for another cool-down."""
        state = self.state
        if state is BreakerState.CLOSED:
            self._failures += 1
            if self._failures >= self.failure_threshold:
                self._open()
        elif state is BreakerState.HALF_OPEN:
            self._open()
        # OPEN: a call that started before the breaker opened; nothing changes

    def _open(self) -> None:
        if self._state is BreakerState.CLOSED:
            log.warning("oracle circuit open after %d consecutive failures: appealed inputs get the fallback; "
                        "a probe in %g s", self.failure_threshold, self.cooldown_s)
        self._state, self._opened_at, self._probing = BreakerState.OPEN, self._clock(), False
        self._failures = 0


# -- micro-batching ----------------------------------------------------------------------


@dataclass
class _Waiting:
    payload: Any
    size: int
    future: asyncio.Future


class MicroBatcher:
    """Collects concurrent requests into batches and splits the answers back per request.

    A batch closes when it holds ``max_batch`` rows or ``max_wait_s`` has passed since its
    first request (a single request larger than ``max_batch`` is a batch of its own).
    ``route(payloads)`` runs for one batch at a time (the batcher waits for it before it
    closes the next batch, so batches grow while it is busy); ``resolve(payloads, routed)``
    then runs as its own task (batches overlap there: oracle calls) and returns one answer
    per row, in the order of the payloads' rows; request ``i`` gets its ``size`` rows.
    An exception in either step is set on every request of the batch.

    Args:
        route: ``async (payloads) -> routed``.
        resolve: ``async (payloads, routed) -> list`` of ``sum(sizes)`` answers.
        max_batch: rows per batch.
        max_wait_s: how long a batch waits for more requests after its first.
        on_batch: called with each batch's row count (metrics).
    """

    def __init__(self, route: Callable[[list], Awaitable[Any]], resolve: Callable[[list, Any], Awaitable[list]],
                 *, max_batch: int = 64, max_wait_s: float = 0.005, on_batch: Callable[[int], None] | None = None):
        if max_batch < 1:
            raise CascadeError(f"max batch {max_batch}: must be at least 1")
        if not max_wait_s >= 0:
            raise CascadeError(f"max wait {max_wait_s}: must be at least 0")
        self.max_batch, self.max_wait_s = max_batch, max_wait_s
        self._route, self._resolve, self._on_batch = route, resolve, on_batch
        self._queue: asyncio.Queue[_Waiting] = asyncio.Queue()
        self._held: _Waiting | None = None  # the request that did not fit in the last batch
        self._loop_task: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()

    def start(self) -> None:
        """Start the batching loop on the running event loop."""
        self._loop_task = asyncio.get_running_loop().create_task(self._run(), name="micro-batcher")

    async def submit(self, payload: Any, size: int) -> list:
        """Queue one request of ``size`` rows; its ``size`` answers.

        Raises:
            RuntimeError: the batcher is not running (started, or stopped).
            Exception: whatever the batch's ``route`` or ``resolve`` raised.
        """
        if self._loop_task is None or self._loop_task.done():
            raise RuntimeError("the server is not accepting requests (starting or shutting down)")
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Waiting(payload, size, future))
        return await future

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Stop batching; let batches in flight finish (up to ``timeout_s``), and answer
        every request still queued with an error."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        if self._tasks:
            _, late = await asyncio.wait(set(self._tasks), timeout=timeout_s)
            for t in late:
                t.cancel()
        waiting = [self._held] if self._held else []
        while not self._queue.empty():
            waiting.append(self._queue.get_nowait())
        self._fail(waiting, RuntimeError("the server is shutting down"))

    async def _next(self, timeout: float | None) -> _Waiting | None:
        if self._held is not None:
            item, self._held = self._held, None
            return item
        if timeout is None:
            return await self._queue.get()
        if timeout <= 0:
            with contextlib.suppress(asyncio.QueueEmpty):
                return self._queue.get_nowait()
            return None
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except asyncio.TimeoutError:
            return None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self._next(None)
            batch, rows = [first], first.size
            deadline = loop.time() + self.max_wait_s
            while rows < self.max_batch:
                item = await self._next(deadline - loop.time())
                if item is None:
                    break
                if rows + item.size > self.max_batch:
                    self._held = item  # first in the next batch
                    break
                batch.append(item)
                rows += item.size
            batch = [w for w in batch if not w.future.done()]  # a client that went away
            if not batch:
                continue
            if self._on_batch is not None:
                self._on_batch(sum(w.size for w in batch))
            payloads = [w.payload for w in batch]
            try:
                routed = await self._route(payloads)
            except asyncio.CancelledError:  # stopped while routing: answer, then stop
                self._fail(batch, RuntimeError("the server is shutting down"))
                raise
            except Exception as exc:  # noqa: BLE001  (every waiting request gets it; the loop goes on)
                self._fail(batch, exc)
                continue
            task = loop.create_task(self._finish(batch, payloads, routed))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _finish(self, batch: list[_Waiting], payloads: list, routed: Any) -> None:
        try:
            answers = await self._resolve(payloads, routed)
            total = sum(w.size for w in batch)
            if len(answers) != total:
                raise RuntimeError(f"resolve gave {len(answers)} answers for {total} rows")
        except BaseException as exc:  # cancelled at shutdown too: answer, then re-raise
            self._fail(batch, exc if isinstance(exc, Exception) else RuntimeError("the server is shutting down"))
            if not isinstance(exc, Exception):
                raise
            return
        start = 0
        for w in batch:
            if not w.future.done():
                w.future.set_result(answers[start:start + w.size])
            start += w.size

    @staticmethod
    def _fail(batch: Sequence[_Waiting], exc: BaseException) -> None:
        for w in batch:
            if not w.future.done():
                w.future.set_exception(exc)


# -- the oracle client -------------------------------------------------------------------


class OracleUnavailable(Exception):
    """The oracle did not answer (refused by the breaker, or every attempt failed)."""


class OracleClient:
    """Calls a remote oracle (the protocol in this module's docstring) with a timeout,
    bounded retries with exponential backoff, and a :class:`CircuitBreaker`.

    Args:
        url: the oracle's base URL; requests go to ``{url}/predict``.
        client: the ``httpx.AsyncClient`` to send with.
        num_outputs: D, the width of each output row.
        timeout_s: seconds per attempt.
        retries: further attempts after a failed one.
        backoff_s: the wait before the first retry (doubled each retry).
        breaker: the circuit breaker (default: 3 failures, 5 s cool-down).
        on_call, on_failure: called on each attempt and each failed attempt (metrics).
    """

    def __init__(self, url: str, client: httpx.AsyncClient, num_outputs: int, *, timeout_s: float = 2.0,
                 retries: int = 2, backoff_s: float = 0.05, breaker: CircuitBreaker | None = None,
                 on_call: Callable[[], None] | None = None, on_failure: Callable[[], None] | None = None):
        self.url = url.rstrip("/") + "/predict"
        self.client, self.num_outputs = client, num_outputs
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self.breaker = breaker or CircuitBreaker()
        self._on_call, self._on_failure = on_call or (lambda: None), on_failure or (lambda: None)

    async def predict(self, raw: np.ndarray) -> torch.Tensor:
        """The oracle's outputs ``[B, D]`` for raw inputs ``[B, ...]``.

        Raises:
            OracleUnavailable: the breaker is open, the oracle refused the inputs (4xx),
                or every attempt failed (timeout, connection, 5xx, a malformed answer).
        """
        body = json.dumps({"inputs": raw.tolist()}).encode()
        last = "the circuit breaker is open"
        for attempt in range(self.retries + 1):
            if not self.breaker.allow():
                raise OracleUnavailable(last)
            self._on_call()
            try:
                response = await self.client.post(self.url, content=body, timeout=self.timeout_s,
                                                   headers={"content-type": "application/json"})
                if 400 <= response.status_code < 500:  # the oracle is up but refuses these inputs: no retry
                    self._on_failure()
                    self.breaker.record_success()
                    raise OracleUnavailable(f"the oracle refused the inputs: {response.status_code} "
                                            f"{_one_line(response.text)}")
                if response.status_code != 200:
                    raise _BadAnswer(f"HTTP {response.status_code}")
                outputs = self._outputs(response, len(raw))
            except (httpx.HTTPError, _BadAnswer) as exc:
                self._on_failure()
                self.breaker.record_failure()
                last = f"{type(exc).__name__}: {_one_line(str(exc))}"
                if attempt < self.retries:
                    await asyncio.sleep(self.backoff_s * 2 ** attempt)
                continue
            self.breaker.record_success()
            return outputs
        raise OracleUnavailable(last)

    def _outputs(self, response: httpx.Response, rows: int) -> torch.Tensor:
        try:
            outputs = torch.tensor(response.json()["outputs"], dtype=torch.float32)
        except (ValueError, KeyError, TypeError) as exc:
            raise _BadAnswer(f"not {{'outputs': [[...], ...]}} ({_one_line(str(exc))})") from None
        if tuple(outputs.shape) != (rows, self.num_outputs) or not torch.isfinite(outputs).all():
            raise _BadAnswer(f"outputs of shape {list(outputs.shape)} for {rows} inputs of {self.num_outputs} "
                             "outputs each, or non-finite values")
        return outputs


class _BadAnswer(Exception):
    """An oracle answer that is not the protocol's: counts as a failed attempt."""


# -- metrics -----------------------------------------------------------------------------


class _Metrics:
    """The server's Prometheus metrics, in a registry of its own (one per app)."""

    def __init__(self, max_batch: int, window: int):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("cascade_requests", "POST /predict requests, by HTTP status", ["status"], registry=r)
        self.inputs = Counter("cascade_inputs", "inputs answered", registry=r)
        self.appealed = Counter("cascade_appealed_inputs", "inputs the routed stages appealed to the last stage",
                                registry=r)
        self.appeal_rate = Gauge("cascade_appeal_rate", "appealed inputs / inputs since start", registry=r)
        self.oracle_calls = Counter("cascade_oracle_calls", "oracle requests sent (retries included)", registry=r)
        self.oracle_failures = Counter("cascade_oracle_failures", "oracle requests that failed", registry=r)
        self.fallbacks = Counter("cascade_fallbacks", "appealed inputs answered by the last routed stage "
                                 "(the oracle unavailable)", registry=r)
        self.breaker = EnumMetric("cascade_oracle_breaker", "the oracle circuit breaker's state",
                                  states=[s.value for s in BreakerState], registry=r)
        buckets = sorted({2 ** i for i in range(max(1, max_batch).bit_length() + 1)} | {max_batch})
        self.batch_size = Histogram("cascade_batch_size", "inputs per routed micro-batch", buckets=buckets,
                                    registry=r)
        self.latency = Histogram("cascade_request_latency_seconds", "POST /predict latency", registry=r)
        self.latency_recent = Gauge("cascade_request_latency_recent_seconds",
                                    f"POST /predict latency quantiles over the last {window} requests",
                                    ["quantile"], registry=r)
        self._window: deque[float] = deque(maxlen=window)
        self._inputs = self._appealed = 0

    def observe_latency(self, seconds: float) -> None:
        self.latency.observe(seconds)
        self._window.append(seconds)

    def count_inputs(self, inputs: int, appealed: int) -> None:
        self.inputs.inc(inputs)
        self.appealed.inc(appealed)
        self._inputs += inputs
        self._appealed += appealed

    def render(self, breaker: CircuitBreaker | None) -> bytes:
        self.appeal_rate.set(self._appealed / self._inputs if self._inputs else 0.0)
        self.breaker.state((breaker.state if breaker else BreakerState.CLOSED).value)
        recent = np.array(self._window)
        for q in LATENCY_QUANTILES:
            self.latency_recent.labels(f"{q:g}").set(float(np.quantile(recent, q)) if len(recent) else math.nan)
        return generate_latest(self.registry)


# -- the apps ----------------------------------------------------------------------------


class _Problem(Exception):
    """A request the server refuses: an HTTP status and one line."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class _Routed:
    x: torch.Tensor            # [B, *input_shape] preprocessed
    raw: np.ndarray            # [B, *input_shape] as the clients sent them
    output: torch.Tensor       # [B, D]
    stage: list[int]
    score: list[float]
    mflops: list[float]
    pending: np.ndarray        # [B] bool


def create_app(bundle: Bundle, *, oracle_url: str | None = None, max_batch: int = 64, max_wait_ms: float = 5.0,
               oracle_timeout_s: float = 2.0, oracle_retries: int = 2, breaker_failures: int = 3,
               breaker_cooldown_s: float = 5.0, max_request_inputs: int = 4096,
               latency_window: int = 1000) -> FastAPI:
    """The ``cascade serve`` app: ``POST /predict``, ``GET /health``, ``GET /metrics``.

    Args:
        bundle: the loaded bundle.
        oracle_url: where appealed inputs go (the protocol in this module's docstring).
            None: a white-box bundle answers them with its own last stage, a black-box
            bundle with the last routed stage (``fallback: true``; a warning at start-up).
        max_batch: inputs per micro-batch.
        max_wait_ms: how long a micro-batch waits for more requests after its first.
        oracle_timeout_s: seconds per oracle attempt.
        oracle_retries: further attempts after a failed one (backoff 50 ms, doubled).
        breaker_failures: consecutive oracle failures that open the circuit breaker.
        breaker_cooldown_s: seconds the open breaker sends nothing before one probe.
        max_request_inputs: the most inputs one request may hold (413 above).
        latency_window: recent requests the latency quantiles are computed over.

    Returns:
        The FastAPI app (serve it with uvicorn, or test it with ``TestClient``).

    Raises:
        CascadeError: an option out of range, an oracle URL that is not http(s).
    """
    for name, value, least in (("max batch", max_batch, 1), ("max request inputs", max_request_inputs, 1),
                               ("latency window", latency_window, 1), ("oracle retries", oracle_retries, 0)):
        if value < least:
            raise CascadeError(f"{name} {value}: must be at least {least}")
    if not max_wait_ms >= 0:
        raise CascadeError(f"max wait {max_wait_ms} ms: must be at least 0")
    if not oracle_timeout_s > 0:
        raise CascadeError(f"oracle timeout {oracle_timeout_s} s: must be positive")
    if oracle_url is not None and not oracle_url.startswith(("http://", "https://")):
        raise CascadeError(f"oracle URL {oracle_url!r}: give http://HOST:PORT (the server of `cascade serve-oracle`)")
    breaker = CircuitBreaker(breaker_failures, breaker_cooldown_s) if oracle_url else None
    if oracle_url is None and not bundle.has_last_stage:
        log.warning("%s is a black-box bundle and no --oracle-url was given: appealed inputs get the little "
                    "network's answer, marked fallback", bundle.path)
    metrics = _Metrics(max_batch, latency_window)
    last = bundle.num_stages - 1
    last_mflops = bundle.stage_mflops[last] or 0.0
    state: dict[str, Any] = {}  # what the lifespan starts: the worker thread, the batcher, the oracle client

    def route_sync(payloads: list[tuple[np.ndarray, torch.Tensor]]) -> _Routed:
        x = torch.cat([p[1] for p in payloads])
        raw = payloads[0][0] if len(payloads) == 1 else np.concatenate([p[0] for p in payloads])
        r = bundle.route(x, preprocessed=True, run_last=False)
        return _Routed(x=x, raw=raw, output=r.output, stage=r.stage.tolist(), score=r.score.tolist(),
                       mflops=r.mflops.tolist(), pending=r.pending.numpy())

    async def route(payloads: list) -> _Routed:
        return await asyncio.get_running_loop().run_in_executor(state["worker"], route_sync, payloads)

    async def resolve(payloads: list, r: _Routed) -> list[dict]:
        pending = np.flatnonzero(r.pending)
        output, answered = r.output, np.zeros(len(r.pending), dtype=bool)
        answered[~r.pending] = True
        if len(pending):
            try:
                last_out = await answer_appealed(r, pending)
            except OracleUnavailable as exc:
                log.debug("fallback for %d inputs: %s", len(pending), exc)
                last_out = None
            except Exception:  # a bug must not lose the request: fall back, and say so
                log.exception("answering %d appealed inputs failed; answering with the fallback", len(pending))
                last_out = None
            if last_out is not None:
                output = output.clone()
                output[torch.from_numpy(pending)] = last_out
                answered[pending] = True
        metrics.count_inputs(len(r.pending), len(pending))
        fallbacks = int((~answered).sum())
        if fallbacks:
            metrics.fallbacks.inc(fallbacks)
        predictions = bundle.predictions(output)
        rows = []
        for i, pred in enumerate(predictions):
            fallback = not answered[i]
            appealed_here = r.pending[i] and not fallback
            rows.append({
                "prediction": pred,
                # a fallback is the last routed stage's answer
                "stage": last - 1 if fallback else r.stage[i],
                "score": r.score[i] if math.isfinite(r.score[i]) else None,
                "mflops": r.mflops[i] + (last_mflops if appealed_here else 0.0),
                "fallback": bool(fallback),
            })
        return rows

    async def answer_appealed(r: _Routed, pending: np.ndarray) -> torch.Tensor | None:
        if oracle_url is not None:
            return await state["oracle"].predict(r.raw[pending])
        if bundle.has_last_stage:
            x = r.x[torch.from_numpy(pending)]
            return await asyncio.get_running_loop().run_in_executor(state["worker"], bundle.run_last, x)
        return None

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        # one batch of torch at a time, off the event loop
        worker = state["worker"] = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cascade-route")
        client = httpx.AsyncClient() if oracle_url else None
        if client is not None:
            state["oracle"] = OracleClient(oracle_url, client, len(bundle.output_names), timeout_s=oracle_timeout_s,
                                           retries=oracle_retries, breaker=breaker,
                                           on_call=metrics.oracle_calls.inc, on_failure=metrics.oracle_failures.inc)
        batcher = MicroBatcher(route, resolve, max_batch=max_batch, max_wait_s=max_wait_ms / 1000,
                               on_batch=metrics.batch_size.observe)
        batcher.start()
        state["batcher"] = batcher
        try:
            yield
        finally:
            await batcher.stop(timeout_s=oracle_timeout_s * (oracle_retries + 1) + 1)
            if client is not None:
                await client.aclose()
            worker.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="cascade serve", lifespan=lifespan)

    async def read(request: Request) -> tuple[np.ndarray, torch.Tensor]:
        raw = await _read_body(request, max_request_inputs)
        try:  # on the worker too: torch never runs on the event loop
            x = await asyncio.get_running_loop().run_in_executor(state["worker"], bundle.preprocess, raw)
        except CascadeError as exc:
            raise _Problem(422, str(exc)) from None
        if len(x) == 0:
            raise _Problem(422, "no inputs: send at least one")
        return raw.reshape(x.shape), x

    @app.post("/predict")
    async def predict(request: Request) -> JSONResponse:
        start = time.perf_counter()
        try:
            raw, x = await read(request)
            predictions = await state["batcher"].submit((raw, x), len(x))
            response = JSONResponse({"predictions": predictions})
        except _Problem as p:
            response = _error(p.status, str(p))
        except Exception as exc:  # routing failed: a 503 with the reason, never a 500
            log.exception("POST /predict failed")
            response = _error(503, f"the server could not route the inputs: {type(exc).__name__}: "
                                   f"{_one_line(str(exc))}")
        metrics.requests.labels(str(response.status_code)).inc()
        if response.status_code == 200:
            metrics.observe_latency(time.perf_counter() - start)
        return response

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "bundle": bundle.name, "path": str(bundle.path), "stages": bundle.num_stages,
                "white_box": bundle.has_last_stage, "input_shape": list(bundle.input_shape),
                "oracle": None if oracle_url is None else {"url": oracle_url, "breaker": breaker.state.value}}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(breaker), media_type=CONTENT_TYPE_LATEST)

    return app


def create_oracle_app(bundle: Bundle, *, max_request_inputs: int = 65536) -> FastAPI:
    """The ``cascade serve-oracle`` app: the bundle's big network behind the oracle
    protocol (``POST /predict``), and ``GET /health``.

    Raises:
        CascadeError: a black-box bundle (it holds no big network).
    """
    if not bundle.has_last_stage:
        raise CascadeError(f"{bundle.path}: a black-box bundle holds no big network to serve; give a white-box "
                           "bundle or the run folder")
    state: dict[str, ThreadPoolExecutor] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        worker = state["worker"] = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cascade-oracle")
        try:
            yield
        finally:
            worker.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="cascade serve-oracle", lifespan=lifespan)

    def outputs(raw: Any) -> list:
        return bundle.run_last(bundle.preprocess(raw)).tolist()

    @app.post("/predict")
    async def predict(request: Request) -> JSONResponse:
        try:
            raw = await _read_body(request, max_request_inputs)  # the same bodies as ``cascade serve``'s
            try:
                out = await asyncio.get_running_loop().run_in_executor(state["worker"], outputs, raw)
            except CascadeError as exc:
                raise _Problem(422, str(exc)) from None
            return JSONResponse({"outputs": out})
        except _Problem as p:
            return _error(p.status, str(p))
        except Exception as exc:  # never a 500
            log.exception("POST /predict failed")
            return _error(503, f"the oracle failed: {type(exc).__name__}: {_one_line(str(exc))}")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "bundle": bundle.name, "path": str(bundle.path), "role": "oracle",
                "input_shape": list(bundle.input_shape), "outputs": len(bundle.output_names)}

    return app


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"detail": _one_line(message)}, status_code=status)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _as_array(value: Any) -> np.ndarray:
    try:
        return np.asarray(value)
    except (ValueError, TypeError):  # ragged nested lists
        raise _Problem(422, "inputs: not a rectangular array of numbers (nested lists of different lengths)") from None


async def _read_body(request: Request, max_inputs: int) -> np.ndarray:
    """A request's raw inputs (one input comes as a batch of one; shapes are the bundle's
    to check).

    Raises:
        _Problem: 415 an unknown content type; 400 a body that is not JSON / .npy or
            lacks ``input`` / ``inputs``; 413 too many inputs; 422 ragged lists.
    """
    ctype = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    body = await request.body()
    if ctype in (NPY_CONTENT_TYPE, "application/octet-stream"):
        try:
            raw = np.load(io.BytesIO(body), allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise _Problem(400, f"body: not a .npy array written by numpy.save ({_one_line(str(exc))})") from None
    elif ctype in ("application/json", "text/json", ""):
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise _Problem(400, f"body: not valid JSON ({exc})") from None
        if not isinstance(data, dict) or ("input" in data) == ("inputs" in data):
            raise _Problem(400, 'body: give {"input": [...]} (one input) or {"inputs": [[...], ...]} (a batch)')
        raw = _as_array([data["input"]] if "input" in data else data["inputs"])
    else:
        raise _Problem(415, f"content type {ctype!r}: send application/json or {NPY_CONTENT_TYPE} "
                            "(the bytes of numpy.save)")
    if raw.ndim >= 1 and len(raw) > max_inputs:
        raise _Problem(413, f"{len(raw)} inputs in one request: send at most {max_inputs}")
    return raw


# -- running a server --------------------------------------------------------------------


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: a free one, read it back with
    ``getsockname()``).

    Raises:
        CascadeError: the port is in use, the address is not this machine's, the port is
            out of range or needs privileges.
    """
    if not 0 <= port <= 65535:
        raise CascadeError(f"--port {port}: must be 0 (any free port) to 65535")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise CascadeError(f"--host {host}: not an address of this machine ({exc.strerror})") from None
    family, kind, proto, _, address = infos[0]
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted connections only then
    # (without it, a response waits ~40 ms on the client's delayed ACK)
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        why = {errno.EADDRINUSE: "already in use (choose another --port, or 0 for any free one)",
               errno.EACCES: "needs privileges (choose a port above 1023)",
               errno.EADDRNOTAVAIL: "not an address of this machine"}.get(exc.errno, exc.strerror)
        raise CascadeError(f"{host}:{port}: {why}") from None
    sock.set_inheritable(True)
    return sock


def run_server(app: FastAPI, sock: socket.socket, *, log_level: str = "warning") -> None:
    """Serve ``app`` with uvicorn on a bound socket until SIGINT / SIGTERM."""
    import uvicorn

    config = uvicorn.Config(app, log_level=log_level, access_log=False, timeout_graceful_shutdown=10)
    uvicorn.Server(config).run(sockets=[sock])


def server_url(sock: socket.socket) -> str:
    """``http://host:port`` of a bound socket."""
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


class ServerProcess:
    """``cascade serve`` or ``cascade serve-oracle`` in a child process on a free port,
    ready (``/health`` answers) on entering; terminated on exit (tests, benchmarks).

    Args:
        args: the command's arguments after ``cascade`` (no ``--port``: a free one is
            bound, and read back from the server's first line).
        startup_timeout_s: how long to wait for ``/health``.
        host: the address to listen on.

    Attributes:
        url: ``http://host:port`` once started.
        proc: the ``subprocess.Popen``.

    Raises:
        RuntimeError: the server exited or did not answer ``/health`` in time (with the
            tail of its stderr).
    """

    def __init__(self, args: Sequence[str], *, startup_timeout_s: float = 120.0, host: str = "127.0.0.1"):
        self.args, self.startup_timeout_s, self.host = list(args), startup_timeout_s, host
        self.url = ""
        self.proc: Any = None

    def __enter__(self) -> ServerProcess:  # noqa: PYI034  (Python 3.10 has no typing.Self)
        self._stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, "-m", "cascade", *self.args, "--host", self.host, "--port", "0"],
                                     stdout=subprocess.PIPE, stderr=self._stderr, text=True)
        lines: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=lambda: [lines.put(line) for line in self.proc.stdout], daemon=True)
        self._reader.start()
        deadline = time.monotonic() + self.startup_timeout_s
        try:
            while not self.url:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"`cascade {' '.join(self.args)}` did not start: {self.stderr_tail()}")
                with contextlib.suppress(queue.Empty):
                    line = lines.get(timeout=0.2)
                    self.url = next((w for w in line.split() if w.startswith("http://")), "")
            while not self._healthy():
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{self.url}/health did not answer: {self.stderr_tail()}")
                time.sleep(0.1)
        except BaseException:
            self.__exit__()
            raise
        return self

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    def stderr_tail(self, chars: int = 2000) -> str:
        """The end of the server's stderr so far."""
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")[-chars:]

    def kill(self) -> None:
        """Kill the server at once (SIGKILL: as a crash would) and wait for it to be gone."""
        self.proc.kill()
        self.proc.wait(timeout=30)

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # uvicorn shuts down gracefully on SIGTERM
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.proc is not None:
            self._reader.join(timeout=5)  # EOF once the server is gone
            self.proc.stdout.close()
            self._stderr.close()


@contextlib.contextmanager
def oracle_bundle(source: str | Path):
    """The bundle ``serve-oracle`` serves: ``source`` itself when it is a bundle, else a
    white-box bundle exported from the run folder ``source`` into a temporary folder
    (removed on exit).

    Yields:
        The loaded :class:`~cascade.bundle.Bundle`.

    Raises:
        CascadeError: a path that is neither; a black-box bundle; a run with no
            white-box mode.
    """
    source = Path(source)
    if (source / "manifest.json").is_file():
        bundle = Bundle.load(source)
        if not bundle.has_last_stage:
            raise CascadeError(f"{source}: a black-box bundle holds no big network to serve as an oracle; give a "
                               "white-box bundle or the run folder")
        yield bundle
        return
    metrics = source / "metrics.json"
    if not metrics.is_file():
        raise CascadeError(f"{source}: neither a bundle (no manifest.json) nor a finished run folder "
                           "(no metrics.json)")
    modes = json.loads(metrics.read_text()).get("modes", [])
    if "white_box" not in modes:
        raise CascadeError(f"{source}: the run has no white_box mode (modes: {', '.join(modes) or 'none'}), so no "
                           "big network to serve; run it with modes: [white_box, ...]")
    from cascade.export import export_bundle

    with tempfile.TemporaryDirectory(prefix="cascade-oracle-") as tmp:
        # every white-box operating point carries the same big network (the oracle ignores
        # thresholds); one whose method's scores are random cannot be exported: try the next
        error = None
        for method, target_ad, threshold_source in _white_box_points(source):
            try:
                path = export_bundle(source, Path(tmp) / "bundle", method=method, mode="white_box",
                                     target_ad=target_ad, source=threshold_source, onnx=False)
            except CascadeError as exc:
                error = exc
                continue
            yield Bundle.load(path)
            return
        raise error


def _white_box_points(run: Path) -> list[tuple[str, float, str]]:
    """One (method, target AD, threshold source) per method with a white-box point,
    ``val`` points first."""
    import pandas as pd

    points = run / "points.csv"
    if not points.is_file():
        raise CascadeError(f"{points}: not found; is {run} the output folder of a finished `cascade run`?")
    p = pd.read_csv(points)
    p = p[(p["mode"] == "white_box") & (p["selection"] == "target_ad")]
    if p.empty:
        raise CascadeError(f"{points}: no white_box operating point to export the big network from")
    p = p.assign(_val=(p["threshold_source"] != "val")).sort_values("_val", kind="stable")
    p = p.drop_duplicates("method")
    return [(str(m), float(t), str(s)) for m, t, s in zip(p["method"], p["target_ad"], p["threshold_source"])]
