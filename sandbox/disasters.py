"""Disasters to rehearse on the sandbox (`drplan sandbox break SCENARIO`). Each breaks one thing the way production
breaks and names the drplan command that recovers it. Only the sandbox's own servers and buckets are touched.
`drplan sandbox down --purge && make run` rebuilds everything."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import psycopg

from drplan.clients import aws_client, check_aws_access, kube_client
from drplan.errors import DrplanError
from drplan.plan import Cluster, Database, DatabaseKind, Plan, Service
from drplan.s3store import parse_prefix
from drplan.timeutil import utcnow
from sandbox.demo_app import ORDERS_TABLE
from sandbox.kubelet import BROKEN_TAG
from sandbox.stack import is_pilot_light, sandbox_postgres
from tasks.eks import scale_nodegroup
from tasks.k8s import wait_deployment_available
from tasks.revisions import apply_revision, known_good, live_revision
from tasks.rotation import LEAKED_TAG
from tasks.route53 import fqdn, read_records, zone_id

DELETED_SHARE = 7
"""Every DELETED_SHARE-th order (by id) and object (by key order) is deleted."""
WRONG_ORDERS_TABLE = "orders_v2"
"""bad-config's setting: a table the demo database does not have."""


@dataclass(frozen=True)
class Disaster:
    broken: str
    """What was broken, in one line."""
    recover: str
    """The drplan command that recovers it."""


def _database(plan: Plan) -> Database:
    for db in plan.databases:
        if db.kind is DatabaseKind.postgres:
            return db
    raise DrplanError(f"plan {plan.name} has no postgres-kind database; the sandbox runs only those")


def delete_orders(plan: Plan, plan_ref: str) -> Disaster:
    """Data loss at a known time: every 7th order deleted on the primary (then a WAL switch, so it is archived)."""
    db = _database(plan)
    before = utcnow().replace(microsecond=0)
    time.sleep(1.0)  # the deletes commit strictly after `before`
    try:
        with sandbox_postgres(plan, db).connect(db.primary) as conn:
            deleted = conn.execute(f"DELETE FROM orders WHERE id % {DELETED_SHARE} = 0").rowcount
            conn.execute("SELECT pg_switch_wal()")
    except psycopg.OperationalError:
        raise DrplanError(f"the primary {db.primary} does not answer; is the sandbox up (drplan sandbox up)?") from None
    at = before.strftime("%Y-%m-%dT%H:%M:%SZ")
    return Disaster(
        f"deleted {deleted} orders of {db.name} on {db.primary} after {at}",
        f"drplan recover --plan {plan_ref} --database {db.name} --to {at} --promote   (in "
        f"{int(plan.drill.target_margin.total_seconds())} s, once the WAL is archived)")


def stop_primary(plan: Plan, plan_ref: str) -> Disaster:
    """The primary is gone: fast shutdown of its server (the streaming replicas keep running)."""
    db = _database(plan)
    stopped = sandbox_postgres(plan, db).stop(db.primary)
    return Disaster(
        f"stopped the primary {db.primary} of {db.name}" if stopped else f"{db.primary} was already stopped",
        f"drplan failover --plan {plan_ref} --database {db.name} --mode multi-az   (promotes the streaming replica)")


def delete_objects(plan: Plan, plan_ref: str) -> Disaster:
    """Objects lost from every live bucket: every 7th key deleted."""
    if not plan.buckets:
        raise DrplanError(f"plan {plan.name} has no buckets; add buckets: [{{name, live, backup}}]")
    s3, lines, commands = aws_client(plan, "s3"), [], []
    for bucket in plan.buckets:
        name, prefix = parse_prefix(bucket.live)
        keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=name, Prefix=prefix)
                for o in page.get("Contents", [])]
        doomed = keys[::DELETED_SHARE]
        for start in range(0, len(doomed), 1000):
            s3.delete_objects(Bucket=name, Delete={"Objects": [{"Key": k} for k in doomed[start:start + 1000]]})
        lines.append(f"deleted {len(doomed)} of {len(keys)} objects from {bucket.live}")
        commands.append(f"drplan s3-restore --plan {plan_ref} --from {bucket.backup} --to {bucket.live}")
    return Disaster("; ".join(lines), " && ".join(commands))


