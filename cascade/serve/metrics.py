"""The Prometheus metrics of ``cascade serve``, in a registry of their own (one per app)."""

from __future__ import annotations

import math
from collections import deque

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import Enum as EnumMetric

from cascade.serve.oracle import BreakerState, CircuitBreaker

#: the latency quantiles ``/metrics`` reports over the recent window
LATENCY_QUANTILES = (0.5, 0.9, 0.99)


class ServeMetrics:
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
