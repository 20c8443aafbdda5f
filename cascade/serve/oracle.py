"""The oracle client of ``cascade serve``: a circuit breaker, and an HTTP client with a
deadline, bounded retries and backoff inside it.

The oracle protocol (any service can implement it; ``cascade serve-oracle`` does)::

    POST {oracle_url}/predict   {"inputs": [B, *input_shape] raw inputs, nested lists}
    -> 200                      {"outputs": [B, D] the big network's raw outputs}
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import time
from collections.abc import Callable

import httpx
import numpy as np
import torch

from cascade.core.errors import CascadeError
from cascade.serve.body import one_line

log = logging.getLogger(__name__)


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


# -- the oracle client -------------------------------------------------------------------


class OracleUnavailable(Exception):
    """The oracle did not answer (refused by the breaker, or every attempt failed in time)."""


class OracleClient:
    """Calls a remote oracle (the protocol in this module's docstring) within a deadline,
    with bounded retries and exponential backoff inside it, and a :class:`CircuitBreaker`.

    ``timeout_s`` is the whole time one call of :meth:`predict` may take: each attempt gets
    what is left of it, a retry starts only if time is left after its backoff, and a slow
    answer is cut off at the deadline.

    Args:
        url: the oracle's base URL; requests go to ``{url}/predict``.
        client: the ``httpx.AsyncClient`` to send with.
        num_outputs: D, the width of each output row.
        timeout_s: the deadline of one call, retries and backoff included.
        retries: further attempts after a failed one.
        backoff_s: the wait before the first retry (doubled each retry).
        breaker: the circuit breaker (default: 3 failures, 5 s cool-down).
        token: a bearer token sent to the oracle (its ``--token``), or None.
        on_call, on_failure: called on each attempt and each failed attempt (metrics).
    """

    def __init__(self, url: str, client: httpx.AsyncClient, num_outputs: int, *, timeout_s: float = 2.0,
                 retries: int = 2, backoff_s: float = 0.05, breaker: CircuitBreaker | None = None,
                 token: str | None = None,
                 on_call: Callable[[], None] | None = None, on_failure: Callable[[], None] | None = None):
        self.url = url.rstrip("/") + "/predict"
        self.client, self.num_outputs = client, num_outputs
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self.breaker = breaker or CircuitBreaker()
        self._headers = {"content-type": "application/json"}
        if token:
            self._headers["authorization"] = f"Bearer {token}"
        self._on_call, self._on_failure = on_call or (lambda: None), on_failure or (lambda: None)

    async def predict(self, raw: np.ndarray) -> torch.Tensor:
        """The oracle's outputs ``[B, D]`` for raw inputs ``[B, ...]``, within ``timeout_s``.

        Raises:
            OracleUnavailable: the breaker is open, the oracle refused the inputs (4xx),
                or no attempt succeeded before the deadline (timeout, connection, 5xx, a
                malformed answer).
        """
        body = json.dumps({"inputs": raw.tolist()}).encode()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        last = "the circuit breaker is open"
        for attempt in range(self.retries + 1):
            left = deadline - loop.time()
            if left <= 0:
                raise OracleUnavailable(f"no answer within the {self.timeout_s:g} s deadline ({last})")
            if not self.breaker.allow():
                raise OracleUnavailable(last)
            self._on_call()
            try:
                # wait_for: httpx's timeout is per read / write, a slow drip could outlast it
                outputs = await asyncio.wait_for(self._attempt(body, len(raw), left), left)
            except _Refused as exc:
                self._on_failure()
                self.breaker.record_success()  # the oracle is up, it refuses these inputs: no retry
                raise OracleUnavailable(str(exc)) from None
            except (httpx.HTTPError, _BadAnswer, asyncio.TimeoutError) as exc:
                self._on_failure()
                self.breaker.record_failure()
                last = f"{type(exc).__name__}: {one_line(str(exc))}" if str(exc) else type(exc).__name__
                wait = self.backoff_s * 2 ** attempt
                if attempt < self.retries and deadline - loop.time() > wait:
                    await asyncio.sleep(wait)
                continue
            self.breaker.record_success()
            return outputs
        raise OracleUnavailable(last)

    async def _attempt(self, body: bytes, rows: int, timeout: float) -> torch.Tensor:
        response = await self.client.post(self.url, content=body, timeout=timeout, headers=self._headers)
        if 400 <= response.status_code < 500:
            raise _Refused(f"the oracle refused the inputs: {response.status_code} {one_line(response.text)}")
        if response.status_code != 200:
            raise _BadAnswer(f"HTTP {response.status_code}")
        return self._outputs(response, rows)

    def _outputs(self, response: httpx.Response, rows: int) -> torch.Tensor:
        try:
            outputs = torch.tensor(response.json()["outputs"], dtype=torch.float32)
        except (ValueError, KeyError, TypeError) as exc:
            raise _BadAnswer(f"not {{'outputs': [[...], ...]}} ({one_line(str(exc))})") from None
        if tuple(outputs.shape) != (rows, self.num_outputs) or not torch.isfinite(outputs).all():
            raise _BadAnswer(f"outputs of shape {list(outputs.shape)} for {rows} inputs of {self.num_outputs} "
                             "outputs each, or non-finite values")
        return outputs


class _BadAnswer(Exception):
    """An oracle answer that is not the protocol's: counts as a failed attempt."""


class _Refused(Exception):
    """The oracle answered 4xx: it is up, and refuses these inputs."""
