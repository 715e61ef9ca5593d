"""``batchpilot workloads``: list the built-in workloads."""

from __future__ import annotations

import argparse

from batchpilot.cli.common import print_json
from batchpilot.workloads import list_workloads


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("workloads", help="list the built-in workloads")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    names = list_workloads()
    if args.json:
        print_json(names)
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="batchpilot workloads (or load your own: file.py:fn, pkg.module:fn)")
    table.add_column("name")
    table.add_column("description")
    for name, desc in names.items():
        table.add_row(name, desc)
    Console().print(table)
    return 0
