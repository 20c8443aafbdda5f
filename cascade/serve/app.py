"""The ``cascade serve`` app: ``POST /predict``, ``GET /health``, ``GET /metrics``."""

from __future__ import annotations

import hmac
import json
import logging
import math
import os
import time

import torch
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST

from cascade.deploy.bundle import Bundle
from cascade.core.errors import CascadeError
from cascade.serve.body import Problem, one_line
from cascade.serve.metrics import ServeMetrics
from cascade.serve.oracle import CircuitBreaker
from cascade.serve.schema import (
    PredictResponse,
    ServeHealth,
    error_responses,
    request_body,
)
from cascade.serve.service import RoutingService

log = logging.getLogger(__name__)

#: the environment variable a bearer token may come from (``--token`` wins)
TOKEN_ENV = "CASCADE_TOKEN"
#: the environment variable ``--workers`` passes each worker process its settings in
SETTINGS_ENV = "CASCADE_SERVE_SETTINGS"


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
    _check_options(at_least=(("max batch", max_batch, 1), ("max request inputs", max_request_inputs, 1),
                             ("latency window", latency_window, 1), ("oracle retries", oracle_retries, 0)),
                   max_wait_ms=max_wait_ms, positive=(("oracle timeout", oracle_timeout_s), ("max body MB", max_body_mb)),
                   oracle_url=oracle_url)
    breaker = CircuitBreaker(breaker_failures, breaker_cooldown_s) if oracle_url else None
    if oracle_url is None and not bundle.has_last_stage:
        log.warning("%s is a black-box bundle and no --oracle-url was given: appealed inputs get the little "
                    "network's answer, marked fallback", bundle.path)
    metrics = ServeMetrics(max_batch, latency_window)
    service = RoutingService(bundle, metrics, oracle_url=oracle_url, oracle_timeout_s=oracle_timeout_s,
                             oracle_retries=oracle_retries, oracle_token=oracle_token, breaker=breaker,
                             max_batch=max_batch, max_wait_ms=max_wait_ms, max_request_inputs=max_request_inputs,
                             max_body_mb=max_body_mb)

    app = FastAPI(title="cascade serve", lifespan=service.lifespan,
                  description=f"The routed cascade of bundle {bundle.name!r}: inputs of shape "
                              f"{list(bundle.input_shape)}.")
    auth = bearer_check(token)
    guarded = [auth] if auth is not None else []

    @app.post("/predict", response_model=PredictResponse, dependencies=guarded,
              responses=error_responses(400, *([401] if auth else []), 413, 415, 422, 503),
              openapi_extra=request_body(tuple(bundle.input_shape), max_request_inputs),
              summary="route inputs down the cascade")
    async def predict(request: Request) -> Response:
        start = time.perf_counter()
        service.in_flight += 1
        try:
            predictions = await service.predict(request)
            response: Response = JSONResponse({"predictions": predictions})
        except Problem as p:
            response = error_response(p.status, str(p))
        except Exception as exc:  # routing failed: a 503 with the reason, never a 500
            log.exception("POST /predict failed")
            response = error_response(503, f"the server could not route the inputs: {type(exc).__name__}: {exc}")
        finally:
            service.in_flight -= 1
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


def _check_options(*, at_least: tuple, max_wait_ms: float, positive: tuple, oracle_url: str | None) -> None:
    """Raises:
        CascadeError: a ``(name, value, least)`` of ``at_least`` below its least, a negative
            wait, a ``(name, value)`` of ``positive`` not positive and finite, an oracle URL
            that is not http(s)."""
    for name, value, least in at_least:
        if value < least:
            raise CascadeError(f"{name} {value}: must be at least {least}")
    if not 0 <= max_wait_ms < math.inf:
        raise CascadeError(f"max wait {max_wait_ms} ms: must be at least 0")
    for name, value in positive:
        if not 0 < value < math.inf:
            raise CascadeError(f"{name} {value}: must be positive")
    if oracle_url is not None and not oracle_url.startswith(("http://", "https://")):
        raise CascadeError(f"oracle URL {oracle_url!r}: give http://HOST:PORT (the server of `cascade serve-oracle`)")


def app_from_environment() -> FastAPI:
    """The app of one ``--workers`` process: :func:`create_app` with the settings the
    parent put in ``$CASCADE_SERVE_SETTINGS`` (JSON: ``bundle``, ``threads`` and
    :func:`create_app`'s keyword arguments)."""
    settings = json.loads(os.environ[SETTINGS_ENV])
    torch.set_num_threads(settings.pop("threads"))
    return create_app(Bundle.load(settings.pop("bundle")), **settings)
