"""Configuration backup: export each cluster's workload configuration to S3, the source of the config RPO.

Written to `<configuration.backup>/<YYYYMMDDTHHMMSSZ>/<cluster>.json`. Secret values are never exported.
"""

from __future__ import annotations

from prefect import flow

from drplan.clients import aws_client, kube_client
from drplan.errors import DrplanError
from drplan.logs import run_logger
from drplan.plan import DEFAULT_PLAN, Plan, load_plan
from drplan.timeutil import utcnow
from tasks.k8s import export_namespace
from tasks.s3 import STAMP, put_json


def export_configuration(plan: Plan) -> list[str]:
    if plan.configuration is None:
        raise DrplanError(f"plan {plan.name} has no configuration: {{backup: s3://...}}; add one")
    s3 = aws_client(plan, "s3")
    stamp = utcnow().strftime(STAMP)
    written = []
    for cluster in plan.clusters:
        exported = export_namespace(kube_client(plan, cluster), cluster.namespace)
        uri = f"{plan.configuration.backup}{stamp}/{cluster.name}.json"
        put_json(s3, uri, {"cluster": cluster.name, "namespace": cluster.namespace, "taken_at": stamp, **exported})
        written.append(uri)
    run_logger().info("configuration backup written: %s", ", ".join(written))
    return written


@flow(name="configuration-backup")
def configuration_backup(plan: str = DEFAULT_PLAN) -> list[str]:
    """Export every cluster's configuration to the plan's configuration backup location."""
    return export_configuration(load_plan(plan))
