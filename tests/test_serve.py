"""``cascade serve`` and ``cascade serve-oracle``: the circuit breaker and the micro-batcher
on their own, the app in-process (inputs, malformed inputs, an unreachable oracle), the
CLI's one-line errors, and the two servers as processes with the oracle killed mid-stream.
Loopback only; every wait is bounded."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import socket
import subprocess
import sys

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from benchmarks.serve_load import metric, send_requests
from cascade.deploy.bundle import Bundle
from cascade.cli import main
from cascade.core.errors import CascadeError
from cascade.deploy.export import oracle_bundle
from cascade.serve import (
    BreakerState,
    CircuitBreaker,
    MicroBatcher,
    OracleClient,
    OracleUnavailable,
    ServerProcess,
    create_app,
    create_oracle_app,
)
from tests.conftest import REPO
from tests.test_new_user import one_line_error

# -- fixtures ----------------------------------------------------------------------------


def _free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the circuit breaker -----------------------------------------------------------------


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_breaker_opens_after_n_consecutive_failures_and_one_probe_decides_after_the_cooldown():
    clock = FakeClock()
    b = CircuitBreaker(failure_threshold=3, cooldown_s=10.0, clock=clock)
    assert b.state is BreakerState.CLOSED and b.allow()
    b.record_failure()
    b.record_failure()
    assert b.state is BreakerState.CLOSED and b.allow()  # 2 < 3
    b.record_failure()
    assert b.state is BreakerState.OPEN and not b.allow()
    clock.now += 9.9
    assert b.state is BreakerState.OPEN and not b.allow()  # still cooling down
    clock.now += 0.1
    assert b.state is BreakerState.HALF_OPEN
    assert b.allow()            # the probe
    assert not b.allow()        # nobody else while it is in flight
    b.record_failure()          # the probe failed: open for another cool-down
    assert b.state is BreakerState.OPEN and not b.allow()
    clock.now += 10.0
    assert b.allow()            # the next probe
    b.record_success()
    assert b.state is BreakerState.CLOSED and b.allow() and b.allow()


def test_a_success_resets_the_breakers_count_of_consecutive_failures():
    b = CircuitBreaker(failure_threshold=2, cooldown_s=1.0, clock=FakeClock())
    for _ in range(3):
        b.record_failure()
        b.record_success()
    assert b.state is BreakerState.CLOSED
    b.record_failure()
    b.record_failure()
    assert b.state is BreakerState.OPEN
    with pytest.raises(CascadeError, match="at least 1"):
        CircuitBreaker(failure_threshold=0)


# -- the micro-batcher -------------------------------------------------------------------


def test_the_micro_batcher_splits_answers_back_per_request_within_max_batch():
    """Five requests of 1, 2, 3, 1, 2 rows with max_batch 4: batches [1, 2] (the 3 does not
    fit), [3, 1], [2]; each request gets back its own rows, in order."""
    batches: list[list[int]] = []

    async def route(payloads):
        batches.append([len(p) for p in payloads])
        return [row for p in payloads for row in p]

    async def resolve(payloads, rows):
        return [f"answer to {row}" for row in rows]

    async def go():
        batcher = MicroBatcher(route, resolve, max_batch=4, max_wait_s=0.05)
        batcher.start()
        requests = [[f"r{i}.{j}" for j in range(n)] for i, n in enumerate([1, 2, 3, 1, 2])]
        try:
            return requests, await asyncio.wait_for(
                asyncio.gather(*(batcher.submit(r, len(r)) for r in requests)), timeout=10)
        finally:
            await batcher.stop()

    requests, answers = asyncio.run(go())
    assert answers == [[f"answer to {row}" for row in r] for r in requests]
    assert batches == [[1, 2], [3, 1], [2]]


def test_a_failed_batch_answers_each_of_its_requests_with_the_error_and_the_batcher_goes_on():
    calls = {"route": 0}

    async def route(payloads):
        calls["route"] += 1
        if calls["route"] == 1:
            raise RuntimeError("route broke")
        return payloads

    async def resolve(payloads, routed):
        if any(p == "bad resolve" for p in payloads):
            raise ValueError("resolve broke")
        return [p.upper() for p in payloads]

    async def go():
        batcher = MicroBatcher(route, resolve, max_batch=2, max_wait_s=0.05)
        batcher.start()
        try:
            first = await asyncio.gather(batcher.submit("a", 1), batcher.submit("b", 1), return_exceptions=True)
            second = await asyncio.gather(batcher.submit("bad resolve", 1), return_exceptions=True)
            third = await asyncio.wait_for(batcher.submit("c", 1), timeout=10)
            return first, second, third
        finally:
            await batcher.stop()

    first, second, third = asyncio.run(go())
    assert [str(e) for e in first] == ["route broke", "route broke"]
    assert isinstance(second[0], ValueError)
    assert third == ["C"]


# -- the oracle client -------------------------------------------------------------------


def _oracle_client(handler, **kw) -> tuple[OracleClient, dict]:
    counts = {"calls": 0, "failures": 0}
    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    oracle = OracleClient("http://oracle", client, num_outputs=2, backoff_s=0.0,
                          on_call=lambda: counts.__setitem__("calls", counts["calls"] + 1),
                          on_failure=lambda: counts.__setitem__("failures", counts["failures"] + 1), **kw)
    return oracle, counts


def test_the_oracle_client_retries_a_failure_and_opens_the_breaker_on_consecutive_ones():
    replies = iter([503, 503, 200])

    def flaky(request: httpx.Request) -> httpx.Response:
        assert json.loads(request.content) == {"inputs": [[1.0], [2.0]]} and request.url.path == "/predict"
        status = next(replies)
        return httpx.Response(status, json={"outputs": [[1, 2], [3, 4]]} if status == 200 else {})

    oracle, counts = _oracle_client(flaky, retries=2, breaker=CircuitBreaker(3, 60.0))
    out = asyncio.run(oracle.predict(np.array([[1.0], [2.0]])))
    assert out.tolist() == [[1.0, 2.0], [3.0, 4.0]]
    assert counts == {"calls": 3, "failures": 2} and oracle.breaker.state is BreakerState.CLOSED

    def down(request):
        raise httpx.ConnectError("connection refused")

    oracle, counts = _oracle_client(down, retries=1, breaker=CircuitBreaker(3, 60.0))
    with pytest.raises(OracleUnavailable, match="ConnectError"):
        asyncio.run(oracle.predict(np.zeros((2, 1))))  # 2 attempts
    with pytest.raises(OracleUnavailable):
        asyncio.run(oracle.predict(np.zeros((2, 1))))  # the 3rd attempt opens the breaker: no 4th
    assert counts == {"calls": 3, "failures": 3} and oracle.breaker.state is BreakerState.OPEN
    with pytest.raises(OracleUnavailable, match="circuit breaker is open"):
        asyncio.run(oracle.predict(np.zeros((2, 1))))
    assert counts["calls"] == 3  # refused without a call


def test_a_malformed_oracle_answer_is_a_failure_and_a_4xx_is_not_retried():
    oracle, counts = _oracle_client(lambda r: httpx.Response(200, json={"outputs": [[1, 2, 3]]}), retries=1)
    with pytest.raises(OracleUnavailable, match="shape"):
        asyncio.run(oracle.predict(np.zeros((2, 1))))
    assert counts == {"calls": 2, "failures": 2}
    oracle, counts = _oracle_client(lambda r: httpx.Response(422, json={"detail": "bad shape"}), retries=2)
    with pytest.raises(OracleUnavailable, match="refused the inputs: 422"):
        asyncio.run(oracle.predict(np.zeros((2, 1))))
    assert counts == {"calls": 1, "failures": 1} and oracle.breaker.state is BreakerState.CLOSED


# -- the app, in-process -----------------------------------------------------------------


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def test_the_app_answers_one_input_a_batch_and_an_npy_array_as_the_bundle_routes_them(bundles, digits_raw):
    """White-box, no oracle: appealed inputs are answered by the bundle's own big network."""
    bundle = Bundle.load(bundles["white_box"])
    raw = digits_raw[:40]
    r = bundle.route(raw)  # the known answer: the bundle's own routing, last stage included
    expected = [{"prediction": p, "stage": int(s), "score": pytest.approx(float(q), abs=1e-6),
                 "mflops": pytest.approx(float(m)), "fallback": False}
                for p, s, q, m in zip(bundle.predictions(r.output), r.stage, r.score, r.mflops)]
    assert 0 < int((r.stage == 1).sum()) < len(raw)  # both sides answer
    with TestClient(create_app(bundle, max_wait_ms=1)) as client:
        one = client.post("/predict", json={"input": raw[3].tolist()})
        assert one.status_code == 200 and one.json()["predictions"] == [expected[3]]
        one_grey = client.post("/predict", json={"input": raw[3, 0].tolist()})  # no channel axis
        assert one_grey.json()["predictions"] == [expected[3]]
        batch = client.post("/predict", json={"inputs": raw.tolist()})
        assert batch.status_code == 200 and batch.json()["predictions"] == expected
        npy = client.post("/predict", content=_npy(raw), headers={"content-type": "application/x-npy"})
        assert npy.status_code == 200 and npy.json()["predictions"] == expected
        health = client.get("/health").json()
        assert health["status"] == "ok" and health["stages"] == 2 and health["oracle"] is None
        text = client.get("/metrics").text
    assert metric(text, "cascade_inputs_total") == 2 + 2 * len(raw)
    assert metric(text, "cascade_appealed_inputs_total") == 2 * int((r.stage == 1).sum()) + 2 * int(r.stage[3] == 1)
    assert metric(text, "cascade_fallbacks_total") == 0 and metric(text, "cascade_oracle_calls_total") == 0
    assert 'cascade_requests_total{status="200"} 4.0' in text
    assert metric(text, "cascade_batch_size_count") == 4
    assert 'cascade_request_latency_recent_seconds{quantile="0.99"}' in text