def dr_nodes_zero(plan: Plan, plan_ref: str) -> Disaster:
    """The DR region loses its standby capacity: every node group of its cluster scaled to zero nodes."""
    cluster = next((c for c in plan.clusters if is_pilot_light(plan, c)), None)
    if cluster is None:
        raise DrplanError(f"plan {plan.name} has no cluster in aws.dr_region; add one with region: <dr_region>")
    eks, api = aws_client(plan, "eks", plan.region_of(cluster)), kube_client(plan, cluster)
    was = {group: scale_nodegroup(eks, api, cluster.name, group, 0, timeout=60)[0] for group in cluster.nodegroups}
    nodes = " ".join(f"--nodes {group}={spec.desired}" for group, spec in cluster.nodegroups.items())
    return Disaster(
        f"scaled node groups of {cluster.name} to 0 ({', '.join(f'{g} was {n}' for g, n in was.items())})",
        f"drplan eks-recover --plan {plan_ref} --cluster {cluster.name} {nodes} --no-manifests   "
        "(drplan readiness reports the lost capacity)")


def delete_dns(plan: Plan, plan_ref: str) -> Disaster:
    """The service's DNS records are gone (a bad change, a deleted zone entry)."""
    if plan.dns is None:
        raise DrplanError(f"plan {plan.name} has no dns section; add dns: {{zone, records, targets}}")
    r53 = aws_client(plan, "route53")
    zone, current = zone_id(r53, plan.dns.zone), read_records(r53, plan.dns)
    gone = {name: answer for name, answer in current.items() if answer is not None}
    if gone:
        r53.change_resource_record_sets(HostedZoneId=zone, ChangeBatch={"Changes": [{
            "Action": "DELETE", "ResourceRecordSet": {"Name": fqdn(name), "Type": "CNAME", "TTL": ttl,
                                                      "ResourceRecords": [{"Value": value}]}}
            for name, (value, ttl) in gone.items()]})
    return Disaster(
        f"deleted the DNS records {', '.join(gone)}" if gone else "the DNS records were already gone",
        f"drplan dns-failover --plan {plan_ref} --to {plan.aws.region}   (drplan readiness reports the records "
        "missing)")


def _app(plan: Plan) -> tuple[Service, Cluster]:
    """The first service the plan runs in a cluster of the primary region (the sandbox's devonn-api)."""
    for service in plan.services:
        if service.cluster and not is_pilot_light(plan, plan.cluster(service.cluster)):
            return service, plan.cluster(service.cluster)
    raise DrplanError(f"plan {plan.name} has no service in a cluster of {plan.aws.region}; add services[].cluster")


def bad_deploy(plan: Plan, plan_ref: str) -> Disaster:
    """A release whose image fails its health check (the sandbox's broken build): its pods never become ready, the
    rollout stalls and the old pods keep serving until someone acts."""
    service, cluster = _app(plan)
    api = kube_client(plan, cluster)
    if not known_good(api, cluster.namespace, service.name):
        raise DrplanError(f"{service.name} has no known-good revision to roll back to yet; take a configuration "
                          "backup first: drplan trigger configuration-backup/configuration-backup")
    live = live_revision(api, cluster.namespace, service.name)
    template = copy.deepcopy(live.template)
    container = template["spec"]["containers"][0]
    image = container["image"]
    repository = image.rpartition(":")[0] if ":" in image.rsplit("/", 1)[-1] else image
    container["image"] = f"{repository}:{BROKEN_TAG}"
    apply_revision(api, cluster.namespace, service.name, live.model_copy(update={"template": template}))
    return Disaster(
        f"deployed {container['image']} to {service.name} (was {image}): its pods never pass the health check",
        f"drplan rollback --plan {plan_ref} --service {service.name}")


