"""The ``batchpilot`` command: one subcommand per verb, each in its own module.

A subcommand module defines ``register(subparsers)``, which adds its parser and sets
``func(args) -> int`` as the default. Bad input raises :class:`BatchpilotError`, which
becomes a one-line message on stderr and exit code 2; under ``--json`` the same message is
also printed on stdout as ``{"status": "error", "message": ..., "exit_code": 2}``.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import json
import os
import re
import sys

from batchpilot.errors import EXIT_INTERRUPTED, EXIT_USAGE, BatchpilotError

# Subcommand modules, in help order. Add a line here for a new verb.
COMMANDS = (
    "batchpilot.cli.workloads_cmd",
    "batchpilot.cli.train_cmd",
    "batchpilot.cli.memory_cmd",
    "batchpilot.cli.doctor_cmd",
    "batchpilot.cli.sweep_cmd",
    "batchpilot.cli.plan_cmd",
)


class HelpFormatter(argparse.HelpFormatter):
    """Shows each flag's default (``(default: X)``) unless its help already says it or there is none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" in text or default is None or default is False or default == [] or default == ""
                or default is argparse.SUPPRESS or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    json_errors = False  # set by main() when --json is on the command line

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # argparse's own usage errors: one line, exit 2
        line = f"{self.prog}: error: {' '.join(message.split())}"
        if _Parser.json_errors:
            _print_error_json(line)
        self.exit(EXIT_USAGE, line + "\n")


def _print_error_json(message: str) -> None:
    try:
        sys.stdout.write(json.dumps({"status": "error", "message": message, "exit_code": EXIT_USAGE}) + "\n")
        sys.stdout.flush()
    except (OSError, ValueError):  # stdout closed or full: the stderr line still says it
        pass


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser."""
    parser = _Parser(prog="batchpilot", description="Choose the best batch size, LR, warmup and accumulation, then run it.")
    from batchpilot import __version__

    parser.add_argument("--version", action="version", version=f"batchpilot {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's final flush cannot fail again."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def out_of_memory_message(exc: BaseException) -> str | None:
    """One line for an allocation that failed (``MemoryError``, torch's CPU or CUDA allocator), else ``None``."""
    text = " ".join(str(exc).split())
    if not (isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and (
            "can't allocate memory" in text or "out of memory" in text.lower()))):
        return None
    m = re.search(r"allocate (\d+) bytes", text) or re.search(r"allocate ([0-9.]+ [KMGT]i?B)", text)
    size = ""
    if m:
        size = m.group(1)
        if size.isdigit():
            from batchpilot.memory.units import format_bytes

            size = format_bytes(int(size))
        size = f" (an allocation of {size} failed)"
    return (f"out of memory on this machine{size}: the inputs ask for more memory than it has; use smaller sizes "
            f"(--batch, --seq-len, --workload-opt)")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C while the parser imports torch and the verbs: no traceback either
        print("batchpilot: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _main(argv: list[str] | None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    _Parser.json_errors = "--json" in raw
    parser = build_parser()
    args = parser.parse_args(raw)
    args.raw_argv = raw  # e.g. for `train --nproc` to relaunch itself
    from batchpilot.report.command import set_command

    set_command(raw)  # the exact command, for the reports' provenance line
    if not sys.stdout.isatty():  # piped to a file: rich would fit tables to 80 columns and cut cells with "…"
        os.environ.setdefault("COLUMNS", "160")
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()
        return code
    except BatchpilotError as exc:
        message = " ".join(str(exc).split())  # one line, whatever the message held
        line = f"batchpilot {args.command}: error: {message}"
        if getattr(args, "json", False):
            _print_error_json(line)
        print(line, file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:  # Ctrl-C outside the trainer's own handling: one line, no traceback
        print(f"batchpilot {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (MemoryError, RuntimeError) as exc:  # an allocation too large for this machine: one line, no traceback
        message = out_of_memory_message(exc)
        if message is None:
            raise
        line = f"batchpilot {args.command}: error: {message}"
        if getattr(args, "json", False):
            _print_error_json(line)
        print(line, file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # output piped into `head` and closed early: not an error
        _silence_stdout()
        return 0
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EIO, errno.EDQUOT, errno.EROFS, errno.EBADF):
            raise
        # stdout (or a file written late) on a full or broken device: one line, no traceback
        _silence_stdout()
        print(f"batchpilot {args.command}: error: cannot write output: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_USAGE