@pytest.mark.parametrize("body, headers, status, message", [
    ({"inputs": [[1, 2, 3]]}, None, 422, "inputs of shape [1, 3]: this bundle takes [1, 8, 8] or a batch [B, 1, 8, 8]"),
    ({"input": [[0] * 8] * 7}, None, 422, "inputs of shape [1, 7, 8]"),
    ({"inputs": []}, None, 422, "this bundle takes [1, 8, 8]"),
    ({"inputs": [[1, 2], [1]]}, None, 422, "not a rectangular array of numbers"),
    ({"inputs": [[[["a"] * 8] * 8]]}, None, 422, "not a numeric array"),
    (json.dumps({"inputs": [[[[float("nan")] * 8] * 8]]}).encode(), {"content-type": "application/json"}, 422,
     "row 0 has NaN or infinite values"),
    ({"x": 1}, None, 400, 'give {"input": [...]} (one input) or {"inputs": [[...], ...]}'),
    (b"{not json", {"content-type": "application/json"}, 400, "body: not valid JSON"),
    (b"not an array", {"content-type": "application/x-npy"}, 400, "not a .npy array"),
    (b"1,2,3", {"content-type": "text/csv"}, 415, "send application/json or application/x-npy"),
])
def test_a_malformed_request_gets_a_4xx_with_one_line(bundles, body, headers, status, message):
    app = create_app(Bundle.load(bundles["white_box"]), max_wait_ms=1)
    with TestClient(app) as client:
        kw = {"content": body, "headers": headers} if isinstance(body, bytes) else {"json": body}
        r = client.post("/predict", **kw)
        assert r.status_code == status, r.text
        detail = r.json()["detail"]
        assert message in detail and "\n" not in detail
        # the server goes on answering
        assert client.post("/predict", json={"input": [[0] * 8] * 8}).status_code == 200
        assert f'cascade_requests_total{{status="{status}"}} 1.0' in client.get("/metrics").text


