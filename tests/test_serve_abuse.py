"""``cascade serve`` under abuse (issue 16, "The server holds" / "Fast at any load"): body
limits enforced while reading, ``.npy`` headers checked before anything is allocated, big
bodies parsed off the event loop, depth and format errors as one-line 4xx with no
traceback, the oracle deadline covering its retries, bearer-token auth, and a batcher
that routes at once when idle. Loopback only; every wait is bounded."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import struct
import threading
import time

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

import cascade.serve.service as serve_service
from cascade.deploy.bundle import Bundle
from cascade.serve import (
    NPY_MAX_HEADER,
    CircuitBreaker,
    MicroBatcher,
    OracleClient,
    OracleUnavailable,
    ServerProcess,
    create_app,
    create_oracle_app,
)
from tests.test_serve import _npy

NPY = {"content-type": "application/x-npy"}
ONE = {"input": [[0] * 8] * 8}


def _npy_with_header(header: str) -> bytes:
    """A version-1.0 .npy preamble with ``header`` (padded as numpy pads it), no data."""
    text = header.encode("latin1")
    pad = 64 - (10 + len(text) + 1) % 64
    text += b" " * pad + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text


# -- format errors: one line, a 4xx, no traceback -----------------------------------------


@pytest.mark.parametrize("body, headers, status, message", [
    (b'{"input":' + b"[" * 1000 + b"1" + b"]" * 1000 + b"}", None, 400,
     "body: JSON nested too deep; inputs are nested lists at most 32 deep"),
    (b"[" * 100_000, None, 400, "body: JSON nested 100000 deep"),
    (b'{"input": 1' + b"0" * 5000 + b"}", None, 400, "not valid JSON (Exceeds the limit (4300 digits)"),
    (json.dumps({"inputs": [ONE["input"]] * 4097}).encode(), None, 422, "4097 inputs in one request: send at most 4096"),
    (json.dumps({**ONE, "extra": 1}).encode(), None, 400, "unknown key 'extra'"),
    (json.dumps({**ONE, "inputs": [ONE["input"]]}).encode(), None, 400, 'give {"input": [...]}'),
    (b'{"input": [[true, 1, 2, 3, 4, 5, 6, 7]]}', None, 422, "not a numeric array (true, false and null"),
    (b'{"input": [[null, 1, 2, 3, 4, 5, 6, 7]]}', None, 422, "not a numeric array (true, false and null"),
    (json.dumps({"input": [[[1, 2, 3, 4, 5, 6, 7, "8"]] * 8]}).encode(), None, 422, "strings are not numbers"),
    (json.dumps({"input": [[1e31] * 8] * 8}).encode(), None, 422, "values beyond ±1e+30"),
    (_npy_with_header("{'descr': '<f4', 'fortran_order': False, 'shape': (10000000000000, 1, 8, 8), }"), NPY, 422,
     "10000000000000 inputs in one request: send at most 4096"),
    (_npy_with_header("{'descr': '<f4', 'fortran_order': False, 'shape': (3, 1, 8, 8), }") + b"\0" * 12, NPY, 400,
     "claims shape [3, 1, 8, 8] of float32 (768 bytes) but 12 bytes follow it"),
    (_npy_with_header("{'descr': '<f4', 'fortran_order': False, 'shape': (1,), " + " " * NPY_MAX_HEADER + "}"), NPY,
     400, "not a .npy array"),
    (_npy_with_header("{'descr': '|O', 'fortran_order': False, 'shape': (1,), }") + b"\0" * 8, NPY, 422,
     "dtype object is not a real number type"),
    (b"1,2,3", {"content-type": "text/csv"}, 415, "send application/json or application/x-npy"),
])
def test_a_malformed_body_is_a_one_line_4xx_with_no_traceback(bundles, body, headers, status, message, caplog):
    with caplog.at_level(logging.DEBUG, logger="cascade"), \
            TestClient(create_app(Bundle.load(bundles["white_box"]))) as client:
        r = client.post("/predict", content=body, headers=headers or {"content-type": "application/json"})
        assert r.status_code == status, r.text
        detail = r.json()["detail"]
        assert message in detail and "\n" not in detail and len(detail) < 300, detail
        assert client.post("/predict", json=ONE).status_code == 200  # the server goes on
    assert not [rec for rec in caplog.records if rec.exc_info], caplog.text


def test_npy_bodies_in_every_byte_order_and_layout_decode_to_the_same_answers(bundles, digits_raw):
    raw = digits_raw[:6].astype(np.float32)
    with TestClient(create_app(Bundle.load(bundles["white_box"]))) as client:
        answers = [client.post("/predict", content=_npy(a), headers=NPY).json()["predictions"]
                   for a in (raw, raw.astype(">f4"), np.asfortranarray(raw), raw.astype(np.uint8))]
    assert all(a == answers[0] for a in answers[1:]) and len(answers[0]) == 6


# -- body size: refused while it is read ---------------------------------------------------


def test_a_body_over_the_limit_is_a_413_from_its_content_length_or_while_it_streams(bundles):
    app = create_app(Bundle.load(bundles["white_box"]), max_body_mb=0.01)  # 10,485 bytes
    sent = {"chunks": 0}

    def chunks():  # no Content-Length: chunked, counted as it is read
        for _ in range(100):
            sent["chunks"] += 1
            yield b" " * 4096

    with TestClient(app) as client:
        declared = client.post("/predict", content=b" " * 20_000, headers={"content-type": "application/json"})
        streamed = client.post("/predict", content=chunks(), headers={"content-type": "application/json"})
        under = client.post("/predict", json={"inputs": [ONE["input"]] * 20})  # ~3.6 kB
    assert declared.status_code == 413 and declared.json()["detail"] == \
        "body of 20000 bytes: send at most 0.01 MB (--max-body-mb)"
    assert streamed.status_code == 413 and "body over 10485 bytes" in streamed.json()["detail"]
    assert under.status_code == 200 and len(under.json()["predictions"]) == 20


def _post_raw(url: str, headers: str, body_chunks, pause_s: float = 0.0) -> tuple[bytes, int]:
    """POST over a raw socket; stops sending once the server answers. (the answer, bytes sent)"""
    host, port = url.removeprefix("http://").split(":")
    sent = 0
    with socket.create_connection((host, int(port)), timeout=20) as s:
        s.sendall(headers.encode())
        s.settimeout(pause_s or 0.05)
        for chunk in body_chunks:
            try:
                if s.recv(1, socket.MSG_PEEK):
                    break  # the server answered already
            except (TimeoutError, BlockingIOError):
                pass
            try:
                s.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
        s.settimeout(20)
        answer = b""
        while chunk := s.recv(65536):  # the server closes the connection after a 413
            answer += chunk
        return answer, sent


@pytest.mark.slow
def test_the_server_process_refuses_a_huge_body_at_once_and_asks_for_its_token(bundles, digits_raw):
    """A real server (uvicorn): a 500 MB Content-Length is refused before the body is
    sent; a chunked body is refused after about the limit; the token comes from
    $CASCADE_TOKEN; /health stays open; --max-request-inputs bounds a request's inputs."""
    with ServerProcess(["serve", str(bundles["white_box"]), "--max-body-mb", "1", "--max-request-inputs", "2"],
                       env={"CASCADE_TOKEN": "s3cret"}) as server:
        auth = "Authorization: Bearer s3cret\r\n"
        head = f"POST /predict HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\n"
        answer, sent = _post_raw(server.url, head + f"Content-Length: {500 * 2 ** 20}\r\n\r\n",
                                 (b" " * 65536 for _ in range(8000)))
        assert answer.startswith(b"HTTP/1.1 413") and b"send at most 1 MB" in answer
        assert sent < 8 * 2 ** 20, sent  # not 500 MB
        chunk = b" " * 65536
        answer, sent = _post_raw(server.url, head + "Transfer-Encoding: chunked\r\n\r\n",
                                 (b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(8000)))
        assert answer.startswith(b"HTTP/1.1 413") and b"body over 1048576 bytes" in answer
        assert sent < 8 * 2 ** 20, sent
        body = {"inputs": digits_raw[:2].tolist()}
        assert httpx.post(f"{server.url}/predict", json=body, timeout=20).status_code == 401
        ok = httpx.post(f"{server.url}/predict", json=body, timeout=20, headers={"authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and len(ok.json()["predictions"]) == 2
        three = httpx.post(f"{server.url}/predict", json={"inputs": digits_raw[:3].tolist()}, timeout=20,
                           headers={"authorization": "Bearer s3cret"})
        assert three.status_code == 422 and three.json() == {"detail": "3 inputs in one request: send at most 2"}
        assert httpx.get(f"{server.url}/health", timeout=20).status_code == 200
        assert server.proc.poll() is None


# -- parsing off the event loop -------------------------------------------------------------


def test_a_big_body_is_parsed_off_the_event_loop_while_a_small_request_is_answered(bundles, monkeypatch):
    """The big body's decoding is made to take 1.5 s (in whatever thread runs it): a small
    request sent meanwhile is answered long before, so the decoding did not hold the loop."""
    real = serve_service.decode
    where: list[bool] = []

    def slow_decode(body, ctype, max_inputs, **kw):
        if len(body) > serve_service.INLINE_DECODE_BYTES:
            try:
                asyncio.get_running_loop()
                where.append(True)   # on the event loop
            except RuntimeError:
                where.append(False)  # in a worker thread
            time.sleep(1.5)
        return real(body, ctype, max_inputs, **kw)

    monkeypatch.setattr(serve_service, "decode", slow_decode)
    app = create_app(Bundle.load(bundles["white_box"]))
    big = json.dumps({"inputs": [ONE["input"]] * 400}).encode()  # ~80 kB

    async def go():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=30) as client:
                t0 = time.perf_counter()
                slow = asyncio.create_task(client.post("/predict", content=big,
                                                       headers={"content-type": "application/json"}))
                await asyncio.sleep(0.2)
                small = await client.post("/predict", json=ONE)
                small_done = time.perf_counter() - t0
                return await slow, small, small_done, time.perf_counter() - t0

    slow, small, small_done, all_done = asyncio.run(go())
    assert slow.status_code == 200 and len(slow.json()["predictions"]) == 400 and small.status_code == 200
    assert where == [False]
    assert small_done < 1.0 < 1.5 <= all_done, (small_done, all_done)


# -- the oracle deadline ---------------------------------------------------------------------


def test_the_oracle_timeout_is_the_whole_deadline_retries_included():
    """A slow oracle (2 s per answer), --oracle-timeout 0.5, 2 retries: refused after
    about 0.5 s, not 3 x 0.5 s plus backoff; a fast failure is retried within the deadline."""
    calls = {"n": 0}

    async def slow(request: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        await asyncio.sleep(2.0)
        return httpx.Response(200, json={"outputs": [[1, 2]]})

    async def go(handler):
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            oracle = OracleClient("http://oracle", client, num_outputs=2, timeout_s=0.5, retries=2, backoff_s=0.05,
                                  breaker=CircuitBreaker(10, 60.0))
            t0 = time.perf_counter()
            try:
                return await oracle.predict(np.zeros((1, 1))), time.perf_counter() - t0
            except OracleUnavailable as exc:
                return exc, time.perf_counter() - t0

    result, seconds = asyncio.run(go(slow))
    assert isinstance(result, OracleUnavailable) and 0.45 < seconds < 0.9, (result, seconds)
    assert calls["n"] == 1  # no time was left for a retry
    replies = iter([500, 200])

    async def flaky(request):
        status = next(replies)
        return httpx.Response(status, json={"outputs": [[1, 2]]})

    result, seconds = asyncio.run(go(flaky))
    assert result.tolist() == [[1.0, 2.0]] and seconds < 0.5


# -- auth ------------------------------------------------------------------------------------


def test_a_bearer_token_guards_predict_and_metrics_and_health_stays_open(bundles):
    bundle = Bundle.load(bundles["white_box"])
    with TestClient(create_app(bundle, token="s3cret")) as client:
        missing = client.post("/predict", json=ONE)
        wrong = client.post("/predict", json=ONE, headers={"authorization": "Bearer s3cre"})
        basic = client.post("/predict", json=ONE, headers={"authorization": "Basic czNjcmV0"})
        right = client.post("/predict", json=ONE, headers={"authorization": "Bearer s3cret"})
        metrics = client.get("/metrics")
        metrics_ok = client.get("/metrics", headers={"authorization": "Bearer s3cret"})
        health = client.get("/health")
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert "Authorization: Bearer <token>" in missing.json()["detail"]
    assert wrong.status_code == 401 and wrong.json()["detail"] == "wrong bearer token"
    assert basic.status_code == 401
    assert right.status_code == 200 and len(right.json()["predictions"]) == 1
    assert metrics.status_code == 401 and metrics_ok.status_code == 200 and health.status_code == 200
    with TestClient(create_oracle_app(bundle, token="s3cret")) as client:
        assert client.post("/predict", json={"inputs": [ONE["input"]]}).status_code == 401
        assert client.post("/predict", json={"inputs": [ONE["input"]]},
                           headers={"authorization": "Bearer s3cret"}).status_code == 200


# -- the micro-batcher: at once when idle, batches while busy ---------------------------------


def test_an_idle_batcher_routes_at_once_and_batches_only_while_it_is_busy():
    """The first request is routed alone and at once (no wait); three more sent while it
    is being routed share the next batch."""
    batches: list[list[str]] = []
    release = threading.Event()

    async def route(payloads):
        batches.append(list(payloads))
        if len(batches) == 1:
            await asyncio.to_thread(release.wait, 10)  # busy until the others are queued
        return payloads

    async def resolve(payloads, routed):
        return [p.upper() for p in routed]

    async def go():
        batcher = MicroBatcher(route, resolve, max_batch=8)  # max_wait_s: 0 by default
        batcher.start()
        try:
            assert batcher.idle
            t0 = time.perf_counter()
            first = asyncio.create_task(batcher.submit("a", 1))
            while not batches:
                await asyncio.sleep(0.001)
            started = time.perf_counter() - t0
            assert not batcher.idle
            rest = [asyncio.create_task(batcher.submit(p, 1)) for p in "bcd"]
            await asyncio.sleep(0.05)
            release.set()
            return started, await asyncio.wait_for(asyncio.gather(first, *rest), 10)
        finally:
            await batcher.stop()

    started, answers = asyncio.run(go())
    assert batches == [["a"], ["b", "c", "d"]]
    assert answers == [["A"], ["B"], ["C"], ["D"]]
    assert started < 0.05


def test_a_lone_request_is_routed_on_the_event_loop_and_concurrent_ones_are_batched(bundles, digits_raw):
    """In-process, one client: each request is routed inline (a batch of 1 each); 16 sent
    at once share fewer batches than requests; every answer is the bundle's own."""
    bundle = Bundle.load(bundles["white_box"])
    raw = digits_raw[:16]
    expected = bundle.predictions(bundle.route(raw).output)
    app = create_app(bundle)

    async def go():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=30) as client:
                one = [(await client.post("/predict", json={"input": x.tolist()})).json() for x in raw[:4]]
                many = await asyncio.gather(*(client.post("/predict", json={"input": x.tolist()}) for x in raw))
                text = (await client.get("/metrics")).text
                return one, [r.json() for r in many], text

    one, many, text = asyncio.run(go())
    assert [o["predictions"][0]["prediction"] for o in one] == expected[:4]
    assert [m["predictions"][0]["prediction"] for m in many] == expected
    from benchmarks.serve_load import metric

    batches = metric(text, "cascade_batch_size_count")
    assert 4 + 1 <= batches < 4 + 16, text  # the 16 concurrent ones were batched
    assert metric(text, "cascade_inputs_total") == 20


@pytest.mark.slow
def test_serve_with_two_worker_processes_answers_every_request(bundles, digits_raw):
    with ServerProcess(["serve", str(bundles["white_box"]), "--workers", "2"]) as server:
        with httpx.Client(timeout=30) as client:
            answers = [client.post(f"{server.url}/predict", json={"inputs": digits_raw[i:i + 2].tolist()})
                       for i in range(0, 40, 2)]
    assert [a.status_code for a in answers] == [200] * 20
    assert all(len(a.json()["predictions"]) == 2 for a in answers)
