"""The baseline of ``benchmarks/serve_load.py --vs-bare``: a bare FastAPI endpoint that
calls ``Bundle.route`` once per request (no batching, no limits, no thread hop), with the
same response as ``cascade serve``'s.

    python benchmarks/serve_bare.py BUNDLE --port 8002
"""

from __future__ import annotations

import argparse
import math
import socket
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import uvicorn  # noqa: E402
from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import JSONResponse  # noqa: E402

from cascade.deploy.bundle import Bundle  # noqa: E402


def bare_app(bundle: Bundle) -> FastAPI:
    app = FastAPI(title="bare Bundle.route")

    @app.post("/predict")
    async def predict(request: Request) -> JSONResponse:
        body = await request.json()
        r = bundle.route(np.asarray([body["input"]] if "input" in body else body["inputs"]))
        return JSONResponse({"predictions": [
            {"prediction": p, "stage": s, "score": q if math.isfinite(q) else None, "mflops": m, "fallback": False}
            for p, s, q, m in zip(bundle.predictions(r.output), r.stage.tolist(), r.score.tolist(),
                                  r.mflops.tolist())]})

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    return app


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundle")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8002)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    app = bare_app(Bundle.load(args.bundle))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # TCP_NODELAY, as cascade's
    sock.bind((args.host, args.port))
    sock.listen(2048)
    print(f"bare endpoint on http://{args.host}:{sock.getsockname()[1]}", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False)).run(sockets=[sock])


if __name__ == "__main__":
    main()
