"""The recovery and drill copies of a plan's databases: listed with the services whose Deployment uses each (the live
topology's bindings), and removed only when no service does. Plain functions: the CLI calls them in-process."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

from botocore.exceptions import BotoCoreError, ClientError
from pydantic import BaseModel

from drplan.errors import DrplanError, first_line
from drplan.logs import run_logger
from drplan.plan import Database, Plan
from drplan.topology import Binding
from tasks.targets import Copy, restore_target
from tasks.topology import bindings

COLUMNS = ["copy", "kind", "target time", "created", "served since", "address", "used by"]


class RecoveryCopy(BaseModel):
    """One copy as listed: what it holds, where it answers, which services use it now."""

    database: str
    name: str
    kind: str
    """`drill` or `recovery`."""
    target_time: datetime | None = None
    created_at: datetime | None = None
    served_at: datetime | None = None
    address: str = "-"
    used_by: list[str] = []
    """`service S in cluster C` for each service whose Deployment's DATABASE_URL points at the copy."""
    unknown: list[str] = []
    """`service S in cluster C (why)` for each service whose binding could not be read: it might use the copy."""

    @property
    def row(self) -> dict[str, str]:
        """The copy as COLUMNS -> cell."""
        used = self.used_by + [f"unknown: {u}" for u in self.unknown]
        cells = [self.name, self.kind, _stamp(self.target_time), _stamp(self.created_at),
                 _stamp(self.served_at), self.address, ", ".join(used) or "-"]
        return dict(zip(COLUMNS, cells, strict=True))


def list_copies(plan: Plan, database: str | None = None) -> list[RecoveryCopy]:
    """Every copy of the plan's databases (or of one; an unknown name is refused): postgres from the markers on this
    machine, rds from the instances in aws.region tagged for the database."""
    chosen = [plan.database(database)] if database else plan.databases
    return [copy for db in chosen for copy in _copies_of(plan, db)]


def _copies_of(plan: Plan, db: Database) -> list[RecoveryCopy]:
    """The database's copies by name, each with the services using it (bindings read only when there is a copy)."""
    with _aws_errors(f"the copies of {db.name} cannot be listed"):
        copies = sorted(restore_target(plan, db).copies(), key=lambda c: c.name)
    if not copies:
        return []
    found = bindings(plan, db, {(c.host, c.port): c.name for c in copies if c.host})
    return [_listed(db, copy, found) for copy in copies]


def _listed(db: Database, copy: Copy, found: list[Binding]) -> RecoveryCopy:
    return RecoveryCopy(
        database=db.name, name=copy.name, kind=copy.kind, target_time=copy.target_time, created_at=copy.created_at,
        served_at=copy.served_at, address=f"{copy.host}:{copy.port}" if copy.host else "-",
        used_by=[f"service {b.service} in cluster {b.cluster}" for b in found if b.member == copy.name],
        unknown=[f"service {b.service} in cluster {b.cluster} ({b.error})" for b in found if b.error])


def removable(plan: Plan, name: str) -> RecoveryCopy:
    """The copy `name`, if it may be removed: refused when it is no copy of the plan, or a service uses it (or its
    binding cannot be read)."""
    db = next((d for d in plan.databases if name.rsplit("-", 2)[0] == d.name), None)
    copy = next((c for c in _copies_of(plan, db) if c.name == name), None) if db else None
    if copy is None:
        raise DrplanError(f"{name} is no recovery or drill copy of plan {plan.name}; `drplan copies list` shows them")
    if copy.used_by:
        raise DrplanError(f"copy {name} serves {' and '.join(copy.used_by)}; fail over or recover elsewhere first")
    if copy.unknown:
        raise DrplanError(f"cannot tell whether copy {name} serves {copy.unknown[0]}; make that cluster readable "
                          "first")
    return copy


def remove_copy(plan: Plan, name: str) -> RecoveryCopy:
    """Drop copy `name` (refused as `removable` says, nothing changed) and log it."""
    copy = removable(plan, name)
    with _aws_errors(f"removing copy {name} failed"):
        restore_target(plan, plan.database(copy.database)).drop(name)
    run_logger().info("removed %s copy %s of %s (restored to %s)", copy.kind, name, copy.database,
                      _stamp(copy.target_time))
    return copy


@contextmanager
def _aws_errors(what: str) -> Iterator[None]:
    """An AWS error (unreachable, throttled, an instance in the wrong state) as one line."""
    try:
        yield
    except (BotoCoreError, ClientError) as exc:
        raise DrplanError(f"{what}: {first_line(exc)}") from None


def _stamp(when: datetime | None) -> str:
    """UTC to the millisecond, like the copy names."""
    if when is None:
        return "-"
    when = when.astimezone(UTC)
    return f"{when:%Y-%m-%d %H:%M:%S}.{when.microsecond // 1000:03d}Z"
