"""The ``cascade serve-oracle`` app: a bundle's big network behind the oracle protocol (see
:mod:`cascade.serve.oracle`), and which bundle it serves."""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from pathlib import Path

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from cascade.deploy.bundle import Bundle
from cascade.core.errors import CascadeError
from cascade.runs.reader import read_points
from cascade.serve.app import bearer_check, error_response
from cascade.serve.body import Problem, check_content_type, content_type, decode, read_body
from cascade.serve.schema import OracleHealth, error_responses, oracle_response_model, request_body

log = logging.getLogger("cascade.serve")


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


@contextlib.contextmanager
def oracle_bundle(source: str | Path):
    """The bundle ``serve-oracle`` serves: ``source`` itself when it is a bundle, else a
    white-box bundle exported from the run folder ``source`` into a temporary folder
    (removed on exit).

    Yields:
        The loaded :class:`~cascade.deploy.bundle.Bundle`.

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
    from cascade.deploy.export import export_bundle

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
    points = run / "points.csv"
    if not points.is_file():
        raise CascadeError(f"{points}: not found; is {run} the output folder of a finished `cascade run`?")
    p = read_points(run)
    p = p[(p["mode"] == "white_box") & (p["selection"] == "target_ad")]
    if p.empty:
        raise CascadeError(f"{points}: no white_box operating point to export the big network from")
    p = p.assign(_val=(p["threshold_source"] != "val")).sort_values("_val", kind="stable")
    p = p.drop_duplicates("method")
    return [(str(m), float(t), str(s)) for m, t, s in zip(p["method"], p["target_ad"], p["threshold_source"])]