def bad_config(plan: Plan, plan_ref: str) -> Disaster:
    """A wrong setting in the app's ConfigMap (ORDERS_TABLE names a table that does not exist), rolled out: /health
    stays 200, /api/stats and POST /api/orders fail."""
    service, cluster = _app(plan)
    api = kube_client(plan, cluster)
    live = live_revision(api, cluster.namespace, service.name)
    refs = [(var["valueFrom"]["configMapKeyRef"]["name"]) for var in live.template["spec"]["containers"][0].get(
        "env") or [] if var.get("name") == ORDERS_TABLE and "configMapKeyRef" in (var.get("valueFrom") or {})]
    if not refs or refs[0] not in live.configmaps:
        raise DrplanError(f"deployment {service.name} takes no {ORDERS_TABLE} from a ConfigMap; apply the manifests "
                          "of kubernetes/manifests/ (drplan eks-recover)")
    name, was = refs[0], live.configmaps[refs[0]].get(ORDERS_TABLE)
    before = utcnow().replace(microsecond=0)
    time.sleep(1.0)  # the change comes strictly after `before`
    apply_revision(api, cluster.namespace, service.name, live.model_copy(update={"configmaps": {
        **live.configmaps, name: {**live.configmaps[name], ORDERS_TABLE: WRONG_ORDERS_TABLE}}}))
    wait_deployment_available(api, cluster.namespace, service.name, timeout=60)
    return Disaster(
        f"set {ORDERS_TABLE} in ConfigMap {name} of {service.name} to {WRONG_ORDERS_TABLE} (was {was}) after "
        f"{before:%Y-%m-%dT%H:%M:%SZ} and rolled it out: GET /api/stats fails",
        f"drplan config-restore --plan {plan_ref} --service {service.name} --to {before:%Y-%m-%dT%H:%M:%SZ}")


def leaked_credentials(plan: Plan, plan_ref: str) -> Disaster:
    """The database password and the API token leaked (a pasted log, a laptop): their Secrets Manager secrets are
    tagged with the time it leaked. Nothing is refused yet: until the rotation, whoever holds them gets in."""
    db = _database(plan)
    service = next((s for s in plan.services if s.token_secret and not s.token_secret.startswith("prefect:")), None)
    if service is None:
        raise DrplanError(f"plan {plan.name} has no service with a token_secret in Secrets Manager")
    at = utcnow().strftime("%Y-%m-%dT%H:%M:%SZ")
    sm = aws_client(plan, "secretsmanager")
    for ref in (db.credentials_secret, service.token_secret):
        sm.tag_resource(SecretId=ref, Tags=[{"Key": LEAKED_TAG, "Value": at}])
    return Disaster(
        f"the password in {db.credentials_secret} ({db.name}) and the API token in {service.token_secret} "
        f"({service.name}) leaked at {at} (tag {LEAKED_TAG})",
        f"drplan rotate-credentials --plan {plan_ref} --database {db.name} && "
        f"drplan rotate-credentials --plan {plan_ref} --service {service.name}")


SCENARIOS: dict[str, Callable[[Plan, str], Disaster]] = {
    "delete-orders": delete_orders,
    "stop-primary": stop_primary,
    "delete-objects": delete_objects,
    "dr-nodes-zero": dr_nodes_zero,
    "delete-dns": delete_dns,
    "bad-deploy": bad_deploy,
    "bad-config": bad_config,
    "leaked-credentials": leaked_credentials,
}


def break_sandbox(plan: Plan, plan_ref: str, scenario: str) -> Disaster:
    if plan.sandbox is None:
        raise DrplanError(f"plan {plan.name} has no sandbox section: drplan breaks only the local sandbox")
    if scenario not in SCENARIOS:
        raise DrplanError(f"no scenario {scenario!r}; choose one of: {', '.join(SCENARIOS)}")
    if not (plan.state_dir() / "secrets.json").is_file():
        raise DrplanError(f"the sandbox of plan {plan.name} is not up; start it first: drplan sandbox up")
    check_aws_access(plan)  # moto answers
    return SCENARIOS[scenario](plan, plan_ref)
