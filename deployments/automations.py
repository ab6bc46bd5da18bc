"""Automations that notify the plan's channel (the notification block named by `notifications.slack_webhook_block`):
an RPO objective breached or not measurable, the DR region not ready, a restore drill run failed, a recovery run
failed or waits for approval. `ensure()` creates each by name or updates it in place, so running it again creates
no duplicates.

    PREFECT_API_URL=... PREFECT_API_AUTH_STRING=... python -m deployments.automations plans/devonn.yaml
"""

from __future__ import annotations

import sys
from datetime import timedelta
from uuid import UUID

from prefect.automations import AutomationCore, EventTrigger, Posture, RunDeployment, SendNotification
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import BlockDocument
from prefect.exceptions import ObjectNotFound

from drplan.errors import DrplanError
from drplan.notification_blocks import notification_blocks
from drplan.plan import ALARM_FIRING, AlarmRunbook, Plan, load_plan

RECOVERY_TAG = "drplan-recovery"
"""Recovery deployments carry this tag (prefect.yaml); their flow runs inherit it."""

RPO_REMINDER = timedelta(minutes=15)
"""A measurement that stays breached is re-notified at most this often."""
READINESS_REMINDER = timedelta(minutes=30)

_RUN_BODY = ("{{ flow_run.state.message or '' }}\n"
             "Run {{ flow_run.name }} ({{ flow_run.id }}), parameters {{ flow_run.parameters }}\n"
             "{{ flow_run|ui_url }}")


def find_notification_block(name: str) -> BlockDocument | None:
    """The notification block (any type that can notify) named `name`, or None. Secrets are not read."""
    found = [d for d in notification_blocks() if d.name == name]
    if len(found) > 1:
        kinds = ", ".join(d.block_type.slug for d in found if d.block_type)
        raise DrplanError(f"{len(found)} notification blocks are named {name!r} ({kinds}); delete all but one")
    return found[0] if found else None


def _flow_runs(name: str, description: str, related: dict, states: list[str], subject: str,
               channel: UUID) -> AutomationCore:
    """Notify once per flow run of the `related` flow or tag that enters one of `states`."""
    return AutomationCore(
        name=name, description=description,
        trigger=EventTrigger(
            expect={f"prefect.flow-run.{state}" for state in states},
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related=related,
            for_each={"prefect.resource.id"},
            posture=Posture.Reactive, threshold=1, within=timedelta(0),
        ),
        actions=[SendNotification(block_document_id=channel, subject=subject, body=_RUN_BODY)],
    )


def automations(channel: UUID) -> list[AutomationCore]:
    """Every drplan automation, each notifying the block `channel`."""
    return [
        AutomationCore(
            name="drplan: RPO breached",
            description="A drplan.rpo.breached or drplan.rpo.unverified event (flows/rpo_verification.py).",
            trigger=EventTrigger(
                expect={"drplan.rpo.breached", "drplan.rpo.unverified"},
                match={"prefect.resource.id": "drplan.*"},
                for_each={"prefect.resource.id", "drplan.measure"},
                posture=Posture.Reactive, threshold=1, within=RPO_REMINDER,
            ),
            actions=[SendNotification(
                block_document_id=channel,
                subject="drplan: RPO {{ 'breached' if event.event == 'drplan.rpo.breached' else 'not verified' }}: "
                        "{{ event.resource.name }}",
                body="{{ event.resource.name }} {{ event.resource['drplan.measure'] }}: "
                     "age {{ event.payload.age_seconds }} s, objective {{ event.payload.objective_seconds }} s. "
                     "{{ event.payload.detail }}",
            )],
        ),
        AutomationCore(
            name="drplan: DR region not ready",
            description="A drplan.readiness.unready event (flows/dr_readiness.py): the DR region could not take over "
                        "right now. Re-notified at most every 30 minutes while it lasts.",
            trigger=EventTrigger(
                expect={"drplan.readiness.unready"},
                match={"prefect.resource.id": "drplan.region.*"},
                for_each={"prefect.resource.id"},
                posture=Posture.Reactive, threshold=1, within=READINESS_REMINDER,
            ),
            actions=[SendNotification(
                block_document_id=channel,
                subject="drplan: region {{ event.resource.name }} not ready to take over",
                body="{{ event.payload.unready | join('\n') }}",
            )],
        ),
        _flow_runs(
            "drplan: restore drill failed",
            "A restore-drill run ended Failed, Crashed or TimedOut (a check failed, a restore errored, or the run "
            "never got to drill). The per-database drplan.drill.* events carry the details.",
            {"prefect.resource.role": "flow", "prefect.resource.name": "restore-drill"},
            ["Failed", "Crashed", "TimedOut"],
            "drplan: restore drill {{ flow_run.state.name }}", channel,
        ),
        _flow_runs(
            "drplan: recovery needs attention",
            f"A run tagged {RECOVERY_TAG} failed, or paused waiting for approval (resume it in the UI or through "
            "POST /api/flow_runs/<id>/resume with the approval input).",
            {"prefect.resource.id": f"prefect.tag.{RECOVERY_TAG}"},
            ["Failed", "Crashed", "TimedOut", "Paused", "Suspended"],
            "drplan: recovery {{ flow.name }} {{ flow_run.state.name }}", channel,
        ),
    ]


