"""The command line: ``cascade run | validate | list | networks | export | route | serve | serve-oracle |
calibrate``.
A thin layer over the library.

User errors (config, data, checkpoint, argument, an unwritable output folder) print one
line per problem to stderr and exit with code 2, without a traceback. Ctrl-C (or SIGTERM)
during ``run`` saves a checkpoint, prints the command that resumes the run, and exits with 130.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shlex
import signal
import sys
import threading
from pathlib import Path

import torch

from cascade.config.loading import load_config
from cascade.contracts.methods import method_kind
from cascade.core.errors import CascadeError
from cascade.core.files import atomic_path
from cascade.core.registry import METHODS, NETWORKS, TASKS
from cascade.deploy.bundle import Bundle
from cascade.deploy.export import export_bundle, oracle_bundle
from cascade.deploy.inputs import MAX_IMAGE_PIXELS, load_inputs, route_inputs
from cascade.engine.experiment import Experiment
from cascade.evaluation.calibrate import calibrate_command
from cascade.nn.cost import list_networks
from cascade.report import render_markdown
from cascade.report.tables import recommendation_section

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # the shell's code for a process stopped by SIGINT


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own errors: also exit 2, one line
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="cascade", description="Cascade routing experiments (AppealNet, learned stopping policies).")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser("run", help="run an experiment config")
    run.add_argument("config", help="YAML experiment config")
    run.add_argument("--out", help="output folder (default runs/<config name>)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key (dotted path), e.g. --set pretrain.epochs=2")
    run.add_argument("--seed", type=int, action="append", help="run only this seed (repeatable)")
    run.add_argument("--quick", action="store_true", help="apply the config's quick: overrides (a few steps)")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.add_argument("--resume", action="store_true",
                     help="continue an interrupted run in the same --out from its checkpoints (same config)")
    val = sub.add_parser("validate", help="check a config; exit 0, or 2 listing every error")
    val.add_argument("config")
    val.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    val.add_argument("--config-only", action="store_true",
                     help="check the config alone, not the task's data and networks (valid on any machine)")
    sub.add_parser("list", help="registered tasks, networks and methods (with their kind)")
    exp = sub.add_parser("export", help="write a finished run's router as a bundle (torch.export, manifest)")
    exp.add_argument("run_dir", help="the output folder of `cascade run`")
    exp.add_argument("--out", required=True, help="the bundle folder to write")
    exp.add_argument("--method", help="a method of the run (default: its first trained one)")
    exp.add_argument("--mode", help="white_box or black_box (default: the run's first)")
    point = exp.add_mutually_exclusive_group()  # one operating point: by AD target or by appeal budget
    point.add_argument("--target-ad", type=float, default=0.005, help="the operating point's AD target (default 0.005)")
    point.add_argument("--appeal-budget", type=float, metavar="R",
                       help="the point at this appeal budget (evaluation.appeal_budgets, e.g. 0.2) instead of --target-ad")
    exp.add_argument("--source", default="val", help="where the threshold was chosen: guaranteed, val (default) or test")
    exp.add_argument("--seed", type=int, help="one of the run's seeds (default: its first)")
    exp.add_argument("--no-onnx", action="store_true", help="write no ONNX files")
    route = sub.add_parser("route", help="route inputs through a bundle into a CSV of predictions")
    route.add_argument("bundle", help="a folder written by `cascade export`")
    route.add_argument("inputs", help="a .npy array, a .csv of features (one input per row) or a folder of images")
    route.add_argument("--out", required=True, help="the CSV to write")
    route.add_argument("--batch", type=int, default=256, help="inputs per batch (default 256)")
    route.add_argument("--header", action=argparse.BooleanOptionalAction, default=None,
                       help="a CSV's first row names the columns (--header) or is an input (--no-header); default: "
                       "a header when it is not numeric or is 0,1,...,D-1 (what pandas writes with no column names)")
    route.add_argument("--max-pixels", type=int, default=None, metavar="N",
                       help="refuse images with more pixels (width x height) than this, before decoding them "
                       "(default cascade.deploy.inputs.MAX_IMAGE_PIXELS, 50 million)")
    cal = sub.add_parser("calibrate", help="val and guaranteed thresholds for your own models' outputs")
    cal.add_argument("file", help="CSV or Parquet, one row per calibration input (a split column: cal|test rows)")
    cal.add_argument("--score", action="append", required=True, metavar="COL", help="the little model's "
                     "confidence (higher = keep its answer); repeat, with --little-correct, per stage in order")
    cal.add_argument("--little-correct", action="append", required=True, metavar="COL", help="0/1 or true/false")
    cal.add_argument("--big-correct", metavar="COL", help="the last model's 0/1 (default: an oracle, always right)")
    cal.add_argument("--target-ad", type=float, nargs="+", required=True, metavar="T", help="AD targets (0.01 = 1 %%)")
    cal.add_argument("--delta", type=float, metavar="D", help="P(guaranteed AD > target) allowed (default 0.1)")
    cal.add_argument("--json", metavar="OUT", help="also write the points to this JSON file")
    _add_networks_parser(sub)
    _add_serve_parsers(sub)
    return p


# -- networks (cascade.nn.cost.list_networks) -----------------------------------------------------


def _add_networks_parser(sub) -> None:
    nets = sub.add_parser("networks", help="every registered network's MFLOPs and parameters (and latency) "
                          "for an input shape")
    nets.add_argument("--input", default="3,32,32", metavar="C,H,W",
                      help="one input's shape, comma-separated (default 3,32,32)")
    nets.add_argument("--classes", type=int, default=10, help="outputs of the head (default 10)")
    nets.add_argument("--device", help="also time a forward pass per batch here: cpu, cuda or cuda:N "
                      "(median milliseconds; CUDA events on cuda)")
    nets.add_argument("--batch", type=int, default=256, help="inputs per timed batch (default 256)")
    nets.add_argument("--repeats", type=int, default=10, help="timed batches per network, after 3 warm-up ones; "
                      "the median is printed (default 10)")
    nets.add_argument("--threads", type=int, help="torch threads for the CPU timings (default: torch's, one per "
                      "core)")


def _cmd_networks(args: argparse.Namespace) -> int:
    try:
        shape = tuple(int(d) for d in args.input.split(","))
    except ValueError:
        raise CascadeError(f"--input {args.input!r}: give one input's shape as integers separated by commas, "
                           "e.g. 3,32,32") from None
    with _torch_threads(args.threads):
        rows = list_networks(shape, args.classes, device=args.device, batch=args.batch, repeats=args.repeats)
    timed = f"ms/batch ({args.device}, batch {args.batch})" if args.device else ""
    print(f"input {'x'.join(map(str, shape))}, {args.classes} outputs; MFLOPs: millions of multiply-accumulates "
          "per input")
    width = max(len(r.name) for r in rows)
    print(f"{'network':<{width}}  {'MFLOPs':>10}  {'params':>9}  {timed}".rstrip())
    for r in rows:
        mflops = "" if r.mflops is None else f"{r.mflops:.2f}" if r.mflops >= 1 else f"{r.mflops:.3g}"
        cost = mflops and f"{mflops:>10}  {r.params / 1e6:>7.3f} M"
        latency = "" if r.latency_ms is None else f"{r.latency_ms:>{len(timed)}.2f}"
        print(f"{r.name:<{width}}  {cost or '-':>21}  {latency}{r.error or ''}".rstrip())
    return 0


# -- serve, serve-oracle (cascade.serve) ------------------------------------------------------


_TOKEN_ENV, _ORACLE_TOKEN_ENV = "CASCADE_TOKEN", "CASCADE_ORACLE_TOKEN"  # cascade.serve.TOKEN_ENV: not imported here
THREADS_HELP = ("torch threads (default 1: one batch runs at a time, and small networks are fastest on one core; "
                "raise it for a big network on a machine with cores to spare)")


def _add_serve_parsers(sub) -> None:
    serve = sub.add_parser("serve", help="serve a bundle over HTTP (POST /predict, /health, /metrics)")
    serve.add_argument("bundle", help="a folder written by `cascade export`")
    serve.add_argument("--oracle-url", help="where appealed inputs go: http://HOST:PORT of `cascade serve-oracle` "
                       "(default: a white-box bundle's own big network)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free one)")
    serve.add_argument("--workers", type=int, default=1,
                       help="server processes sharing the port, each with the bundle loaded (default 1)")
    serve.add_argument("--max-batch", type=int, default=64, help="inputs per micro-batch (default 64)")
    serve.add_argument("--max-wait-ms", type=float, default=0.0,
                       help="how long a micro-batch waits for more requests after its first (default 0: an idle "
                       "worker routes at once; requests batch while it is busy)")
    serve.add_argument("--max-request-inputs", type=int, default=4096, metavar="N",
                       help="the most inputs one request may hold, refused (422) above (default 4096)")
    serve.add_argument("--max-body-mb", type=float, default=32.0,
                       help="the largest request body, refused (413) while it is read (default 32)")
    serve.add_argument("--token", help=f"require Authorization: Bearer TOKEN on /predict and /metrics (default: "
                       f"${_TOKEN_ENV} if set, else no auth; /health stays open)")
    serve.add_argument("--oracle-timeout", type=float, default=2.0,
                       help="seconds an appealed batch may wait for the oracle, retries included (default 2)")
    serve.add_argument("--oracle-retries", type=int, default=2,
                       help="retries of a failed oracle request, within --oracle-timeout (default 2)")
    serve.add_argument("--oracle-token", help=f"the bearer token sent to the oracle (default: ${_ORACLE_TOKEN_ENV})")
    serve.add_argument("--breaker-failures", type=int, default=3,
                       help="consecutive oracle failures that open the circuit breaker (default 3)")
    serve.add_argument("--breaker-cooldown", type=float, default=5.0,
                       help="seconds the open breaker waits before it probes the oracle (default 5)")
    serve.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    oracle = sub.add_parser("serve-oracle", help="serve the big network of a white-box bundle or a run as the "
                            "oracle of `cascade serve`")
    oracle.add_argument("source", help="a white-box bundle, or a run folder (its big network is exported)")
    oracle.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    oracle.add_argument("--port", type=int, default=8001, help="port (default 8001; 0: any free one)")
    oracle.add_argument("--max-body-mb", type=float, default=256.0,
                        help="the largest request body, refused (413) while it is read (default 256)")
    oracle.add_argument("--token", help=f"require Authorization: Bearer TOKEN on /predict (default: ${_TOKEN_ENV} "
                        "if set, else no auth)")
    oracle.add_argument("--threads", type=int, default=1, help=THREADS_HELP)


@contextlib.contextmanager
def _torch_threads(threads: int | None, flag: str = "--threads"):
    """Run with ``threads`` torch threads (None: as they are), then leave torch as it was:
    main() may be called in-process (tests, notebooks)."""
    if threads is not None and threads < 1:
        raise CascadeError(f"{flag} {threads}: must be at least 1")

    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _cmd_serve(args: argparse.Namespace) -> int:
    # cascade.serve loads fastapi, uvicorn, httpx and prometheus_client: only the servers need them
    from cascade.serve import SETTINGS_ENV, bind_socket, create_app, run_server, server_url

    if args.workers < 1:
        raise CascadeError(f"--workers {args.workers}: must be at least 1")
    options = dict(oracle_url=args.oracle_url, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                   oracle_timeout_s=args.oracle_timeout, oracle_retries=args.oracle_retries,
                   breaker_failures=args.breaker_failures, breaker_cooldown_s=args.breaker_cooldown,
                   max_body_mb=args.max_body_mb, max_request_inputs=args.max_request_inputs,
                   token=args.token or os.environ.get(_TOKEN_ENV) or None,
                   oracle_token=args.oracle_token or os.environ.get(_ORACLE_TOKEN_ENV) or None)
    with _torch_threads(args.threads):
        bundle = Bundle.load(args.bundle)
        app = create_app(bundle, **options)  # checks the options (each worker builds its own)
        sock = bind_socket(args.host, args.port)
        last = args.oracle_url or ("the bundle's big network" if bundle.has_last_stage else "none (fallback)")
        workers = f"; {args.workers} worker processes" if args.workers > 1 else ""
        print(f"serving {bundle.name} on {server_url(sock)} (POST /predict, GET /health, GET /metrics); "
              f"appealed inputs: {last}{workers}", flush=True)
        if args.workers > 1:
            os.environ[SETTINGS_ENV] = json.dumps({"bundle": str(bundle.path), "threads": args.threads, **options})
            run_server("cascade.serve:app_from_environment", sock, workers=args.workers)
        else:
            run_server(app, sock)
    return 0


def _cmd_serve_oracle(args: argparse.Namespace) -> int:
    # as in _cmd_serve: the web stack is imported only by the commands that serve
    from cascade.serve import bind_socket, create_oracle_app, run_server, server_url

    with _torch_threads(args.threads):
        sock = bind_socket(args.host, args.port)  # before the export: a port in use fails at once
        with oracle_bundle(args.source) as bundle:
            app = create_oracle_app(bundle, max_body_mb=args.max_body_mb,
                                    token=args.token or os.environ.get(_TOKEN_ENV) or None)
            print(f"serving the big network of {bundle.name} as an oracle on {server_url(sock)} (POST /predict, "
                  "GET /health)", flush=True)
            run_server(app, sock)
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.seed:
        overrides.append(f"seeds=[{', '.join(map(str, args.seed))}]")
    # `run` also checks the data paths that come from $CASCADE_DATA or the default root
    cfg = load_config(args.config, overrides, quick=args.quick, resolve_data=True)
    out = Path(args.out) if args.out else Path("runs") / (cfg.name or Path(args.config).stem)
    with _torch_threads(cfg.threads, "threads"):
        return _run_experiment(cfg, out, args)


def _run_experiment(cfg, out: Path, args: argparse.Namespace) -> int:

    metrics = Experiment(cfg, out, quiet=args.quiet or not sys.stderr.isatty(), source=args.config).run(args.resume)
    if not metrics:  # under torchrun, a rank other than 0: it trained, rank 0 reports
        return 0
    print(render_markdown(metrics))
    print(f"\nresults in {out}/ (metrics.json, table.md, table_full.md, table.csv, samples.csv, figures/, checkpoints/)")
    print("\n" + "\n".join(recommendation_section(metrics)).rstrip())  # the answer, last
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides, resolve_data=not args.config_only)
    if not args.config_only:  # the task, its data and its networks, on one batch per split
        Experiment(cfg, Path("."), quiet=True, source=args.config).check()
    print(f"{args.config}: ok" + (" (config only)" if args.config_only else " (config, task, data, networks)"))
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    for reg in (TASKS, NETWORKS):
        print(f"{reg.role}s: {', '.join(reg.names())}")
    methods = [f"{n} ({method_kind(METHODS.get(n)).value.replace('_', '-')}: "
               f"{', '.join(sorted(k.value for k in METHODS.get(n).task_kinds))})" for n in METHODS.names()]
    print(f"methods: {', '.join(methods)}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    out = export_bundle(args.run_dir, args.out, method=args.method, mode=args.mode, target_ad=args.target_ad,
                        source=args.source, seed=args.seed, onnx=not args.no_onnx, appeal_budget=args.appeal_budget)

    m = json.loads((out / "manifest.json").read_text())
    p, e = m["operating_point"], m["operating_point"]["expected"]
    files = ", ".join(f for s in m["stages"] for f in (s["file"], s.get("onnx")) if f)
    t = m["thresholds"][0]
    threshold = "none (every input goes on)" if t is None else f"{t:.6g}"
    where = (f"appeal budget {p['appeal_budget']:g}" if p.get("appeal_budget") is not None
             else f"target AD {p['target_ad']:g}")
    print(f"{out}: {p['method']} ({p['mode']}, seed {p['seed']}), threshold {threshold} "
          f"({p['threshold_source']}, {where}); on the run's test split: skipping rate "
          f"{e['skipping_rate']:.3g}, AD {e['ad']:.3g}; files: manifest.json, {files}")
    return 0


def _cmd_route(args: argparse.Namespace) -> int:
    if args.batch < 1:
        raise CascadeError(f"--batch {args.batch}: must be at least 1")
    max_pixels = MAX_IMAGE_PIXELS if args.max_pixels is None else args.max_pixels
    if max_pixels < 1:
        raise CascadeError(f"--max-pixels {max_pixels}: must be at least 1")
    bundle = Bundle.load(args.bundle)
    inputs = load_inputs(args.inputs, bundle, header=args.header, max_pixels=max_pixels)
    frame = route_inputs(bundle, inputs, args.batch, progress=sys.stderr.isatty())
    out = Path(args.out)
    with atomic_path(out) as tmp:  # whole or not at all: a full disk leaves no partial file, an earlier one as it was
        frame.to_csv(tmp, index=False)
    last = bundle.num_stages - 1
    print(f"{out}: {len(frame)} inputs; answered before the last stage: {(frame['stage'] < last).mean():.3g}; "
          f"pending (for the oracle): {int(frame['pending'].sum())}; mean MFLOPs here: {frame['mflops'].mean():.3g}",
          file=sys.stderr)
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    return calibrate_command(args)


def _resume_command(argv: list[str]) -> str:
    """The command line that continues an interrupted ``run``."""
    args = [a for a in argv if a != "--resume"]
    return " ".join(shlex.quote(a) for a in ["cascade", *args, "--resume"])


def _log_warnings_to_stderr() -> logging.Handler:
    """Warnings of the ``cascade`` logger (a collapsed predictor, skipped rows) on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("warning: %(message)s"))
    logging.getLogger("cascade").addHandler(handler)
    return handler


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (``kill``, a batch scheduler's stop) raises ``KeyboardInterrupt`` while the
    block runs, as Ctrl-C does: training saves a checkpoint at the next step boundary and
    the resume command is printed. Left as it was outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    # like `python -m`, let a config name a user's own module (task: {name: my_tasks.MyTask})
    # that sits in the current folder
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    command = {"run": _cmd_run, "validate": _cmd_validate, "list": _cmd_list, "export": _cmd_export,
               "route": _cmd_route, "serve": _cmd_serve, "serve-oracle": _cmd_serve_oracle,
               "networks": _cmd_networks, "calibrate": _cmd_calibrate}[args.command]
    log_handler = _log_warnings_to_stderr()
    try:
        with _sigterm_as_interrupt() if args.command == "run" else contextlib.nullcontext():
            return command(args)
    except CascadeError as exc:
        print(f"error: {exc}".replace("\n", "\nerror: "), file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as exc:  # an unwritable or full output folder: the user's to fix, not a bug
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        resume = f"; continue with: {_resume_command(argv)}" if args.command == "run" else ""
        print(f"interrupted{resume}", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        logging.getLogger("cascade").removeHandler(log_handler)


if __name__ == "__main__":
    sys.exit(main())
