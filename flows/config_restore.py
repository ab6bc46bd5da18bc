"""Configuration error: return a service's configuration to the configuration backup at a time.

validate (plan, service, a time with a zone and not in the future, the newest configuration backup of the
service's cluster taken at or before it, the service's Deployment in that backup) -> the diff between the live
configuration and the backup: the Deployment's pod template, the ConfigMaps it references (key names), the Secrets
it references (names and changed keys only, through the backup's salted fingerprints; never values, and never
restored: a Secret's value is not in the backup) -> dry run: that diff and nothing else -> approval gate -> the
ConfigMaps and the pod template as in the backup (a rollout restart when only ConfigMaps change) -> wait for the
rollout -> recovery validation -> passed: recorded as the newest known-good revision; failed: the configuration
before the run applied again. A rerun finds nothing to change and only validates; after a killed run it undoes to
the revision that run saved (drplan.io/undo) when validation fails.
"""

from __future__ import annotations

from prefect import flow

from drplan.clients import aws_client, kube_client
from drplan.errors import DrplanError
from drplan.plan import DEFAULT_PLAN, Cluster, Plan, Service, load_plan
from flows.shared.report import finished, published
from flows.shared.requests import past_time
from flows.shared.service_change import ServiceChangeReport, change_and_validate, service_in_cluster
from tasks.k8s import live_secret_fingerprints
from tasks.revisions import Revision, read_deployment, references
from tasks.s3 import configuration_backup_at, get_json


def resolve(plan: str, service: str, to: str) -> tuple[Plan, Service, Cluster, str, dict]:
    """Every user-typed parameter, before the first side effect; refused in one line. Returns the backup's URI and
    document as well."""
    dr_plan = load_plan(plan)
    svc, cluster = service_in_cluster(dr_plan, service)
    if dr_plan.configuration is None:
        raise DrplanError(f"plan {dr_plan.name} has no configuration: {{backup: s3://...}}; add one")
    when = past_time(to, "--to", "choose a past time")
    uri = configuration_backup_at(aws_client(dr_plan, "s3"), dr_plan.configuration.backup, cluster.name, when)
    if uri is None:
        raise DrplanError(f"no configuration backup of cluster {cluster.name} at or before {when:%Y-%m-%dT%H:%M:%SZ} "
                          f"under {dr_plan.configuration.backup}; choose a later time")
    backup = get_json(aws_client(dr_plan, "s3"), uri)
    if not any(d["metadata"]["name"] == svc.name for d in backup.get("deployments", [])):
        raise DrplanError(f"the configuration backup {uri} holds no deployment {svc.name}; choose another time")
    return dr_plan, svc, cluster, uri, backup


def backed_up_revision(backup: dict, deployment: str) -> Revision:
    """The revision of `deployment` in a configuration backup: its pod template and the ConfigMaps it references."""
    template = next(d for d in backup["deployments"] if d["metadata"]["name"] == deployment)["spec"]["template"]
    configmaps, secrets = references(template)
    return Revision(template=template, secrets=sorted(secrets), configmaps={
        c["metadata"]["name"]: c.get("data") or {} for c in backup.get("configmaps", [])
        if c["metadata"]["name"] in configmaps})


def secret_differences(api, namespace: str, backup: dict, names: list[str]) -> list[str]:
    """The referenced Secrets that differ from the backup: missing ones, added, removed and changed key names."""
    if "fingerprint_salt" not in backup:
        return ["this backup keeps Secret names only (taken before fingerprints): Secret keys not compared"]
    then = backup["secret_fingerprints"]
    now = live_secret_fingerprints(api, namespace, names, backup["fingerprint_salt"])
    notes = []
    for name in names:
        old, new = then.get(name), now.get(name)
        if old is None or new is None:
            notes.append(f"Secret {name} " + ("not in the backup" if old is None else "missing now"))
            continue
        parts = [f"{what} {', '.join(keys)}" for what, keys in (
            ("keys added", sorted(new.keys() - old.keys())), ("keys removed", sorted(old.keys() - new.keys())),
            ("keys changed", sorted(k for k in old.keys() & new.keys() if old[k] != new[k]))) if keys]
        if parts:
            notes.append(f"Secret {name}: {'; '.join(parts)} since the backup")
    return notes


@flow(name="config-restore")
def config_restore(
    plan: str = DEFAULT_PLAN,
    service: str = "",
    to: str = "",
    dry_run: bool = False,
    approve: bool = False,
) -> ServiceChangeReport:
    """Return the service's ConfigMaps and pod template to the configuration backup at `to`, and validate."""
    dr_plan, svc, cluster, uri, backup = resolve(plan, service, to)
    target = backed_up_revision(backup, svc.name)
    report = ServiceChangeReport(flow="config-restore", plan=dr_plan.name, subject=svc.name, dry_run=dry_run,
                                 target=f"configuration backup {uri}")
    with published(report, f"config-restore-{svc.name}", dr_plan):
        api = kube_client(dr_plan, cluster)
        live_secrets = references(read_deployment(api, cluster.namespace, svc.name)["spec"]["template"])[1]
        report.notes = secret_differences(api, cluster.namespace, backup, sorted(live_secrets | set(target.secrets)))
        for note in report.notes:
            report.record("compared", svc.name, f"{note} (not restored: values are not backed up)")
        change_and_validate(dr_plan, report, svc, cluster, target, (
            f"## Approve the configuration restore of {svc.name}?\n\nDeployment **{svc.name}** in {cluster.name} "
            f"gets its ConfigMaps and pod template as in `{uri}`, a rollout, recovery validation. Validation "
            "failure applies the current configuration again. Secrets are compared, not restored."), approve)
    return finished(report, f"configuration restore of {svc.name}")

