"""The ``cascade serve`` app: ``POST /predict``, ``GET /health``, ``GET /metrics``."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
import numpy as np
import torch
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST

from cascade.bundle import Bundle
from cascade.errors import CascadeError
from cascade.serve.batcher import MicroBatcher
from cascade.serve.body import Problem, check_content_type, content_type, decode, one_line, read_body
from cascade.serve.metrics import ServeMetrics
from cascade.serve.oracle import CircuitBreaker, OracleClient, OracleUnavailable
from cascade.serve.schema import PredictResponse, ServeHealth, error_responses, request_body

log = logging.getLogger("cascade.serve")

#: the environment variable a bearer token may come from (``--token`` wins)
TOKEN_ENV = "CASCADE_TOKEN"
#: the environment variable ``--workers`` passes each worker process its settings in
SETTINGS_ENV = "CASCADE_SERVE_SETTINGS"
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


def error_response(status: int, message: str) -> JSONResponse:
    headers = {"connection": "close"} if status == 413 else None  # the rest of the body is not read
    return JSONResponse({"detail": one_line(message)}, status_code=status, headers=headers)


def bearer_check(token: str | None):
    """A FastAPI dependency refusing requests without ``Authorization: Bearer <token>``
    (compared in constant time), or None when ``token`` is None (no auth)."""
    if not token:
        return None
    scheme, expected = HTTPBearer(auto_error=False, description="--token / $CASCADE_TOKEN"), token.encode()

    async def check(credentials: HTTPAuthorizationCredentials | None = Depends(scheme)) -> None:
        given = credentials.credentials.encode() if credentials is not None else b""
        if not hmac.compare_digest(given, expected):
            raise HTTPException(401, "a bearer token is required: send Authorization: Bearer <token> (the server's "
                                     "--token)" if credentials is None else "wrong bearer token",
                                headers={"WWW-Authenticate": "Bearer"})

    return Depends(check)


def create_app(bundle: Bundle, *, oracle_url: str | None = None, max_batch: int = 64, max_wait_ms: float = 0.0,
               oracle_timeout_s: float = 2.0, oracle_retries: int = 2, breaker_failures: int = 3,
               breaker_cooldown_s: float = 5.0, max_request_inputs: int = 4096, max_body_mb: float = 32.0,
               token: str | None = None, oracle_token: str | None = None, latency_window: int = 1000) -> FastAPI:
    """The ``cascade serve`` app.

    Args:
        bundle: the loaded bundle.
        oracle_url: where appealed inputs go (the protocol in :mod:`cascade.serve.oracle`).
            None: a white-box bundle answers them with its own last stage, a black-box
            bundle with the last routed stage (``fallback: true``; a warning at start-up).
        max_batch: inputs per micro-batch.
        max_wait_ms: how long a micro-batch waits for more requests after its first (0: an
            idle worker routes at once; requests batch while it is busy).
        oracle_timeout_s: the whole deadline of an appealed batch's oracle call, retries
            and backoff included.
        oracle_retries: further attempts after a failed one (backoff 50 ms, doubled).
        breaker_failures: consecutive oracle failures that open the circuit breaker.
        breaker_cooldown_s: seconds the open breaker sends nothing before one probe.
        max_request_inputs: the most inputs one request may hold (422 above).
        max_body_mb: the largest body read (413 above, before anything is parsed).
        token: a bearer token ``/predict`` and ``/metrics`` require (None: no auth).
        oracle_token: the bearer token sent to the oracle.
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
    if not 0 <= max_wait_ms < math.inf:
        raise CascadeError(f"max wait {max_wait_ms} ms: must be at least 0")
    for name, value in (("oracle timeout", oracle_timeout_s), ("max body MB", max_body_mb)):
        if not 0 < value < math.inf:
            raise CascadeError(f"{name} {value}: must be positive")
    if oracle_url is not None and not oracle_url.startswith(("http://", "https://")):
        raise CascadeError(f"oracle URL {oracle_url!r}: give http://HOST:PORT (the server of `cascade serve-oracle`)")
    breaker = CircuitBreaker(breaker_failures, breaker_cooldown_s) if oracle_url else None
    if oracle_url is None and not bundle.has_last_stage:
        log.warning("%s is a black-box bundle and no --oracle-url was given: appealed inputs get the little "
                    "network's answer, marked fallback", bundle.path)
    metrics = ServeMetrics(max_batch, latency_window)
    last = bundle.num_stages - 1
    last_mflops = bundle.stage_mflops[last] or 0.0
    max_bytes = int(max_body_mb * 2 ** 20)
    input_size = math.prod(bundle.input_shape)
    # requests in the server, when it last had concurrent ones; and what the lifespan starts
    # and the running mean routing time per input
    state: dict[str, Any] = {"in_flight": 0, "concurrent_at": -math.inf, "row_s": math.inf}

    def route_sync(payloads: list[tuple[np.ndarray, torch.Tensor]], inline: bool = False) -> _Routed:
        x = torch.cat([p[1] for p in payloads]) if len(payloads) > 1 else payloads[0][1]
        raw = payloads[0][0] if len(payloads) == 1 else np.concatenate([p[0] for p in payloads])
        r = bundle.route(x, preprocessed=True, run_last=False)
        return _Routed(x=x, raw=raw, output=r.output, stage=r.stage.tolist(), score=r.score.tolist(),
                       mflops=r.mflops.tolist(), pending=r.pending.numpy(), inline=inline)

    async def on_worker(rows: int, fn, *args):
        """``fn(*args)`` on the worker thread, or here on the event loop when ``rows`` are
        expected to take under ``INLINE_ROUTE_S`` (the hop to the thread and back would
        cost a good part of that, and the loop has nothing else to do meanwhile)."""
        start = time.perf_counter()
        if rows * state["row_s"] < INLINE_ROUTE_S:
            out = fn(*args)
        else:
            out = await asyncio.get_running_loop().run_in_executor(state["worker"], fn, *args)
        row_s = (time.perf_counter() - start) / max(rows, 1)
        state["row_s"] = row_s if state["row_s"] == math.inf else 0.8 * state["row_s"] + 0.2 * row_s
        return out

    async def route(payloads: list) -> _Routed:
        return await on_worker(sum(len(p[1]) for p in payloads), route_sync, payloads)

    async def resolve(payloads: list, r: _Routed) -> list[dict]:
        pending = np.flatnonzero(r.pending)
        output, answered = r.output, ~r.pending
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
                answered = np.ones(len(r.pending), dtype=bool)
        # appealed: routed to the last stage (pending, or answered by the bundle's own inline)
        metrics.count_inputs(len(r.stage), sum(1 for s in r.stage if s == last))
        fallbacks = int((~answered).sum())
        if fallbacks:
            metrics.fallbacks.inc(fallbacks)
        rows = []
        for i, pred in enumerate(bundle.predictions(output)):
            fallback = not answered[i]
            rows.append({
                "prediction": pred,
                "stage": last - 1 if fallback else r.stage[i],  # a fallback is the last routed stage's answer
                "score": r.score[i] if math.isfinite(r.score[i]) else None,
                "mflops": r.mflops[i] + (last_mflops if r.pending[i] and not fallback else 0.0),
                "fallback": bool(fallback),
            })
        return rows

    async def answer_appealed(r: _Routed, pending: np.ndarray) -> torch.Tensor | None:
        if oracle_url is not None:
            return await state["oracle"].predict(r.raw[pending])
        if bundle.has_last_stage:
            x = r.x[torch.from_numpy(pending)]
            return await on_worker(len(x), bundle.run_last, x)
        return None

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        # one long batch of torch at a time, off the event loop
        worker = state["worker"] = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cascade-route")
        client = httpx.AsyncClient() if oracle_url else None
        if client is not None:
            state["oracle"] = OracleClient(oracle_url, client, len(bundle.output_names), timeout_s=oracle_timeout_s,
                                           retries=oracle_retries, breaker=breaker, token=oracle_token,
                                           on_call=metrics.oracle_calls.inc, on_failure=metrics.oracle_failures.inc)
        batcher = state["batcher"] = MicroBatcher(route, resolve, max_batch=max_batch, max_wait_s=max_wait_ms / 1000,
                                                  on_batch=metrics.batch_size.observe)
        batcher.start()
        try:
            yield
        finally:
            await batcher.stop(timeout_s=oracle_timeout_s + 1)
            if client is not None:
                await client.aclose()
            worker.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="cascade serve", lifespan=lifespan,
                  description=f"The routed cascade of bundle {bundle.name!r}: inputs of shape "
                              f"{list(bundle.input_shape)}.")
    auth = bearer_check(token)
    guarded = [auth] if auth is not None else []

    def preprocess(raw: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
        try:
            x = bundle.preprocess(raw)
        except CascadeError as exc:
            raise Problem(422, str(exc)) from None
        if len(x) == 0:
            raise Problem(422, "no inputs: send at least one")
        return raw.reshape(x.shape), x

    def decode_inputs(body: bytes, ctype: str) -> tuple[np.ndarray, torch.Tensor]:
        return preprocess(decode(body, ctype, max_request_inputs))

    def route_inline(raw: np.ndarray) -> _Routed:
        """A lone request, all on the event loop, as a bare endpoint would: one
        ``Bundle.route`` (the bundle's own last stage included when it answers)."""
        try:
            r = bundle.route(raw, run_last=oracle_url is None)
        except CascadeError as exc:
            raise Problem(422, str(exc)) from None
        if len(r) == 0:
            raise Problem(422, "no inputs: send at least one")
        return _Routed(x=None, raw=raw.reshape(len(r), *bundle.input_shape), output=r.output, stage=r.stage.tolist(),
                       score=r.score.tolist(), mflops=r.mflops.tolist(), pending=r.pending.numpy(), inline=True)

    def lone(batcher: MicroBatcher) -> bool:
        """No other request in the server, nor in the last ``CONCURRENT_HOLD_S``."""
        now = time.monotonic()
        if state["in_flight"] > 1 or not batcher.idle:
            state["concurrent_at"] = now
            return False
        return now - state["concurrent_at"] > CONCURRENT_HOLD_S

    async def predict_inputs(request: Request) -> list[dict]:
        ctype = content_type(request)
        check_content_type(ctype)  # before the body is read
        body = await read_body(request, max_bytes)
        batcher: MicroBatcher = state["batcher"]
        if len(body) > INLINE_DECODE_BYTES:  # a big body is parsed in a thread: other requests go on meanwhile
            raw, x = await anyio.to_thread.run_sync(decode_inputs, body, ctype)
            return await batcher.submit((raw, x), len(x))
        raw = decode(body, ctype, max_request_inputs)
        if raw.size <= INLINE_ROUTE_INPUTS * input_size and lone(batcher):
            for _ in range(3):  # let requests that already came in reach the server: then it is not alone
                await asyncio.sleep(0)
            if lone(batcher):
                routed = route_inline(raw)
                metrics.batch_size.observe(len(routed.stage))
                return await resolve([raw], routed)
        raw, x = preprocess(raw)
        return await batcher.submit((raw, x), len(x))

    @app.post("/predict", response_model=PredictResponse, dependencies=guarded,
              responses=error_responses(400, *([401] if auth else []), 413, 415, 422, 503),
              openapi_extra=request_body(tuple(bundle.input_shape), max_request_inputs),
              summary="route inputs down the cascade")
    async def predict(request: Request) -> Response:
        start = time.perf_counter()
        state["in_flight"] += 1
        try:
            predictions = await predict_inputs(request)
            response: Response = JSONResponse({"predictions": predictions})
        except Problem as p:
            response = error_response(p.status, str(p))
        except Exception as exc:  # routing failed: a 503 with the reason, never a 500
            log.exception("POST /predict failed")
            response = error_response(503, f"the server could not route the inputs: {type(exc).__name__}: {exc}")
        finally:
            state["in_flight"] -= 1
        metrics.requests.labels(str(response.status_code)).inc()
        if response.status_code == 200:
            metrics.observe_latency(time.perf_counter() - start)
        return response

    @app.get("/health", response_model=ServeHealth, summary="the bundle, and the oracle's circuit breaker")
    async def health() -> dict:
        return {"status": "ok", "bundle": bundle.name, "path": str(bundle.path), "stages": bundle.num_stages,
                "white_box": bundle.has_last_stage, "input_shape": list(bundle.input_shape),
                "oracle": None if oracle_url is None else {"url": oracle_url, "breaker": breaker.state.value}}

    @app.get("/metrics", response_class=PlainTextResponse, dependencies=guarded,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                              "description": "Prometheus text exposition"},
                        **error_responses(*([401] if auth else []))},
             summary="Prometheus metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(breaker), media_type=CONTENT_TYPE_LATEST)

    return app


def app_from_environment() -> FastAPI:
    """The app of one ``--workers`` process: :func:`create_app` with the settings the
    parent put in ``$CASCADE_SERVE_SETTINGS`` (JSON: ``bundle``, ``threads`` and
    :func:`create_app`'s keyword arguments)."""
    settings = json.loads(os.environ[SETTINGS_ENV])
    torch.set_num_threads(settings.pop("threads"))
    return create_app(Bundle.load(settings.pop("bundle")), **settings)
