"""Validation of a restore request (plan, database, target time) before the first side effect, shared by the
drill and PITR recovery."""

from __future__ import annotations

import random
from datetime import datetime, timedelta

from drplan.errors import DrplanError
from drplan.plan import load_plan
from drplan.timeutil import parse_duration, parse_utc, utcnow
from tasks.targets import RestorableWindow


def choose_target_time(
    window: RestorableWindow, target_time: datetime | None, random_within: timedelta | None, margin: timedelta
) -> datetime:
    """Explicit time (validated against the window), a random time in the last `random_within`, or the latest
    restorable time minus `margin`."""
    if target_time is not None:
        window.check(target_time)
        return target_time
    latest = window.latest - margin
    if latest < window.earliest:
        raise DrplanError(f"the restorable window [{window.earliest:%H:%M:%SZ}, {window.latest:%H:%M:%SZ}] is "
                          f"shorter than the target margin {margin}; wait, or pass an explicit target time")
    if random_within is None:
        return latest
    earliest = max(window.earliest, latest - random_within)
    return earliest + (latest - earliest) * random.random()


def validate_request(plan: str, database: str | None, target_time: str | None, random_within: str | None):
    """Every user-typed parameter, before the first side effect. Raises DrplanError with the fix."""
    dr_plan = load_plan(plan)
    databases = [dr_plan.database(database)] if database else list(dr_plan.databases)
    if not databases:
        raise DrplanError(f"plan {dr_plan.name} defines no databases to drill")
    if target_time is not None and not target_time.strip():
        raise DrplanError("the target time is empty; give an ISO 8601 time with a zone (2026-11-26T03:00:00Z) or "
                          "'latest' (an empty variable must not restore the damage itself)")
    if target_time and random_within:
        raise DrplanError("pass either target_time or random_within, not both")
    try:
        when = parse_utc(target_time) if target_time and target_time != "latest" else None
        spread = parse_duration(random_within) if random_within else None
    except ValueError as exc:
        raise DrplanError(str(exc)) from None
    if when and when > utcnow():
        raise DrplanError(f"target time {when:%Y-%m-%dT%H:%M:%SZ} is in the future; choose a past time")
    return dr_plan, databases, when, spread


def past_time(value: str, label: str, hint: str) -> datetime:
    """A user-typed time (with a zone) that has passed; DrplanError naming `label`, and `hint` for a future one."""
    try:
        when = parse_utc(value)
    except ValueError as exc:
        raise DrplanError(f"{label}: {exc}") from None
    if when > utcnow():
        raise DrplanError(f"{label} {when:%Y-%m-%dT%H:%M:%SZ} is in the future; {hint}")
    return when


def first_alarm_time(value: str | None) -> datetime | None:
    """The `first_alarm` parameter (the time the alarm that started a runbook fired), validated."""
    return None if value is None else past_time(value, "first_alarm", "pass the time the alarm fired")