ALARM_PREFIX = "drplan: alarm "


def alarm_automation(mapping: AlarmRunbook, deployment_id: UUID) -> AutomationCore:
    """Run the mapping's deployment when its alarm fires (flows/alarm_watch.py), at most once per cooldown."""
    parameters: dict = {**mapping.parameters,
                        "first_alarm": {"__prefect_kind": "jinja", "template": "{{ event.payload.since }}"}}
    if mapping.unattended:
        parameters["approve"] = True
    return AutomationCore(
        name=f"{ALARM_PREFIX}{mapping.alarm} -> {mapping.deployment_name}",
        description=f"CloudWatch alarm {mapping.alarm} in ALARM (drplan.alarm.firing from alarm-watch) runs "
                    f"{mapping.deployment_name}" + (" approved in advance (unattended)" if mapping.unattended
                                                     else ", which waits for approval"),
        trigger=EventTrigger(
            expect={ALARM_FIRING}, match={"prefect.resource.id": mapping.resource_id},
            posture=Posture.Reactive, threshold=1, within=mapping.cooldown,
        ),
        actions=[RunDeployment(source="selected", deployment_id=deployment_id, parameters=parameters)],
    )


def ensure_alarm_runbooks(plan: Plan) -> list[str]:
    """One automation per `alarms:` mapping (its deployment must exist), updated in place; automations of mappings
    the plan no longer has are deleted. Returns one line per change."""
    lines = []
    with get_client(sync_client=True) as client:
        wanted = {}
        for mapping in plan.alarms:
            try:
                deployment = client.read_deployment_by_name(mapping.deployment_name)
            except ObjectNotFound:
                raise DrplanError(f"alarm {mapping.alarm}: no deployment {mapping.deployment_name}; deploy it "
                                  f"(prefect.yaml) or fix alarms[].deployment") from None
            automation = alarm_automation(mapping, deployment.id)
            wanted[automation.name] = automation
        for existing in client.read_automations():
            if existing.name.startswith(ALARM_PREFIX) and existing.name not in wanted:
                client.delete_automation(existing.id)
                lines.append(f"deleted automation {existing.name!r}")
        lines += [_upsert(client, automation) for automation in wanted.values()]
    return lines


def _upsert(client, automation: AutomationCore) -> str:
    """Create `automation`, or update the one of its name in place (duplicates made by hand are deleted)."""
    existing = client.read_automations_by_name(automation.name)
    for duplicate in existing[1:]:
        client.delete_automation(duplicate.id)
    if existing:
        client.update_automation(existing[0].id, automation)
        return f"updated automation {automation.name!r}"
    client.create_automation(automation)
    return f"created automation {automation.name!r}"


def ensure(block_name: str) -> list[str]:
    """Create or update every automation, notifying block `block_name`. Returns one line per automation."""
    block = find_notification_block(block_name)
    if block is None:
        raise DrplanError(f"no notification block named {block_name!r}; create it first, e.g. "
                          f"SlackWebhook(url=...).save({block_name!r}) (deployments/README.md)")
    with get_client(sync_client=True) as client:
        return [_upsert(client, automation) for automation in automations(block.id)]


def main(plan_ref: str) -> None:
    block_name = load_plan(plan_ref).notifications.slack_webhook_block
    if not block_name:
        raise SystemExit(f"{plan_ref}: set notifications.slack_webhook_block to the channel's block name")
    for line in ensure(block_name):
        print(line)


if __name__ == "__main__":
    main(sys.argv[1])
