"""Seed the sandbox's AWS (moto_server) with the resources the plan names, idempotently."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

from botocore.exceptions import ClientError

from drplan import clients
from drplan.plan import DatabaseKind, Plan
from drplan.timeutil import utcnow
from tasks.rds import wait_instance_available
from tasks.s3 import back_up_prefix, split_uri

ADMIN_USER = "devonn_admin"
_used: set[Any] = set()  # the clients this module used, see close_connections()


def aws_client(plan: Plan, service: str, region: str | None = None) -> Any:
    client = clients.aws_client(plan, service, region)
    _used.add(client)
    return client


def close_connections() -> None:
    """Close the idle keep-alive connections of the clients used here (they reconnect when used again). Test
    sandboxes take their ports from the kernel's ephemeral range (free ports): a connection kept open from local
    port P to moto would make a later bind of P by PostgreSQL fail with 'Address already in use'. (plans/sandbox.yaml
    uses ports below that range, 32768-60999, for the same reason.)"""
    while _used:
        _used.pop().close()


def _exists(call, *args, missing: tuple[str, ...], **kwargs) -> bool:
    try:
        call(*args, **kwargs)
        return True
    except ClientError as exc:
        if exc.response["Error"]["Code"] in missing:
            return False
        raise


def ensure_buckets(plan: Plan) -> list[str]:
    s3 = aws_client(plan, "s3")
    uris = [b.live for b in plan.buckets] + [b.backup for b in plan.buckets]
    uris += [d.backup.destination for d in plan.databases if d.backup]
    if plan.configuration:
        uris.append(plan.configuration.backup)
    names = sorted({split_uri(u)[0] for u in uris})
    for name in names:
        if not _exists(s3.head_bucket, Bucket=name, missing=("404", "NoSuchBucket")):
            s3.create_bucket(Bucket=name)
            s3.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
    return names


def ensure_secret(plan: Plan, name: str, value: dict[str, Any]) -> None:
    sm = aws_client(plan, "secretsmanager")
    if _exists(sm.describe_secret, SecretId=name, missing=("ResourceNotFoundException",)):
        sm.put_secret_value(SecretId=name, SecretString=json.dumps(value))
    else:
        sm.create_secret(Name=name, SecretString=json.dumps(value))


def seed_live_objects(plan: Plan, count: int = 200) -> None:
    """Demo application files in every live bucket (skipped when the bucket already holds data)."""
    s3 = aws_client(plan, "s3")
    for bucket in plan.buckets:
        name, prefix = split_uri(bucket.live)
        if s3.list_objects_v2(Bucket=name, Prefix=prefix, MaxKeys=1).get("KeyCount"):
            continue
        for i in range(count):
            body = f"devonn upload {i}\n".encode() * (1 + i % 16)
            s3.put_object(Bucket=name, Key=f"{prefix}uploads/{i // 50:03d}/file-{i:05d}.txt", Body=body)


def back_up_buckets(plan: Plan) -> None:
    s3 = aws_client(plan, "s3")
    now = utcnow()
    for bucket in plan.buckets:
        back_up_prefix(s3, bucket.live, bucket.backup, now)


def ensure_rds_network(plan: Plan, region: str) -> dict[str, Any]:
    """A VPC with two subnets, a DB subnet group, a security group and a parameter group in `region` (moto
    records them; no traffic goes anywhere), so that restores can be checked to carry the source's settings."""
    ec2, rds = aws_client(plan, "ec2", region), aws_client(plan, "rds", region)
    names = {"DBSubnetGroupName": "devonn-db-subnets", "DBParameterGroupName": "devonn-postgres16"}
    vpcs = ec2.describe_vpcs(Filters=[{"Name": "tag:Name", "Values": ["drplan-sandbox"]}])["Vpcs"]
    if vpcs:
        vpc_id = vpcs[0]["VpcId"]
        group_id = ec2.describe_security_groups(Filters=[{"Name": "group-name", "Values": ["devonn-db"]}])[
            "SecurityGroups"][0]["GroupId"]
        return {**names, "VpcSecurityGroupIds": [group_id]}
    vpc_id = ec2.create_vpc(CidrBlock="10.42.0.0/16", TagSpecifications=[
        {"ResourceType": "vpc", "Tags": [{"Key": "Name", "Value": "drplan-sandbox"}]}])["Vpc"]["VpcId"]
    subnets = [ec2.create_subnet(VpcId=vpc_id, CidrBlock=f"10.42.{i}.0/24",
                                 AvailabilityZone=f"{region}{zone}")["Subnet"]["SubnetId"]
               for i, zone in enumerate("ab")]
    group_id = ec2.create_security_group(GroupName="devonn-db", Description="devonn databases", VpcId=vpc_id)["GroupId"]
    ec2.authorize_security_group_ingress(GroupId=group_id, IpPermissions=[{  # a group without ingress is a fence
        "IpProtocol": "tcp", "FromPort": 5432, "ToPort": 5432, "IpRanges": [{"CidrIp": "10.42.0.0/16"}]}])
    rds.create_db_subnet_group(DBSubnetGroupName=names["DBSubnetGroupName"], SubnetIds=subnets,
                               DBSubnetGroupDescription="devonn databases")
    rds.create_db_parameter_group(DBParameterGroupName=names["DBParameterGroupName"],
                                  DBParameterGroupFamily="postgres16", Description="devonn postgres 16")
    return {**names, "VpcSecurityGroupIds": [group_id]}


