"""RDS tasks (boto3): describe instances and snapshots, wait, Multi-AZ failover, replica lag and promotion."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta

from botocore.exceptions import BotoCoreError, ClientError
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from drplan.errors import DrplanError, first_line
from drplan.logs import run_logger
from drplan.timeutil import utcnow
from tasks.health import PERIOD


def describe_instance(rds, identifier: str) -> dict:
    try:
        return rds.describe_db_instances(DBInstanceIdentifier=identifier)["DBInstances"][0]
    except ClientError as exc:
        if exc.response["Error"]["Code"] == "DBInstanceNotFound":
            raise DrplanError(f"RDS instance {identifier} not found in {rds.meta.region_name}; "
                              "check the plan's primary/replica/dr_replica") from None
        raise


@task(retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def find_newest_snapshot(rds, identifier: str) -> datetime | None:
    """Creation time of the newest available snapshot (automated or manual) of an instance."""
    newest = None
    for page in rds.get_paginator("describe_db_snapshots").paginate(DBInstanceIdentifier=identifier):
        for snap in page["DBSnapshots"]:
            if snap.get("Status") == "available" and snap.get("SnapshotCreateTime"):
                if newest is None or snap["SnapshotCreateTime"] > newest:
                    newest = snap["SnapshotCreateTime"]
    run_logger().info("%s newest snapshot %s", identifier, newest)
    return newest


def find_instance(rds, identifier: str) -> dict | None:
    """The instance, or None if it does not exist."""
    try:
        return rds.describe_db_instances(DBInstanceIdentifier=identifier)["DBInstances"][0]
    except ClientError as exc:
        if exc.response["Error"]["Code"] == "DBInstanceNotFound":
            return None
        raise


def wait_instance_available(rds, identifier: str, timeout: timedelta, poll_seconds: float,
                            done: Callable[[dict], bool] = lambda instance: True) -> dict:
    """Our own wait until the instance is `available` (and `done`): botocore's waiters give up after 30 minutes,
    large restores and promotions take longer. Fails at once on a terminal status."""
    deadline = time.monotonic() + timeout.total_seconds()
    while True:
        instance = find_instance(rds, identifier)
        status = instance["DBInstanceStatus"] if instance else "missing"
        if status == "available" and done(instance):
            return instance
        if status in ("failed", "incompatible-restore", "incompatible-parameters", "missing"):
            raise DrplanError(f"RDS instance {identifier} is {status}")
        if time.monotonic() > deadline:
            raise DrplanError(f"RDS instance {identifier} not ready after {timeout}; still {status}")
        time.sleep(poll_seconds)


@task(cache_policy=NO_CACHE)
def reboot_with_failover(rds, identifier: str) -> bool:
    """Multi-AZ failover test: reboot forcing a failover to the standby. A rerun finds the reboot in progress
    and does not start another (returns False)."""
    instance = describe_instance(rds, identifier)
    if instance["DBInstanceStatus"] == "rebooting":
        run_logger().info("%s is already rebooting; not rebooting again", identifier)
        return False
    rds.reboot_db_instance(DBInstanceIdentifier=identifier, ForceFailover=True)
    run_logger().warning("%s rebooting with forced failover", identifier)
    return True


@task(cache_policy=NO_CACHE)
def promote_read_replica(rds, identifier: str) -> bool:
    """Promote a read replica to a standalone instance; False if it already is one (a rerun)."""
    instance = describe_instance(rds, identifier)
    if not instance.get("ReadReplicaSourceDBInstanceIdentifier"):
        run_logger().info("%s is not a read replica (already promoted)", identifier)
        return False
    rds.promote_read_replica(DBInstanceIdentifier=identifier)
    run_logger().warning("%s promoted from read replica of %s", identifier,
                         instance["ReadReplicaSourceDBInstanceIdentifier"])
    return True


@task(retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def read_replica_lag(cloudwatch, identifier: str, window: timedelta = timedelta(minutes=10)) -> float | None:
    """The newest ReplicaLag datapoint (seconds, maximum per minute) of the last `window`; None without data."""
    now = utcnow()
    points = cloudwatch.get_metric_statistics(
        Namespace="AWS/RDS", MetricName="ReplicaLag", StartTime=now - window, EndTime=now + PERIOD, Period=60,
        Dimensions=[{"Name": "DBInstanceIdentifier", "Value": identifier}], Statistics=["Maximum"],
    )["Datapoints"]
    lag = max(points, key=lambda p: p["Timestamp"])["Maximum"] if points else None
    run_logger().info("%s ReplicaLag %s", identifier, "no data" if lag is None else f"{lag:g}s")
    return lag


describe_instance_task = task(describe_instance, retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)


def replica_source(instance: dict) -> str | None:
    """The instance it replicates from (a cross-region source is an ARN: its last part is the identifier)."""
    source = instance.get("ReadReplicaSourceDBInstanceIdentifier")
    return source.rsplit(":", 1)[-1] if source else None


def describe_all(rds) -> dict[str, dict]:
    """Every instance of the client's region by identifier: one paginated DescribeDBInstances (100 a page), instead
    of a call per instance."""
    return {i["DBInstanceIdentifier"]: i for page in rds.get_paginator("describe_db_instances").paginate(
        PaginationConfig={"PageSize": 100}) for i in page["DBInstances"]}


def newest_snapshots(rds) -> dict[str, datetime]:
    """Instance -> creation time of its newest available snapshot (automated or manual), for every instance of the
    client's region: one paginated DescribeDBSnapshots (100 a page), instead of a call per instance."""
    newest: dict[str, datetime] = {}
    for page in rds.get_paginator("describe_db_snapshots").paginate(PaginationConfig={"PageSize": 100}):
        for snap in page["DBSnapshots"]:
            created, identifier = snap.get("SnapshotCreateTime"), snap.get("DBInstanceIdentifier")
            if snap.get("Status") == "available" and created and identifier and \
                    (identifier not in newest or created > newest[identifier]):
                newest[identifier] = created
    return newest


