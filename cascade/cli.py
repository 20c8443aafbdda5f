"""The command line: ``cascade run | validate | list``. A thin layer over the library.

User errors (config, data, checkpoint, argument) print one line per problem to stderr
and exit with code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from cascade.errors import CascadeError

EXIT_USER_ERROR = 2


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
    val = sub.add_parser("validate", help="check a config; exit 0, or 2 listing every error")
    val.add_argument("config")
    val.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    sub.add_parser("list", help="registered tasks, networks and methods")
    return p


def _cmd_run(args: argparse.Namespace) -> int:
    from cascade.config import load_config
    from cascade.experiment import Experiment
    from cascade.report import render_markdown

    overrides = list(args.overrides)
    if args.seed:
        overrides.append(f"seeds=[{', '.join(map(str, args.seed))}]")
    cfg = load_config(args.config, overrides, quick=args.quick)
    out = Path(args.out) if args.out else Path("runs") / (cfg.name or Path(args.config).stem)
    if cfg.cascade is not None:  # a K-stage cascade with a REINFORCE stopping policy
        from cascade.multistage_experiment import run_multistage

        print(run_multistage(cfg, out, quiet=args.quiet or not sys.stderr.isatty(), source=args.config))
        print(f"\nresults in {out}/ (metrics.json, table.md, table.csv, samples.csv, figures/, checkpoints/)")
        return 0
    metrics = Experiment(cfg, out, quiet=args.quiet or not sys.stderr.isatty(), source=args.config).run()
    print(render_markdown(metrics))
    print(f"\nresults in {out}/ (metrics.json, table.md, table.csv, samples.csv, figures/, checkpoints/)")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from cascade.config import load_config

    load_config(args.config, args.overrides)
    print(f"{args.config}: ok")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from cascade.registry import METHODS, NETWORKS, TASKS

    for reg in (TASKS, NETWORKS, METHODS):
        print(f"{reg.role}s: {', '.join(reg.names())}")
    return 0


def main(argv: list[str] | None = None) -> int:
    # like `python -m`, let a config name a user's own module (task: {name: my_tasks.MyTask})
    # that sits in the current folder
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    args = _parser().parse_args(argv)
    handler = {"run": _cmd_run, "validate": _cmd_validate, "list": _cmd_list}[args.command]
    try:
        return handler(args)
    except CascadeError as exc:
        print(f"error: {exc}".replace("\n", "\nerror: "), file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