def test_too_many_inputs_in_one_request_is_a_422(bundles):
    with TestClient(create_app(Bundle.load(bundles["white_box"]), max_request_inputs=3)) as client:
        r = client.post("/predict", content=_npy(np.zeros((4, 1, 8, 8), np.uint8)),
                        headers={"content-type": "application/x-npy"})
        assert r.status_code == 422 and r.json()["detail"] == "4 inputs in one request: send at most 3"


def test_an_unreachable_oracle_gives_the_little_networks_answer_marked_fallback(bundles, digits_raw):
    bundle = Bundle.load(bundles["black_box"])
    raw = digits_raw[:30]
    r = bundle.route(raw)
    appealed = r.pending.numpy()
    assert 0 < appealed.sum() < len(raw)
    app = create_app(bundle, oracle_url=f"http://127.0.0.1:{_free_port()}", oracle_retries=1, breaker_failures=2,
                     breaker_cooldown_s=600, max_wait_ms=1)
    with TestClient(app) as client:
        got = [client.post("/predict", json={"input": x.tolist()}).json()["predictions"][0] for x in raw]
        health = client.get("/health").json()
        text = client.get("/metrics").text
    little = bundle.predictions(r.output)
    for i, p in enumerate(got):
        assert p["prediction"] == little[i] and p["stage"] == 0 and p["fallback"] == bool(appealed[i])
        assert p["mflops"] == pytest.approx(float(r.mflops[i]))  # no last-stage cost: it did not run
    assert health["oracle"]["breaker"] == "open"
    # the first appealed request tried twice, the second opened the breaker, the rest were refused
    assert metric(text, "cascade_oracle_calls_total") == 2 and metric(text, "cascade_oracle_failures_total") == 2
    assert metric(text, "cascade_fallbacks_total") == appealed.sum()
    assert metric(text, "cascade_appeal_rate") == pytest.approx(appealed.mean())
    assert 'cascade_oracle_breaker{cascade_oracle_breaker="open"} 1.0' in text


