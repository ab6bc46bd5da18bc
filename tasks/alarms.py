"""CloudWatch alarms: which of the named alarms exist, and their state."""

from __future__ import annotations

from datetime import UTC, datetime

from pydantic import BaseModel

BATCH = 100
"""DescribeAlarms takes at most 100 names per call."""


class AlarmState(BaseModel):
    name: str
    state: str
    """OK, ALARM or INSUFFICIENT_DATA."""
    since: datetime
    reason: str = ""


def read_alarms(cloudwatch, names: list[str]) -> dict[str, AlarmState]:
    """The state of each alarm of `names` that exists (metric and composite alarms), by name."""
    found: dict[str, AlarmState] = {}
    paginator = cloudwatch.get_paginator("describe_alarms")
    for start in range(0, len(names), BATCH):
        pages = paginator.paginate(AlarmNames=names[start:start + BATCH], AlarmTypes=["MetricAlarm", "CompositeAlarm"])
        for page in pages:
            for alarm in page.get("MetricAlarms", []) + page.get("CompositeAlarms", []):
                since = alarm["StateUpdatedTimestamp"]
                found[alarm["AlarmName"]] = AlarmState(
                    name=alarm["AlarmName"], state=alarm["StateValue"], reason=alarm.get("StateReason", ""),
                    since=since.astimezone(UTC) if since.tzinfo else since.replace(tzinfo=UTC))
    return found
