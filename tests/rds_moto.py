"""RDS test support on a real moto_server (the `moto_rds` fixture, `sandbox.launchers.moto`, without the RDS data
plane: instances, tags and endpoints, no PostgreSQL behind them): a plan pointing at it, emptied first, and instances
created there as a database's primary or as drplan's copies, tagged as `tasks.targets.RdsInstance` tags them."""

from __future__ import annotations

from datetime import UTC, datetime

import httpx

from drplan.plan import Plan
from tasks.targets import DATABASE_TAG, DRILL_TAG, TARGET_TIME_TAG


def on_moto(plan: Plan, endpoint: str) -> Plan:
    """`plan` with aws.endpoint_url at the moto_server `endpoint`, which holds nothing afterwards (moto's reset):
    every test sets up its own instances."""
    httpx.post(f"{endpoint}/moto-api/reset", timeout=10).raise_for_status()
    return plan.model_copy(update={"aws": plan.aws.model_copy(update={"endpoint_url": endpoint})})


def create_instance(rds, identifier: str, tags: dict[str, str] | None = None,
                    instance_class: str = "db.t3.micro") -> dict:
    """A PostgreSQL instance `identifier` with `tags`, as describe_db_instances reports it (moto: available at once)."""
    rds.create_db_instance(DBInstanceIdentifier=identifier, Engine="postgres", DBInstanceClass=instance_class,
                           AllocatedStorage=20, MasterUsername="postgres", MasterUserPassword="unused-in-moto",
                           BackupRetentionPeriod=7, Tags=[{"Key": k, "Value": v} for k, v in (tags or {}).items()])
    return rds.describe_db_instances(DBInstanceIdentifier=identifier)["DBInstances"][0]


def create_copy(rds, name: str, target_time: datetime, database: str = "devonn-rds",
                tags: dict[str, str] | None = None) -> dict:
    """An instance tagged as drplan's copy `name` of `database` restored to `target_time` (plus `tags`)."""
    return create_instance(rds, name, {DRILL_TAG: "true", DATABASE_TAG: database,
                                       TARGET_TIME_TAG: target_time.astimezone(UTC).isoformat(), **(tags or {})})


def identifiers(rds) -> list[str]:
    """Every instance in the client's region, by identifier."""
    return sorted(i["DBInstanceIdentifier"] for page in rds.get_paginator("describe_db_instances").paginate()
                  for i in page["DBInstances"])