class RegionFacts(BaseModel):
    """What RPO verification reads of RDS in one region: a paginated call each for instances and snapshots, and one
    GetMetricData call per 500 read replicas."""

    instances: dict[str, dict]
    snapshots: dict[str, datetime]
    lags: dict[str, float | None]
    """Read replica -> its newest ReplicaLag (seconds), None without data (or when CloudWatch did not answer: an
    addition to the heartbeat, not a measurement of its own)."""


@task(retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def region_facts(rds, cloudwatch) -> RegionFacts:
    instances = describe_all(rds)
    replicas = [i for i, instance in instances.items() if instance.get("ReadReplicaSourceDBInstanceIdentifier")]
    try:
        lags = replica_lags(cloudwatch, replicas)
    except (BotoCoreError, ClientError) as exc:
        run_logger().warning("ReplicaLag of %d replicas in %s not read: %s", len(replicas), rds.meta.region_name,
                             first_line(exc))
        lags = {}
    facts = RegionFacts(instances=instances, snapshots=newest_snapshots(rds), lags=lags)
    run_logger().info("RDS %s: %d instances (%d read replicas), %d with snapshots", rds.meta.region_name,
                      len(instances), len(replicas), len(facts.snapshots))
    return facts


METRIC_QUERIES = 500
"""GetMetricData takes at most 500 metric queries a call."""


def replica_lags(cloudwatch, identifiers: Iterable[str], window: timedelta = timedelta(minutes=10)
                 ) -> dict[str, float | None]:
    """Identifier -> its newest ReplicaLag datapoint (seconds, maximum per minute) of the last `window`, None
    without data: GetMetricData with up to 500 instances a call, instead of GetMetricStatistics per instance."""
    identifiers = list(dict.fromkeys(identifiers))
    now = utcnow()
    lags: dict[str, float | None] = dict.fromkeys(identifiers)
    for start in range(0, len(identifiers), METRIC_QUERIES):
        batch = identifiers[start:start + METRIC_QUERIES]
        queries = [{"Id": f"m{n}", "ReturnData": True, "MetricStat": {
            "Metric": {"Namespace": "AWS/RDS", "MetricName": "ReplicaLag",
                       "Dimensions": [{"Name": "DBInstanceIdentifier", "Value": identifier}]},
            "Period": 60, "Stat": "Maximum"}} for n, identifier in enumerate(batch)]
        for page in cloudwatch.get_paginator("get_metric_data").paginate(
                MetricDataQueries=queries, StartTime=now - window, EndTime=now + PERIOD, ScanBy="TimestampDescending"):
            for result in page["MetricDataResults"]:
                identifier = batch[int(result["Id"][1:])]
                if result["Values"] and lags[identifier] is None:  # newest first
                    lags[identifier] = result["Values"][0]
    return lags
