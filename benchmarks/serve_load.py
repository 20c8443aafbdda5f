"""A bounded local load test of ``cascade serve``: with a remote oracle that dies, or
against a bare endpoint (``--vs-bare``).

    python benchmarks/serve_load.py runs/digits --requests 400 --concurrency 16
    python benchmarks/serve_load.py runs/digits --method msp --mode white_box --vs-bare

``--vs-bare`` measures ``cascade serve`` (and ``cascade serve --workers N``) against
``benchmarks/serve_bare.py``, a bare FastAPI endpoint calling ``Bundle.route`` once per
request, over the same bundle and the same one-input JSON body, in one run, at each of
``--concurrencies`` for ``--seconds`` each, with the load generator ``hey`` (a Go
binary: ``apt-get install -y hey``, or ``go install github.com/rakyll/hey@latest``),
every server with 1 torch thread, all on loopback. It prints a markdown table of
requests/s and p50 / p99 latency as hey sees them.

Starts ``cascade serve-oracle`` and ``cascade serve --oracle-url`` as child processes on
free loopback ports, sends ``--requests`` requests ``--concurrency`` at a time (httpx),
and prints a markdown table: throughput (requests/s, inputs/s), p50/p99 latency as the
client sees it, the serve process's CPU time per request, the appeal rate. The client
shares the machine (in Python it costs more CPU per request than the server), so the
throughput is a lower bound on a small machine. A second phase sends as many again and kills the oracle (SIGKILL) a third of
the way through: every request must still be answered (200), the appealed ones after the
kill with the little network's answer (``fallback: true``), counted by ``/metrics`` too.
Exits 1 if any request was not answered. Loopback only; stops by itself.

SOURCE is a run folder (``cascade run``'s output: a bundle of ``--method`` / ``--mode`` /
``--target-ad`` is exported for ``serve``, and ``serve-oracle`` serves the run's big
network) or a bundle (``serve-oracle`` serves ``--oracle``, default: the bundle itself
when white-box, else the run folder its manifest names). Inputs: ``--inputs`` (.npy),
else the run's test split, mapped back to raw inputs through the task's preprocessing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))


@dataclass
class Phase:
    """What one phase of requests measured."""

    name: str
    requests: int
    answered: int          # HTTP 200
    inputs: int
    seconds: float
    latencies: list[float]
    appealed: int          # answered by the last stage, or a fallback
    fallbacks: int         # in the responses
    fallbacks_metrics: float  # the growth of cascade_fallbacks_total during the phase
    appealed_after_kill: int = 0
    fallback_after_kill: int = 0
    server_cpu_s: float | None = None  # CPU seconds the serve process spent (Linux)


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process so far (Linux /proc), else None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def metric(text: str, name: str) -> float:
    """One unlabelled sample of a Prometheus text exposition (0 when absent)."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def _raw_inputs(run: Path, manifest: dict, limit: int = 1024) -> np.ndarray:
    """Up to ``limit`` test inputs of the run, as raw inputs (the bundle's preprocessing undone)."""
    import torch
    import yaml

    from cascade.engine.tasks import build_task
    from cascade.config import validate

    cfg = validate(yaml.safe_load((run / "config.yaml").read_text()), str(run / "config.yaml"))
    test = build_task(cfg).build_splits(manifest["operating_point"]["seed"]).test
    x = torch.stack([test[i][0] for i in range(min(limit, len(test)))])  # [N, *input_shape]
    pre = manifest.get("preprocessing")
    if pre is not None:
        shape = (1, -1, *([1] * (x.dim() - 2)))
        mean, std = torch.tensor(pre["mean"]).view(shape), torch.tensor(pre["std"]).view(shape)
        x = (x * std + mean) * pre["raw_max"]
    return x.numpy()


@dataclass
class Answer:
    """One request's outcome."""

    status: int | None       # None: no HTTP answer at all
    predictions: list | str  # the response's predictions (200), else its text
    sent_after_kill: bool    # sent once the oracle was gone
    done_before_kill: bool   # answered before the kill began


