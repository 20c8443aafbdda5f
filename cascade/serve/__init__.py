"""Serving a bundle over HTTP (``cascade serve``) and its big network as an oracle
(``cascade serve-oracle``).

``cascade serve`` answers ``POST /predict`` with the bundle's routed stages. A lone
request is routed at once; requests that overlap are micro-batched: an idle batcher
routes a request at once, and requests that arrive while it is busy share the next batch
(up to ``max_batch`` inputs). A batch expected to take under a millisecond is routed on
the event loop, a longer one on a worker thread (so a big network never holds the loop),
and the appealed inputs go to the last stage: a remote oracle
(``oracle_url``), else the bundle's own big network (white-box), else the little
network's answer. The oracle is called within a deadline, with bounded retries inside it
and a circuit breaker; while it fails, appealed inputs get the last routed stage's answer
marked ``fallback: true``. Every request is answered: a 4xx with one line for a malformed
or oversized input (bodies are read within ``--max-body-mb`` before any parsing, and big
ones parsed off the event loop), 401 without the bearer token when one is set, a 503 only
if routing itself fails, never a 500.

Modules: :mod:`~cascade.serve.app` (the serve app: HTTP), :mod:`~cascade.serve.service` (what
it does with a request: decoding, inline or batched routing, appealed inputs),
:mod:`~cascade.serve.oracle_app`
(the oracle app), :mod:`~cascade.serve.batcher`, :mod:`~cascade.serve.oracle` (the
oracle client, its circuit breaker and protocol), :mod:`~cascade.serve.body` (reading and
decoding bodies within limits), :mod:`~cascade.serve.schema` (the OpenAPI models),
:mod:`~cascade.serve.metrics`, :mod:`~cascade.serve.harness` (sockets, uvicorn, child
processes).

fastapi, uvicorn, httpx and prometheus_client are imported here only; ``cascade`` itself
never imports this package.
"""

from cascade.serve.app import SETTINGS_ENV, TOKEN_ENV, app_from_environment, create_app
from cascade.serve.batcher import MicroBatcher
from cascade.serve.body import MAX_ABS_INPUT, NPY_CONTENT_TYPE, NPY_MAX_HEADER
from cascade.serve.harness import ServerProcess, bind_socket, run_server, server_url
from cascade.serve.metrics import LATENCY_QUANTILES
from cascade.serve.oracle import BreakerState, CircuitBreaker, OracleClient, OracleUnavailable
from cascade.serve.oracle_app import create_oracle_app

__all__ = [
    "LATENCY_QUANTILES", "MAX_ABS_INPUT", "NPY_CONTENT_TYPE", "NPY_MAX_HEADER", "SETTINGS_ENV", "TOKEN_ENV",
    "BreakerState", "CircuitBreaker", "MicroBatcher", "OracleClient", "OracleUnavailable", "ServerProcess",
    "app_from_environment", "bind_socket", "create_app", "create_oracle_app", "run_server",
    "server_url",
]
