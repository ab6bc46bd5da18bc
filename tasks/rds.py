"""RDS tasks (boto3): describe instances and snapshots, wait, Multi-AZ failover, replica lag and promotion."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime, timedelta

from botocore.exceptions import ClientError
from prefect import task
from prefect.cache_policies import NO_CACHE

from drplan.errors import DrplanError
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