async def send_requests(url: str, inputs: np.ndarray, requests: int, concurrency: int, batch: int = 1,
                        kill_after: int | None = None, kill=None) -> tuple[list[Answer], list[float], float]:
    """Send ``requests`` requests to ``{url}/predict``, ``concurrency`` at a time; request
    ``i`` holds inputs ``i*batch ... i*batch + batch - 1`` (modulo ``len(inputs)``). Once
    ``kill_after`` requests have been answered, ``kill()`` runs in a thread while the other
    requests go on.

    Returns:
        Each request's :class:`Answer`, each request's latency (seconds), wall seconds.
    """
    import httpx

    answers: list = [None] * requests
    latencies: list[float] = []
    state = {"done": 0, "killing": False, "killed": False}
    next_index = iter(range(requests))

    async def worker(client: httpx.AsyncClient) -> None:
        for i in next_index:
            rows = np.take(inputs, range(i * batch, (i + 1) * batch), axis=0, mode="wrap")
            after_kill = state["killed"]
            t0 = time.perf_counter()
            try:
                r = await client.post(f"{url}/predict", json={"inputs": rows.tolist()})
                status, body = r.status_code, r.json()["predictions"] if r.status_code == 200 else r.text
            except httpx.HTTPError as exc:
                status, body = None, repr(exc)
            latencies.append(time.perf_counter() - t0)
            answers[i] = Answer(status, body, after_kill, not state["killing"])
            state["done"] += 1
            if kill_after is not None and state["done"] >= kill_after and not state["killing"]:
                state["killing"] = True
                await asyncio.to_thread(kill)
                state["killed"] = True

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=60.0, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        return answers, latencies, time.perf_counter() - start


def _phase(name: str, url: str, inputs: np.ndarray, args, last: int, pid: int, kill=None) -> Phase:
    import httpx

    before = metric(httpx.get(f"{url}/metrics").text, "cascade_fallbacks_total")
    cpu = _cpu_seconds(pid)
    kill_after = args.requests // 3 if kill is not None else None
    answers, latencies, seconds = asyncio.run(send_requests(url, inputs, args.requests, args.concurrency,
                                                            args.batch, kill_after, kill))
    after = metric(httpx.get(f"{url}/metrics").text, "cascade_fallbacks_total")
    cpu = None if cpu is None else _cpu_seconds(pid) - cpu
    ok = [a for a in answers if a.status == 200]
    rows = [(p, a.sent_after_kill) for a in ok for p in a.predictions]
    appealed = [(p, a) for p, a in rows if p["fallback"] or p["stage"] == last]
    return Phase(name=name, requests=len(answers), answered=len(ok), inputs=len(rows), seconds=seconds,
                 latencies=latencies, appealed=len(appealed), fallbacks=sum(p["fallback"] for p, _ in rows),
                 fallbacks_metrics=after - before, appealed_after_kill=sum(a for _, a in appealed),
                 fallback_after_kill=sum(p["fallback"] for p, a in appealed if a), server_cpu_s=cpu)


def _table(phases: list[Phase]) -> str:
    head = ("| phase | requests | answered (200) | req/s | inputs/s | p50 ms | p99 ms | serve CPU ms/req "
            "| appeal rate | fallbacks (responses) | fallbacks (/metrics) |")
    lines = [head, "|" + "---|" * head.count(" |")]
    for p in phases:
        lat = np.array(p.latencies) * 1000
        cpu = "" if p.server_cpu_s is None else f"{p.server_cpu_s / p.requests * 1000:.2f}"
        lines.append(f"| {p.name} | {p.requests} | {p.answered} | {p.requests / p.seconds:.0f} "
                     f"| {p.inputs / p.seconds:.0f} | {np.percentile(lat, 50):.1f} | {np.percentile(lat, 99):.1f} | {cpu} "
                     f"| {p.appealed / max(p.inputs, 1):.3f} | {p.fallbacks} | {p.fallbacks_metrics:.0f} |")
    return "\n".join(lines)


# -- serve against a bare endpoint, with hey -------------------------------------------------


