"""Shared pieces of the CLI: consoles, the one-line error exit, loading a plan or exiting 2."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import typer
from rich.console import Console

from drplan.errors import DrplanError
from drplan.plan import Plan, PlanError, load_plan

# Reports, and the approval summary an approver signs off, stay readable (no truncated names) when piped or logged.
out = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print `error: message` on stderr and return the Exit to raise (exit 2 unless told otherwise)."""
    err.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


@contextmanager
def refusals(context: str = "") -> Iterator[None]:
    """A DrplanError raised inside becomes `error: [context: ]<its line>` on stderr and exit 2."""
    try:
        yield
    except DrplanError as exc:
        raise fail(f"{context}: {exc}" if context else str(exc)) from None


def plan_or_exit(ref: str) -> Plan:
    """Load a plan; a broken one prints one line per problem and exits 2 before anything runs."""
    try:
        return load_plan(ref)
    except PlanError as exc:
        for problem in exc.problems:
            err.print(f"{exc.source}: {problem}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


PlanOption = typer.Option("plans/sandbox.yaml", "--plan", "-p", help="Plan file, or a name under plans/.")
JsonOption = typer.Option(False, "--json", help="Print the report as JSON instead of markdown.")