def ensure_rds(plan: Plan, db_password: str) -> None:
    """For every rds-kind database: a Multi-AZ primary, its read replica and cross-region DR replica, each backed
    by real PostgreSQL (the sandbox's RDS data plane), available before this returns."""
    rds_databases = [db for db in plan.databases if db.kind is DatabaseKind.rds]
    network = ensure_rds_network(plan, plan.aws.region) if rds_databases else {}
    for db in rds_databases:
        rds = aws_client(plan, "rds")
        tags = [{"Key": "drplan:plan", "Value": plan.name}, {"Key": "drplan:database", "Value": db.name}]
        if not _exists(rds.describe_db_instances, DBInstanceIdentifier=db.primary, missing=("DBInstanceNotFound",)):
            rds.create_db_instance(
                DBInstanceIdentifier=db.primary, DBInstanceClass="db.r6g.large", Engine="postgres",
                EngineVersion="16.4", AllocatedStorage=100, MasterUsername=ADMIN_USER, MasterUserPassword=db_password,
                DBName=db.dbname, MultiAZ=True, BackupRetentionPeriod=7, Tags=tags, **network,
            )
        primary_arn = wait_available(rds, db.primary)["DBInstanceArn"]
        if db.replica and not _exists(rds.describe_db_instances, DBInstanceIdentifier=db.replica,
                                      missing=("DBInstanceNotFound",)):
            rds.create_db_instance_read_replica(  # its groups named, as reprotect does (AWS's default: the VPC's)
                DBInstanceIdentifier=db.replica, SourceDBInstanceIdentifier=db.primary, Tags=tags,
                VpcSecurityGroupIds=network["VpcSecurityGroupIds"])
        if db.dr_replica:
            dr = aws_client(plan, "rds", db.dr_replica.region)
            if not _exists(dr.describe_db_instances, DBInstanceIdentifier=db.dr_replica.identifier,
                           missing=("DBInstanceNotFound",)):
                dr_network = ensure_rds_network(plan, db.dr_replica.region)
                dr.create_db_instance_read_replica(
                    DBInstanceIdentifier=db.dr_replica.identifier, SourceDBInstanceIdentifier=primary_arn,
                    SourceRegion=plan.aws.region, Tags=tags, DBSubnetGroupName=dr_network["DBSubnetGroupName"],
                    VpcSecurityGroupIds=dr_network["VpcSecurityGroupIds"])
            wait_available(dr, db.dr_replica.identifier)
        if db.replica:
            wait_available(rds, db.replica)


