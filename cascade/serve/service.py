"""What ``POST /predict`` does with a request, outside FastAPI: decode it, route it (at
once when it is alone, else in a micro-batch), and answer its appealed inputs.

:class:`RoutingService` holds the server's routing state (the worker thread, the
batcher, the oracle client, the running cost of a routed row); :mod:`cascade.serve.app`
wires it to HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
import numpy as np
import torch
from fastapi import Request

from cascade.deploy.bundle import Bundle
from cascade.core.errors import CascadeError
from cascade.serve.batcher import MicroBatcher
from cascade.serve.body import (
    Problem,
    check_content_type,
    content_type,
    decode,
    read_body,
)
from cascade.serve.metrics import ServeMetrics
from cascade.serve.oracle import CircuitBreaker, OracleClient, OracleUnavailable

log = logging.getLogger(__name__)

#: bodies up to this size are decoded on the event loop (tens of microseconds; a thread
#: hop would cost more); larger ones in a thread
INLINE_DECODE_BYTES = 16 * 1024
#: a lone request of up to this many inputs (no other request in the server) is routed
#: at once on the event loop: there is nothing to batch it with, and the hop to the
#: worker thread would cost more than routing it
INLINE_ROUTE_INPUTS = 8
#: once requests have overlapped, they go to the batcher for this long (under load, routing
#: inline one by one would hold the event loop and batch nothing)
CONCURRENT_HOLD_S = 0.1
#: a batch expected to route in less than this runs on the event loop, not the worker
INLINE_ROUTE_S = 0.001


@dataclass
class _Routed:
    x: torch.Tensor | None     # [B, *input_shape] preprocessed (None: routed inline)
    raw: np.ndarray            # [B, *input_shape] as the clients sent them
    output: torch.Tensor       # [B, D]
    stage: list[int]
    score: list[float]
    mflops: list[float]
    pending: np.ndarray        # [B] bool
    inline: bool = False       # routed on the event loop (a lone request): so is the rest


class RoutingService:
    """The routing behind ``POST /predict``.

    Args:
        bundle: the loaded bundle.
        metrics: where requests, inputs, batches and fallbacks are counted.
        oracle_url, oracle_timeout_s, oracle_retries, oracle_token, breaker: the remote
            oracle appealed inputs go to (None: the bundle's own last stage, or the
            fallback for a black-box bundle).
        max_batch, max_wait_ms: the micro-batcher's limits.
        max_request_inputs, max_body_mb: a request's limits (422 and 413 above them).
    """

    def __init__(self, bundle: Bundle, metrics: ServeMetrics, *, oracle_url: str | None, oracle_timeout_s: float,
                 oracle_retries: int, oracle_token: str | None, breaker: CircuitBreaker | None, max_batch: int,
                 max_wait_ms: float, max_request_inputs: int, max_body_mb: float):
        self.bundle, self.metrics, self.breaker = bundle, metrics, breaker
        self.oracle_url, self.oracle_timeout_s = oracle_url, oracle_timeout_s
        self._oracle_retries, self._oracle_token = oracle_retries, oracle_token
        self._max_batch, self._max_wait_s = max_batch, max_wait_ms / 1000
        self.max_request_inputs, self.max_bytes = max_request_inputs, int(max_body_mb * 2 ** 20)
        self._last = bundle.num_stages - 1
        self._last_mflops = bundle.stage_mflops[self._last] or 0.0
        self._input_size = math.prod(bundle.input_shape)
        self.in_flight = 0                    # requests in the server now
        self._concurrent_at = -math.inf       # when it last had concurrent ones
        self._row_s = math.inf                # running mean routing time per input
        self._worker: ThreadPoolExecutor | None = None
        self._client: httpx.AsyncClient | None = None
        self._oracle: OracleClient | None = None
        self.batcher: MicroBatcher | None = None

    # -- lifespan --------------------------------------------------------------------------

    def start(self) -> None:
        """The worker thread (one long batch of torch at a time, off the event loop), the
        oracle client and the batcher; call inside the running event loop."""
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cascade-route")
        if self.oracle_url is not None:
            self._client = httpx.AsyncClient()
            m = self.metrics
            self._oracle = OracleClient(self.oracle_url, self._client, len(self.bundle.output_names),
                                        timeout_s=self.oracle_timeout_s, retries=self._oracle_retries,
                                        breaker=self.breaker, token=self._oracle_token, on_call=m.oracle_calls.inc,
                                        on_failure=m.oracle_failures.inc)
        self.batcher = MicroBatcher(self._route, self._resolve, max_batch=self._max_batch,
                                    max_wait_s=self._max_wait_s, on_batch=self.metrics.batch_size.observe)
        self.batcher.start()

    async def stop(self) -> None:
        if self.batcher is not None:
            await self.batcher.stop(timeout_s=self.oracle_timeout_s + 1)
        if self._client is not None:
            await self._client.aclose()
        if self._worker is not None:
            self._worker.shutdown(wait=False, cancel_futures=True)

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Any) -> AsyncIterator[None]:
        """The app's lifespan: :meth:`start` on start-up, :meth:`stop` on shutdown."""
        self.start()
        try:
            yield
        finally:
            await self.stop()

    # -- a request -------------------------------------------------------------------------

    async def predict(self, request: Request) -> list[dict]:
        """The predictions for one request's inputs.

        Raises:
            Problem: a 4xx answer (content type, body size, format, shape).
        """
        ctype = content_type(request)
        check_content_type(ctype)  # before the body is read
        body = await read_body(request, self.max_bytes)
        batcher = self.batcher
        assert batcher is not None, "start() runs in the app's lifespan"
        if len(body) > INLINE_DECODE_BYTES:  # a big body is parsed in a thread: other requests go on meanwhile
            raw, x = await anyio.to_thread.run_sync(self._decode_inputs, body, ctype)
            return await batcher.submit((raw, x), len(x))
        raw = decode(body, ctype, self.max_request_inputs)
        if raw.size <= INLINE_ROUTE_INPUTS * self._input_size and self._lone():
            for _ in range(3):  # let requests that already came in reach the server: then it is not alone
                await asyncio.sleep(0)
            if self._lone():
                routed = self._route_inline(raw)
                self.metrics.batch_size.observe(len(routed.stage))
                return await self._resolve([raw], routed)
        raw, x = self._preprocess(raw)
        return await batcher.submit((raw, x), len(x))

    def _preprocess(self, raw: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
        try:
            x = self.bundle.preprocess(raw)
        except CascadeError as exc:
            raise Problem(422, str(exc)) from None
        if len(x) == 0:
            raise Problem(422, "no inputs: send at least one")
        return raw.reshape(x.shape), x

    def _decode_inputs(self, body: bytes, ctype: str) -> tuple[np.ndarray, torch.Tensor]:
        return self._preprocess(decode(body, ctype, self.max_request_inputs))

    def _lone(self) -> bool:
        """No other request in the server, nor in the last ``CONCURRENT_HOLD_S``."""
        now = time.monotonic()
        if self.in_flight > 1 or not self.batcher.idle:
            self._concurrent_at = now
            return False
        return now - self._concurrent_at > CONCURRENT_HOLD_S

    def _route_inline(self, raw: np.ndarray) -> _Routed:
        """A lone request, all on the event loop, as a bare endpoint would: one
        ``Bundle.route`` (the bundle's own last stage included when it answers)."""
        try:
            r = self.bundle.route(raw, run_last=self.oracle_url is None)
        except CascadeError as exc:
            raise Problem(422, str(exc)) from None
        if len(r) == 0:
            raise Problem(422, "no inputs: send at least one")
        return _Routed(x=None, raw=raw.reshape(len(r), *self.bundle.input_shape), output=r.output,
                       stage=r.stage.tolist(), score=r.score.tolist(), mflops=r.mflops.tolist(),
                       pending=r.pending.numpy(), inline=True)

    # -- a micro-batch ---------------------------------------------------------------------

    def _route_sync(self, payloads: list[tuple[np.ndarray, torch.Tensor]]) -> _Routed:
        x = torch.cat([p[1] for p in payloads]) if len(payloads) > 1 else payloads[0][1]
        raw = payloads[0][0] if len(payloads) == 1 else np.concatenate([p[0] for p in payloads])
        r = self.bundle.route(x, preprocessed=True, run_last=False)
        return _Routed(x=x, raw=raw, output=r.output, stage=r.stage.tolist(), score=r.score.tolist(),
                       mflops=r.mflops.tolist(), pending=r.pending.numpy())

    async def _on_worker(self, rows: int, fn, *args: Any):
        """``fn(*args)`` on the worker thread, or here on the event loop when ``rows`` are
        expected to take under ``INLINE_ROUTE_S`` (the hop to the thread and back would
        cost a good part of that, and the loop has nothing else to do meanwhile)."""
        start = time.perf_counter()
        if rows * self._row_s < INLINE_ROUTE_S:
            out = fn(*args)
        else:
            out = await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)
        row_s = (time.perf_counter() - start) / max(rows, 1)
        self._row_s = row_s if self._row_s == math.inf else 0.8 * self._row_s + 0.2 * row_s
        return out

    async def _route(self, payloads: list) -> _Routed:
        return await self._on_worker(sum(len(p[1]) for p in payloads), self._route_sync, payloads)

    async def _resolve(self, payloads: list, r: _Routed) -> list[dict]:
        """Each input's answer: the appealed ones from the oracle (or the bundle's last
        stage), the fallback where it cannot answer."""
        last = self._last
        pending = np.flatnonzero(r.pending)
        output, answered = r.output, ~r.pending
        if len(pending):
            try:
                last_out = await self._answer_appealed(r, pending)
            except OracleUnavailable as exc:
                log.debug("fallback for %d inputs: %s", len(pending), exc)
                last_out = None
            except Exception:  # a bug must not lose the request: fall back, and say so
                log.exception("answering %d appealed inputs failed; answering with the fallback", len(pending))
                last_out = None
            if last_out is not None:
                output = output.clone()
                output[torch.from_numpy(pending)] = last_out
                answered = np.ones(len(r.pending), dtype=bool)
        # appealed: routed to the last stage (pending, or answered by the bundle's own inline)
        self.metrics.count_inputs(len(r.stage), sum(1 for s in r.stage if s == last))
        fallbacks = int((~answered).sum())
        if fallbacks:
            self.metrics.fallbacks.inc(fallbacks)
        rows = []
        for i, pred in enumerate(self.bundle.predictions(output)):
            fallback = not answered[i]
            rows.append({
                "prediction": pred,
                "stage": last - 1 if fallback else r.stage[i],  # a fallback is the last routed stage's answer
                "score": r.score[i] if math.isfinite(r.score[i]) else None,
                "mflops": r.mflops[i] + (self._last_mflops if r.pending[i] and not fallback else 0.0),
                "fallback": bool(fallback),
            })
        return rows

    async def _answer_appealed(self, r: _Routed, pending: np.ndarray) -> torch.Tensor | None:
        if self._oracle is not None:
            return await self._oracle.predict(r.raw[pending])
        if self.bundle.has_last_stage:
            x = r.x[torch.from_numpy(pending)]
            return await self._on_worker(len(x), self.bundle.run_last, x)
        return None