def hey(url: str, body: Path, concurrency: int, seconds: float | None = None, requests: int | None = None) -> dict:
    """One ``hey`` run of POST ``{url}/predict``: requests/s, p50 / p99 seconds, statuses.

    Raises:
        RuntimeError: hey failed, or answered with statuses other than 200.
    """
    amount = ["-z", f"{seconds:g}s"] if seconds else ["-n", str(requests)]
    done = subprocess.run(["hey", *amount, "-c", str(concurrency), "-m", "POST", "-T", "application/json",
                           "-D", str(body), f"{url}/predict"], capture_output=True, text=True, check=False,
                          timeout=(seconds or 60) + 60)
    out = done.stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    quantiles = dict(re.findall(r"(\d+)%+ in ([\d.]+) secs", out))
    statuses = dict(re.findall(r"\[(\d+)\]\s+(\d+) responses", out))
    if done.returncode != 0 or rps is None or set(statuses) != {"200"}:
        raise RuntimeError(f"hey against {url}: rc {done.returncode}, statuses {statuses}: {out[-500:]}{done.stderr}")
    return {"rps": float(rps.group(1)), "p50": float(quantiles["50"]), "p99": float(quantiles["99"])}


def compare_with_bare(bundle: Path, one_input: np.ndarray, concurrencies: list[int], seconds: float, workers: int,
                      tmp: Path) -> int:
    """``cascade serve`` (and ``--workers``) against serve_bare.py at each concurrency;
    prints the table. 0 if both targets hold (c=1: serve's p50 within 1.3x of bare's;
    c >= 8: serve's requests/s at least bare's), else 1."""
    from cascade.serve import ServerProcess

    if shutil.which("hey") is None:
        print("hey not found: apt-get install -y hey (or go install github.com/rakyll/hey@latest)", file=sys.stderr)
        return 2
    body = tmp / "one_input.json"
    body.write_text(json.dumps({"input": one_input.tolist()}))
    servers = {"serve": ["serve", str(bundle), "--threads", "1"], "bare": [str(bundle), "--threads", "1"]}
    if workers > 1:
        servers[f"serve --workers {workers}"] = [*servers["serve"], "--workers", str(workers)]
    results: dict[str, dict[int, dict]] = {name: {} for name in servers}
    with contextlib.ExitStack() as stack:
        urls = {name: stack.enter_context(ServerProcess(
                    args, command=[sys.executable, str(REPO / "benchmarks" / "serve_bare.py")] if name == "bare"
                    else None)).url for name, args in servers.items()}
        for c in concurrencies:
            for name, url in urls.items():  # the servers take turns at each concurrency: they share the noise
                hey(url, body, c, requests=max(200, 4 * c))  # warm-up
                results[name][c] = hey(url, body, c, seconds=seconds)
                print(f"c={c} {name}: {results[name][c]}", file=sys.stderr, flush=True)
    names = list(servers)
    head = "| concurrency | " + " | ".join(f"{n} req/s | p50 ms | p99 ms" for n in names) + " |"
    lines = [head, "|" + "---|" * (1 + 3 * len(names))]
    for c in concurrencies:
        cells = [f"{results[n][c]['rps']:,.0f} | {results[n][c]['p50'] * 1000:.1f} | {results[n][c]['p99'] * 1000:.1f}"
                 for n in names]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    serve, bare = results["serve"], results["bare"]
    ok = all(serve[c]["p50"] <= 1.3 * bare[c]["p50"] if c == 1 else serve[c]["rps"] >= bare[c]["rps"]
             for c in concurrencies)
    print(f"targets (c=1: serve p50 <= 1.3x bare; c>=8: serve req/s >= bare): {'met' if ok else 'NOT met'}")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="a run folder or a bundle")
    p.add_argument("--oracle", help="what serve-oracle serves (a white-box bundle or a run folder)")
    p.add_argument("--inputs", help="raw inputs, a .npy array [N, *input_shape] (default: the run's test split)")
    p.add_argument("--requests", type=int, default=400, help="requests per phase (default 400)")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight (default 16)")
    p.add_argument("--batch", type=int, default=1, help="inputs per request (default 1)")
    p.add_argument("--method", default="msp", help="a run folder: the bundle's method (default msp)")
    p.add_argument("--mode", default="black_box", help="a run folder: the bundle's mode (default black_box)")
    p.add_argument("--target-ad", type=float, default=0.02, help="a run folder: the operating point (default 0.02)")
    p.add_argument("--max-batch", type=int, default=64, help="serve --max-batch (default 64)")
    p.add_argument("--max-wait-ms", type=float, default=0.0, help="serve --max-wait-ms (default 0)")
    p.add_argument("--vs-bare", action="store_true", help="measure serve against a bare endpoint with hey")
    p.add_argument("--concurrencies", default="1,8,32,128", help="--vs-bare: hey -c values (default 1,8,32,128)")
    p.add_argument("--seconds", type=float, default=5.0, help="--vs-bare: seconds per measurement (default 5)")
    p.add_argument("--workers", type=int, default=2, help="--vs-bare: also serve --workers N (0: not; default 2)")
    args = p.parse_args(argv)
    if args.requests < 3 or args.concurrency < 1 or args.batch < 1:
        p.error("--requests must be at least 3, --concurrency and --batch at least 1")

    from cascade.serve import ServerProcess

    source = Path(args.source)
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        if (source / "manifest.json").is_file():
            bundle = source
            manifest = json.loads((bundle / "manifest.json").read_text())
            white = manifest["stages"][-1]["file"] is not None
            oracle = Path(args.oracle) if args.oracle else bundle if white else Path(manifest["run"]["path"])
            run = Path(manifest["run"]["path"])
        else:
            from cascade.deploy.export import export_bundle

            bundle = export_bundle(source, Path(tmp) / "bundle", method=args.method, mode=args.mode,
                                   target_ad=args.target_ad, onnx=False)
            manifest = json.loads((bundle / "manifest.json").read_text())
            oracle = Path(args.oracle) if args.oracle else source
            run = source
        inputs = np.load(args.inputs, allow_pickle=False) if args.inputs else _raw_inputs(run, manifest)
        if args.vs_bare:
            return compare_with_bare(bundle, inputs[0], [int(c) for c in args.concurrencies.split(",")],
                                     args.seconds, args.workers, Path(tmp))
        last = len(manifest["stages"]) - 1
        print(f"bundle {bundle} ({manifest['operating_point']['method']}, {manifest['operating_point']['mode']}, "
              f"{len(manifest['stages'])} stages); oracle {oracle}; {len(inputs)} distinct inputs; "
              f"{args.requests} requests x {args.batch} input(s), {args.concurrency} in flight", flush=True)
        with ServerProcess(["serve-oracle", str(oracle)]) as oracle_server, \
                ServerProcess(["serve", str(bundle), "--oracle-url", oracle_server.url, "--max-batch",
                               str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms),
                               "--oracle-timeout", "5", "--oracle-retries", "1", "--breaker-cooldown", "60"]) as srv:
            pid = srv.proc.pid
            _phase("warm-up", srv.url, inputs, argparse.Namespace(**{**vars(args), "requests": args.concurrency}),
                   last, pid)
            healthy = _phase("oracle up", srv.url, inputs, args, last, pid)
            killed = _phase("oracle killed after 1/3", srv.url, inputs, args, last, pid, kill=oracle_server.kill)
            import httpx

            breaker = httpx.get(f"{srv.url}/health").json()["oracle"]["breaker"]
            total_fallbacks = metric(httpx.get(f"{srv.url}/metrics").text, "cascade_fallbacks_total")
    print()
    print(_table([healthy, killed]))
    print()
    unanswered = sum(ph.requests - ph.answered for ph in (healthy, killed))
    print(f"every request answered: {'yes' if unanswered == 0 else f'NO ({unanswered} not answered)'}; "
          f"after the kill: {killed.fallback_after_kill} of {killed.appealed_after_kill} appealed inputs answered "
          f"with the fallback; fallbacks counted: {killed.fallbacks} in the responses, "
          f"{killed.fallbacks_metrics:.0f} by /metrics (total {total_fallbacks:.0f}); breaker {breaker}")
    ok = unanswered == 0 and killed.fallback_after_kill == killed.appealed_after_kill \
        and killed.fallbacks == round(killed.fallbacks_metrics)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
