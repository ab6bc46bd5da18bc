"""RDS tasks (boto3): describe instances and snapshots."""

from __future__ import annotations

from datetime import datetime

from botocore.exceptions import ClientError
from prefect import task
from prefect.cache_policies import NO_CACHE

from drplan.errors import DrplanError
from drplan.logs import run_logger


@task(retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
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
