"""``batchpilot doctor``: check a training config or plan for batch-size pitfalls.

Exit codes: 0 no errors (warnings and notes allowed), 1 at least one error finding,
2 the config could not be read (one-line message).
"""

from __future__ import annotations

import argparse

from batchpilot.cli.common import print_json
from batchpilot.doctor import Finding, check_config, exit_code, report_dict
from batchpilot.doctor.catalog import RULES
from batchpilot.errors import BatchpilotError

_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "doctor", help="check a training config or plan.json for batch-size pitfalls",
        description="Check a YAML/JSON/TOML training config, or a plan.json from `batchpilot plan`, for the "
                    "batch-size pitfalls (LR scaling, warmup, BatchNorm, accumulation, EMA/scheduler stepping ...). "
                    "Exit codes: 0 no errors, 1 errors found, 2 unreadable config. Schema and codes: docs/doctor.md.")
    p.add_argument("config", metavar="CONFIG", help="a .yaml/.yml, .json or .toml config, or a plan.json")
    p.add_argument("--section", default=None, metavar="KEY[.KEY]", help="read the fields from this (dotted) section of the file")
    p.add_argument("--ignore", action="append", default=[], metavar="CODE", help="drop findings with this code (repeatable)")
    p.add_argument("--json", action="store_true", help="print the findings as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    ignored = {code.strip().upper() for code in args.ignore}
    bad = sorted(ignored - set(RULES))
    if bad:
        raise BatchpilotError(f"--ignore: unknown code(s) {', '.join(bad)}; codes are listed in docs/doctor.md")
    findings = [f for f in check_config(args.config, args.section) if f.code not in ignored]
    if args.json:
        print_json(report_dict(findings, source=args.config))
    else:
        render(findings, args.config)
    return exit_code(findings)


def render(findings: list[Finding], source: str) -> None:
    """Print the findings for a terminal, most severe first."""
    from rich.console import Console
    from rich.markup import escape
    from rich.padding import Padding

    console = Console(highlight=False)
    if not findings:
        console.print(f"[green]batchpilot doctor: {escape(source)}: no findings[/]")
        return
    for f in findings:
        console.print(f"[{_STYLE[f.severity]}]{f.severity:<7}[/] [bold]{f.code}[/] {escape(f.title)}")
        body = (f"{escape(f.message)}\n[dim]why:[/] {escape(f.reason)} [dim]({escape(f.source)})[/]\n"
                f"[green]fix:[/] {escape(f.fix)}")
        console.print(Padding(body, (0, 0, 0, 8), expand=False))
    counts = report_dict(findings)["counts"]
    console.print(f"batchpilot doctor: {escape(source)}: {counts['error']} error(s), {counts['warning']} warning(s), "
                  f"{counts['info']} note(s)")