def wait_available(rds: Any, identifier: str) -> dict[str, Any]:
    """The instance once its data plane has finished (creating, backing-up ... available)."""
    return wait_instance_available(rds, identifier, timedelta(minutes=10), poll_seconds=0.5)


def ensure_eks(plan: Plan) -> None:
    """Each cluster, in its own region (cluster.region, default aws.region), with its node groups."""
    for cluster in plan.clusters:
        eks = aws_client(plan, "eks", plan.region_of(cluster))
        if cluster.name not in eks.list_clusters()["clusters"]:
            eks.create_cluster(
                name=cluster.name, roleArn="arn:aws:iam::123456789012:role/drplan-sandbox-eks",
                resourcesVpcConfig={"subnetIds": ["subnet-sandbox-a", "subnet-sandbox-b"]},
            )
        existing = eks.list_nodegroups(clusterName=cluster.name)["nodegroups"]
        for name, group in cluster.nodegroups.items():
            if name not in existing:
                eks.create_nodegroup(
                    clusterName=cluster.name, nodegroupName=name,
                    nodeRole="arn:aws:iam::123456789012:role/drplan-sandbox-nodes",
                    subnets=["subnet-sandbox-a", "subnet-sandbox-b"],
                    scalingConfig={"minSize": group.min, "desiredSize": group.desired, "maxSize": group.max},
                )


def ensure_dns(plan: Plan) -> None:
    """The hosted zone, its records (when missing) as CNAMEs to the primary region's target (dns.targets[aws.region],
    else primary.<region>.<zone>), and an HTTPS health check on /health of every target."""
    if plan.dns is None:
        return
    r53 = aws_client(plan, "route53")
    zone_name = plan.dns.zone.rstrip(".") + "."
    zones = [z for z in r53.list_hosted_zones()["HostedZones"] if z["Name"] == zone_name]
    zone_id = zones[0]["Id"] if zones else r53.create_hosted_zone(
        Name=zone_name, CallerReference=f"drplan-sandbox-{plan.name}")["HostedZone"]["Id"]
    target = plan.dns.targets.get(plan.aws.region) or f"primary.{plan.aws.region}.{plan.dns.zone}"
    present = {(r["Name"], r["Type"]) for page in r53.get_paginator("list_resource_record_sets").paginate(
        HostedZoneId=zone_id) for r in page["ResourceRecordSets"]}
    changes = [{  # only the missing ones: a record a region failover switched stays switched
        "Action": "CREATE",
        "ResourceRecordSet": {"Name": record, "Type": "CNAME", "TTL": plan.dns.ttl,
                              "ResourceRecords": [{"Value": target}]},
    } for record in plan.dns.records if (record.rstrip(".") + ".", "CNAME") not in present]
    if changes:
        r53.change_resource_record_sets(HostedZoneId=zone_id, ChangeBatch={"Changes": changes})
    existing = {c["CallerReference"] for page in r53.get_paginator("list_health_checks").paginate()
                for c in page["HealthChecks"]}
    for region, name in sorted(plan.dns.targets.items()):
        reference = f"drplan-sandbox-{plan.name}-{region}"
        if reference not in existing:
            r53.create_health_check(CallerReference=reference, HealthCheckConfig={
                "Type": "HTTPS", "FullyQualifiedDomainName": name, "Port": 443, "ResourcePath": "/health",
                "RequestInterval": 30, "FailureThreshold": 3})


def seed(plan: Plan, db_password: str, api_token: str) -> None:
    """Everything the plan names, in the sandbox's AWS. Safe to run again."""
    ensure_buckets(plan)
    for secret in {d.credentials_secret for d in plan.databases if not d.credentials_secret.startswith("prefect:")}:
        ensure_secret(plan, secret, {"username": ADMIN_USER, "password": db_password})
    for secret in {s.token_secret for s in plan.services if s.token_secret}:
        ensure_secret(plan, secret, {"token": api_token})
    seed_live_objects(plan)
    ensure_rds(plan, db_password)
    ensure_eks(plan)
    ensure_dns(plan)
    close_connections()
