"""The live inventory a plan's discovery and drift read (drplan/discovery.py): every RDS instance of the plan's two
regions (one paginated DescribeDBInstances each, tags included) and every bucket with its tags (ListBuckets, then
GetBucketTagging for each, a bounded number at a time).

An unreadable region or bucket listing fails the whole inventory: a partial one would report plan entries as gone.
"""

from __future__ import annotations

from botocore.exceptions import ClientError
from prefect import task
from prefect.cache_policies import NO_CACHE

from drplan.clients import aws_client
from drplan.discovery import Drift, Resource, drift, expand
from drplan.errors import DrplanError, first_line
from drplan.logs import run_logger
from drplan.plan import Plan
from drplan.pool import bounded_map
from tasks.rds import describe_all, replica_source
from tasks.s3 import LISTING_WORKERS


def _tags(pairs: list[dict]) -> dict[str, str]:
    return {pair["Key"]: pair["Value"] for pair in pairs}


def bucket_tags(s3, name: str) -> dict[str, str]:
    """A bucket's tags ({} when it has none)."""
    try:
        return _tags(s3.get_bucket_tagging(Bucket=name)["TagSet"])
    except ClientError as exc:
        if exc.response["Error"]["Code"] == "NoSuchTagSet":
            return {}
        raise


def read_inventory(plan: Plan) -> list[Resource]:
    """Every RDS instance of aws.region and aws.dr_region and every bucket, with their tags."""
    found = []
    for region in (plan.aws.region, plan.aws.dr_region):
        try:
            instances = describe_all(aws_client(plan, "rds", region))
        except ClientError as exc:
            raise DrplanError(f"inventory: RDS in {region} unreadable: {first_line(exc)}") from None
        found += [Resource(kind="rds", name=identifier, region=region, tags=_tags(instance.get("TagList", [])),
                           source=replica_source(instance)) for identifier, instance in instances.items()]
    s3 = aws_client(plan, "s3")
    names = [b["Name"] for b in s3.list_buckets().get("Buckets", [])]
    tags = bounded_map(lambda name: bucket_tags(s3, name), names, LISTING_WORKERS)
    for name, bucket in tags.items():
        if isinstance(bucket, Exception):
            raise DrplanError(f"inventory: tags of bucket {name} unreadable: {first_line(bucket)}")
        found.append(Resource(kind="bucket", name=name, tags=bucket))
    run_logger().info("inventory: %d RDS instances, %d buckets", len(found) - len(names), len(names))
    return found


def plan_drift(plan: Plan) -> Drift:
    """The plan against the live inventory (`drplan plan drift`, readiness's "plan drift" finding)."""
    return drift(plan, read_inventory(plan))


def discovered_plan(plan: Plan) -> Plan:
    """The plan with what its `discover:` selectors take in; the plan itself when it has none (nothing read)."""
    return expand(plan, read_inventory(plan)) if plan.discover else plan


plan_drift_task = task(plan_drift, name="plan-drift", cache_policy=NO_CACHE)
