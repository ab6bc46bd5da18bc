"""`drplan evidence verify|list`: the plan's chain of DR test records (drplan/evidence.py), in-process.
verify: exit 0 intact, 1 naming the first missing or altered record, 2 an error (no evidence location, unreadable)."""

from __future__ import annotations

import typer
from rich.markup import escape
from rich.table import Table

from cli.console import PlanOption, err, out, plan_or_exit, refusals

evidence_app = typer.Typer(no_args_is_help=True, help="The DR test evidence chain: verify it, list its records.")


@evidence_app.command("verify")
def evidence_verify(plan: str = PlanOption) -> None:
    """Walk the chain from record 1: exit 0 intact (count and head hash), 1 naming the first record that is
    missing, altered or not linked to the one before."""
    from drplan.evidence import open_store, verify

    dr_plan = plan_or_exit(plan)
    with refusals("evidence not verified"), err.status("verifying the evidence chain..."):
        check = verify(open_store(dr_plan))
    out.print(escape(check.summary), highlight=False, soft_wrap=True)
    raise typer.Exit(0 if check.ok else 1)


@evidence_app.command("list")
def evidence_list(
    plan: str = PlanOption,
    as_json: bool = typer.Option(False, "--json", help="Print the records as JSON."),
) -> None:
    """Every record: sequence, when, the DR test's status, its hash (a damaged record says so; `verify` checks the
    links)."""
    from drplan.evidence import Record, history, open_store

    dr_plan = plan_or_exit(plan)
    with refusals("evidence not listed"):
        store = open_store(dr_plan)
        records = history(store)
    if as_json:
        out.print_json(data=[r.model_dump(mode="json") if isinstance(r, Record) else {"problem": r}
                             for r in records])
        return
    table = Table(title=f"evidence of {dr_plan.name} in {store.location}", title_justify="left")
    for column in ("record", "recorded at", "DR test", "sha256"):
        table.add_column(column, overflow="fold")
    for r in records:
        if isinstance(r, Record):
            table.add_row(str(r.sequence), f"{r.recorded_at:%Y-%m-%d %H:%M:%SZ}", str(r.report.get("status", "?")),
                          r.sha256)
        else:
            table.add_row("", "", escape(r), "")
    out.print(table if records else f"no records in {store.location}", highlight=False)
