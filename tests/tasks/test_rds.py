"""RPO verification's batched RDS reads on a moto_server of this module's own: one region's instances, newest
snapshots and replica lags equal what the calls per instance find."""

from __future__ import annotations

from datetime import timedelta

import boto3
import pytest

from drplan.timeutil import utcnow
from sandbox.launchers import moto
from tasks.rds import describe_instance, find_newest_snapshot, read_replica_lag, region_facts


@pytest.fixture(scope="module")
def rds_moto():
    with moto() as url:
        rds, cloudwatch = (boto3.client(service, region_name="us-east-1", endpoint_url=url, aws_access_key_id="t",
                                        aws_secret_access_key="t") for service in ("rds", "cloudwatch"))
        for name in ("db-a", "db-b"):
            rds.create_db_instance(DBInstanceIdentifier=name, Engine="postgres", DBInstanceClass="db.t3.micro",
                                   MasterUsername="admin1", MasterUserPassword="password-1", AllocatedStorage=20)
        for snapshot in ("db-a-1", "db-a-2"):
            rds.create_db_snapshot(DBInstanceIdentifier="db-a", DBSnapshotIdentifier=snapshot)
        for replica in ("db-a-replica", "db-b-replica"):
            rds.create_db_instance_read_replica(DBInstanceIdentifier=replica,
                                                SourceDBInstanceIdentifier=replica.removesuffix("-replica"))
        now = utcnow().replace(second=0, microsecond=0)
        cloudwatch.put_metric_data(Namespace="AWS/RDS", MetricData=[
            {"MetricName": "ReplicaLag", "Dimensions": [{"Name": "DBInstanceIdentifier", "Value": "db-a-replica"}],
             "Timestamp": now - timedelta(minutes=minutes), "Value": value, "Unit": "Seconds"}
            for minutes, value in ((1, 2.5), (4, 9.0))])
        yield rds, cloudwatch


def test_region_facts_equal_the_calls_per_instance(rds_moto):
    rds, cloudwatch = rds_moto
    facts = region_facts.fn(rds, cloudwatch)

    assert set(facts.instances) == {"db-a", "db-b", "db-a-replica", "db-b-replica"}
    for name, instance in facts.instances.items():
        assert instance["DBInstanceArn"] == describe_instance(rds, name)["DBInstanceArn"]
        assert facts.snapshots.get(name) == find_newest_snapshot.fn(rds, name)
    assert facts.snapshots["db-a"] is not None  # the newest of its automated and two manual ones
    assert facts.lags == {"db-a-replica": 2.5, "db-b-replica": None}  # read replicas only, the newest datapoint
    assert facts.lags["db-a-replica"] == read_replica_lag.fn(cloudwatch, "db-a-replica")
