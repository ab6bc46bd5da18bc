"""Alarm watch (every minute): the plan's alarm-to-runbook mappings (`alarms:`) against CloudWatch. Each mapped alarm
in ALARM becomes a `drplan.alarm.firing` event; the automation `drplan serve` made for the mapping runs the
runbook's deployment (waiting for approval unless the mapping is `unattended`), at most once per `cooldown`, with
`first_alarm` set to when the alarm fired. A mapped alarm that does not exist fails the run, naming it: a typo
must not leave a runbook that never starts."""

from __future__ import annotations

from itertools import groupby

from prefect import flow, get_run_logger
from prefect.events import emit_event
from prefect.states import Failed

from drplan.clients import aws_client
from drplan.plan import ALARM_FIRING, DEFAULT_PLAN, AlarmRunbook, Plan, load_plan
from tasks.alarms import AlarmState, read_alarms


def mapped_states(plan: Plan) -> list[tuple[AlarmRunbook, AlarmState | None]]:
    """Each mapping with its alarm's state (None: no such alarm in its region)."""
    def region(m: AlarmRunbook) -> str:
        return m.region or plan.aws.region

    result = []
    for where, mappings in groupby(sorted(plan.alarms, key=region), key=region):
        mappings = list(mappings)
        states = read_alarms(aws_client(plan, "cloudwatch", where), sorted({m.alarm for m in mappings}))
        result.extend((m, states.get(m.alarm)) for m in mappings)
    return result


@flow(name="alarm-watch")
def alarm_watch(plan: str = DEFAULT_PLAN) -> list[str]:
    """Emit `drplan.alarm.firing` for every mapped alarm in ALARM; returns the alarms that fire."""
    dr_plan = load_plan(plan)
    logger = get_run_logger()
    firing, missing = [], []
    for mapping, alarm in mapped_states(dr_plan):
        if alarm is None:
            missing.append(f"{mapping.alarm} ({mapping.region or dr_plan.aws.region})")
            continue
        if alarm.state != "ALARM":
            continue
        firing.append(mapping.alarm)
        logger.warning("alarm %s in ALARM since %s: %s -> runbook %s", alarm.name, alarm.since.isoformat(),
                       alarm.reason, mapping.deployment_name)
        emit_event(event=ALARM_FIRING, resource={"prefect.resource.id": mapping.resource_id,
                                                 "prefect.resource.name": mapping.alarm},
                   payload={"since": alarm.since.isoformat(), "reason": alarm.reason,
                            "runbook": mapping.deployment_name})
    if missing:
        return Failed(message=f"no such CloudWatch alarm: {', '.join(missing)}; fix alarms[].alarm in plan "
                              f"{dr_plan.name}", data=firing)
    return firing