def test_a_black_box_bundle_without_an_oracle_falls_back_and_says_so_at_start_up(bundles, digits_raw, caplog):
    bundle = Bundle.load(bundles["black_box"])
    with caplog.at_level(logging.WARNING, logger="cascade"):
        app = create_app(bundle, max_wait_ms=1)
    assert "black-box bundle and no --oracle-url" in caplog.text
    with TestClient(app) as client:
        preds = client.post("/predict", json={"inputs": digits_raw[:20].tolist()}).json()["predictions"]
    pending = bundle.route(digits_raw[:20]).pending.tolist()
    assert [p["fallback"] for p in preds] == pending and any(pending)


def test_the_oracle_app_answers_with_the_big_networks_outputs(bundles, digits_raw):
    bundle = Bundle.load(bundles["white_box"])
    raw = digits_raw[:5]
    with TestClient(create_oracle_app(bundle)) as client:
        r = client.post("/predict", json={"inputs": raw.tolist()})
        bad = client.post("/predict", json={"inputs": [[1, 2]]})
        assert client.get("/health").json()["role"] == "oracle"
    assert r.status_code == 200
    assert np.allclose(r.json()["outputs"], bundle.run_last(bundle.preprocess(raw)).numpy(), atol=1e-5)
    assert bad.status_code == 422 and "this bundle takes [1, 8, 8]" in bad.json()["detail"]
    with pytest.raises(CascadeError, match="black-box bundle holds no big network"):
        create_oracle_app(Bundle.load(bundles["black_box"]))


def test_serve_oracle_exports_a_run_folders_big_network(quick_digits_run, bundles, digits_raw):
    with oracle_bundle(quick_digits_run) as bundle:
        assert bundle.has_last_stage and str(bundle.path).startswith("/")
        folder = bundle.path
        out = bundle.run_last(bundle.preprocess(digits_raw[:4]))
    wb = Bundle.load(bundles["white_box"])
    assert torch.allclose(out, wb.run_last(wb.preprocess(digits_raw[:4])), atol=1e-5)
    assert not folder.exists()  # the temporary export is gone


# -- the CLI -----------------------------------------------------------------------------


def test_serve_and_serve_oracle_refuse_bad_arguments_with_one_line(bundles, tmp_path, capsys):
    def refused(*args: str) -> str:
        code = main(list(args))
        return one_line_error(code, capsys.readouterr().err)

    assert "manifest.json: not found" in refused("serve", str(tmp_path / "nothing"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        assert "already in use" in refused("serve", str(bundles["white_box"]), "--port", port)
        assert "already in use" in refused("serve-oracle", str(bundles["white_box"]), "--port", port)
    assert "oracle URL 'localhost:1'" in refused("serve", str(bundles["white_box"]), "--oracle-url", "localhost:1",
                                                 "--port", "0")
    assert "max batch 0" in refused("serve", str(bundles["white_box"]), "--max-batch", "0", "--port", "0")
    assert "--threads 0" in refused("serve", str(bundles["white_box"]), "--threads", "0")
    assert "--workers 0: must be at least 1" in refused("serve", str(bundles["white_box"]), "--workers", "0")
    assert "max body MB 0.0: must be positive" in refused("serve", str(bundles["white_box"]), "--max-body-mb", "0")
    assert "oracle timeout -1.0" in refused("serve", str(bundles["white_box"]), "--oracle-timeout", "-1")
    assert "black-box bundle holds no big network" in refused("serve-oracle", str(bundles["black_box"]),
                                                              "--port", "0")
    assert "neither a bundle" in refused("serve-oracle", str(tmp_path), "--port", "0")
    run = tmp_path / "bb_run"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"modes": ["black_box"]}))
    assert "no white_box mode" in refused("serve-oracle", str(run), "--port", "0")
    assert torch.get_num_threads() == 2  # main() left the caller's torch as it was


