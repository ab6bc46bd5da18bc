"""Configuration backup: export each cluster's workload configuration to S3, the source of the config RPO.

Written to `<configuration.backup>/<YYYYMMDDTHHMMSSZ>/<cluster>.json`. Secret values are never exported (their
keys with salted fingerprints are, for `drplan config-restore`). Before each export, every service of the cluster
that passes recovery validation gets its known-good revision recorded (tasks/revisions.py).
"""

from __future__ import annotations

from kubernetes import client as k8s
from prefect import flow

from drplan.clients import aws_client, kube_client
from drplan.errors import DrplanError
from drplan.logs import run_logger
from drplan.plan import DEFAULT_PLAN, Cluster, Plan, load_plan
from drplan.timeutil import utcnow
from tasks.health import validate_service
from tasks.k8s import availability, deployment_exists, export_namespace, export_secret_keys
from tasks.revisions import remember_known_good
from tasks.s3 import STAMP, put_json


def export_configuration(plan: Plan) -> list[str]:
    if plan.configuration is None:
        raise DrplanError(f"plan {plan.name} has no configuration: {{backup: s3://...}}; add one")
    s3 = aws_client(plan, "s3")
    stamp = utcnow().strftime(STAMP)
    written = []
    for cluster in plan.clusters:
        record_validated(plan, cluster)
        api = kube_client(plan, cluster)
        exported = {**export_namespace(api, cluster.namespace), **export_secret_keys(api, cluster.namespace)}
        uri = f"{plan.configuration.backup}{stamp}/{cluster.name}.json"
        put_json(s3, uri, {"cluster": cluster.name, "namespace": cluster.namespace, "taken_at": stamp, **exported})
        written.append(uri)
    run_logger().info("configuration backup written: %s", ", ".join(written))
    return written


def record_validated(plan: Plan, cluster: Cluster) -> None:
    """Each service running in the cluster whose rollout is done and that passes recovery validation now (one pass)
    gets what it runs recorded as its newest known-good revision, before the export carries the history along."""
    api = kube_client(plan, cluster)
    for service in plan.services:
        if service.cluster != cluster.name or not deployment_exists(api, cluster.namespace, service.name):
            continue
        done, state = availability(k8s.AppsV1Api(api).read_namespaced_deployment(service.name, cluster.namespace))
        if not done:  # a stalled rollout (old pods still serving) would pass validation with a release that fails
            run_logger().info("%s not recorded as known-good: its rollout is not done (%s)", service.name, state)
            continue
        validation = validate_service(plan, service)
        if validation.passed:
            remember_known_good(plan, cluster, service.name, "configuration backup")
        else:
            run_logger().info("%s not recorded as known-good: validation failed (%s)", service.name,
                              ", ".join(c.name for c in validation.checks if not c.passed))


@flow(name="configuration-backup")
def configuration_backup(plan: str = DEFAULT_PLAN) -> list[str]:
    """Export every cluster's configuration to the plan's configuration backup location."""
    return export_configuration(load_plan(plan))
