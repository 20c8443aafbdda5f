"""The ``cascade serve-oracle`` app: a bundle's big network behind the oracle protocol (see
:mod:`cascade.serve.oracle`). Which bundle it serves (a run folder's, exported) is
:func:`cascade.deploy.export.oracle_bundle`'s."""

from __future__ import annotations

import logging

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from cascade.deploy.bundle import Bundle
from cascade.core.errors import CascadeError
from cascade.serve.app import bearer_check, error_response
from cascade.serve.body import Problem, check_content_type, content_type, decode, read_body
from cascade.serve.schema import OracleHealth, error_responses, oracle_response_model, request_body

log = logging.getLogger(__name__)


def create_oracle_app(bundle: Bundle, *, max_request_inputs: int = 65536, max_body_mb: float = 256.0,
                      token: str | None = None) -> FastAPI:
    """The ``cascade serve-oracle`` app: the bundle's big network behind the oracle
    protocol (``POST /predict``), and ``GET /health``.

    Args:
        bundle: a white-box bundle.
        max_request_inputs: the most inputs one request may hold (422 above).
        max_body_mb: the largest body read (413 above, before anything is parsed).
        token: a bearer token ``/predict`` requires (None: no auth).

    Raises:
        CascadeError: a black-box bundle (it holds no big network).
    """
    if not bundle.has_last_stage:
        raise CascadeError(f"{bundle.path}: a black-box bundle holds no big network to serve; give a white-box "
                           "bundle or the run folder")
    if not 0 < max_body_mb < float("inf"):
        raise CascadeError(f"max body MB {max_body_mb}: must be positive")
    max_bytes = int(max_body_mb * 2 ** 20)
    limiter = anyio.CapacityLimiter(1)  # one batch of torch at a time, off the event loop

    app = FastAPI(title="cascade serve-oracle",
                  description=f"The big network of bundle {bundle.name!r} as an oracle of `cascade serve`: "
                              f"inputs of shape {list(bundle.input_shape)}, {len(bundle.output_names)} outputs.")
    auth = bearer_check(token)

    def outputs(body: bytes, ctype: str) -> list:
        raw = decode(body, ctype, max_request_inputs, batch_only=True)
        try:
            return bundle.run_last(bundle.preprocess(raw)).tolist()
        except CascadeError as exc:
            raise Problem(422, str(exc)) from None

    @app.post("/predict", response_model=oracle_response_model(len(bundle.output_names)),
              dependencies=[auth] if auth is not None else [],
              responses=error_responses(400, *([401] if auth else []), 413, 415, 422, 503),
              openapi_extra=request_body(tuple(bundle.input_shape), max_request_inputs, batch_only=True,
                                         name="Oracle"),
              summary="the big network's outputs for a batch of raw inputs")
    async def predict(request: Request) -> Response:
        try:
            ctype = content_type(request)
            check_content_type(ctype)  # before the body is read
            body = await read_body(request, max_bytes)  # the same bodies as ``cascade serve``'s
            out = await anyio.to_thread.run_sync(outputs, body, ctype, limiter=limiter)
            return JSONResponse({"outputs": out})
        except Problem as p:
            return error_response(p.status, str(p))
        except Exception as exc:  # never a 500
            log.exception("POST /predict failed")
            return error_response(503, f"the oracle failed: {type(exc).__name__}: {exc}")

    @app.get("/health", response_model=OracleHealth, summary="the bundle whose big network answers")
    async def health() -> dict:
        return {"status": "ok", "bundle": bundle.name, "path": str(bundle.path), "role": "oracle",
                "input_shape": list(bundle.input_shape), "outputs": len(bundle.output_names)}

    return app