# -- the servers as processes ------------------------------------------------------------


@pytest.mark.slow
def test_every_request_is_answered_when_the_remote_oracle_dies_mid_stream(bundles, digits_raw):
    """serve-oracle and serve --oracle-url as processes; 60 requests of 2 inputs, 6 in
    flight; the oracle is killed (SIGKILL) after 20 answers. Every request gets a 200; the
    appealed inputs answered before the kill carry the big network's answer (stage 1),
    those sent after it the little network's (fallback), and /metrics counted them."""
    raw = digits_raw[:90]
    bb, wb = Bundle.load(bundles["black_box"]), Bundle.load(bundles["white_box"])
    routed = bb.route(raw)
    appealed, little = routed.pending.numpy(), bb.predictions(routed.output)
    big = wb.predictions(wb.run_last(wb.preprocess(raw)))
    requests, batch = 60, 2
    with ServerProcess(["serve-oracle", str(bundles["white_box"])]) as oracle, \
            ServerProcess(["serve", str(bundles["black_box"]), "--oracle-url", oracle.url, "--oracle-timeout", "10",
                           "--oracle-retries", "1", "--breaker-failures", "2", "--breaker-cooldown", "600",
                           "--max-wait-ms", "2"]) as server:
        answers, _, _ = asyncio.run(send_requests(server.url, raw, requests, concurrency=6, batch=batch,
                                                  kill_after=20, kill=oracle.kill))
        text = httpx.get(f"{server.url}/metrics", timeout=10).text
        health = httpx.get(f"{server.url}/health", timeout=10).json()
        assert oracle.proc.returncode is not None and server.proc.poll() is None
    assert [a.status for a in answers] == [200] * requests, [a.predictions for a in answers if a.status != 200]
    seen = {"before": 0, "after": 0}
    fallbacks = 0
    for i, a in enumerate(answers):
        assert len(a.predictions) == batch
        for j, p in enumerate(a.predictions):
            k = (i * batch + j) % len(raw)
            fallbacks += p["fallback"]
            if not appealed[k]:
                assert (p["stage"], p["fallback"], p["prediction"]) == (0, False, little[k])
            elif a.done_before_kill:
                assert (p["stage"], p["fallback"], p["prediction"]) == (1, False, big[k])
                seen["before"] += 1
            elif a.sent_after_kill:
                assert (p["stage"], p["fallback"], p["prediction"]) == (0, True, little[k])
                seen["after"] += 1
            else:  # in flight while the oracle died: either answer, never an error
                assert p["fallback"] or p["stage"] == 1
    assert seen["before"] > 5 and seen["after"] > 5, seen
    assert metric(text, "cascade_fallbacks_total") == fallbacks >= seen["after"]
    assert metric(text, "cascade_inputs_total") == requests * batch
    assert metric(text, "cascade_oracle_failures_total") >= 2
    assert health["oracle"]["breaker"] == "open"
    assert 'cascade_oracle_breaker{cascade_oracle_breaker="open"} 1.0' in text


@pytest.mark.slow
def test_the_serve_load_benchmark_runs_and_every_request_is_answered(bundles):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "serve_load.py"), str(bundles["black_box"]),
                           "--oracle", str(bundles["white_box"]), "--requests", "40", "--concurrency", "4"], check=False,
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| oracle up | 40 | 40 |" in proc.stdout and "| oracle killed after 1/3 | 40 | 40 |" in proc.stdout
    assert "every request answered: yes" in proc.stdout


def test_serve_imports_stay_out_of_the_package():
    code = ("import sys, cascade; from cascade.cli import main; "
            "bad = [m for m in ('fastapi', 'uvicorn', 'httpx', 'prometheus_client', 'cascade.serve') if m in sys.modules]; "
            "assert not bad, bad")
    done = subprocess.run([sys.executable, "-c", code], check=False, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr

