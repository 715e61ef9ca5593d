"""The ``batchpilot`` command: one subcommand per verb, each in its own module.

A subcommand module defines ``register(subparsers)``, which adds its parser and sets
``func(args) -> int`` as the default. Bad input raises :class:`BatchpilotError`, which
becomes a one-line message on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from batchpilot.errors import EXIT_USAGE, BatchpilotError

# Subcommand modules, in help order. Add a line here for a new verb.
COMMANDS = (
    "batchpilot.cli.workloads_cmd",
    "batchpilot.cli.train_cmd",
    "batchpilot.cli.memory_cmd",
    "batchpilot.cli.doctor_cmd",
    "batchpilot.cli.sweep_cmd",
    "batchpilot.cli.plan_cmd",
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own usage errors: one line, exit 2
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser."""
    parser = _Parser(prog="batchpilot", description="Choose the best batch size, LR, warmup and accumulation, then run it.")
    from batchpilot import __version__

    parser.add_argument("--version", action="version", version=f"batchpilot {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.raw_argv = list(sys.argv[1:] if argv is None else argv)  # e.g. for `train --nproc` to relaunch itself
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args.func(args) or 0)
    except BatchpilotError as exc:
        print(f"batchpilot {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # output piped into `head` and closed early: not an error
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
