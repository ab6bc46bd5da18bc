"""The least-privilege IAM policy of a plan: the AWS operations each runbook calls (one table, kept honest by
tests that record the operations of real runs and scan the source for client calls), turned into IAM actions
and scoped to the plan's resources. Pure: a plan in, a policy document out."""

from __future__ import annotations

from typing import Any

from drplan.errors import DrplanError
from drplan.plan import DatabaseKind, Plan

TOPOLOGY = ("rds:DescribeDBInstances", "secretsmanager:GetSecretValue")
"""Live topology discovery: every RDS member in both regions, each database's credentials to probe it."""
S3_READ = ("s3:ListObjectsV2", "s3:GetObject", "s3:HeadObject")
S3_SYNC = S3_READ + ("s3:PutObject", "s3:CopyObject", "s3:CreateMultipartUpload", "s3:UploadPartCopy",
                     "s3:CompleteMultipartUpload", "s3:AbortMultipartUpload", "s3:DeleteObjects")
BARMAN = ("s3:HeadBucket", "s3:ListObjectsV2", "s3:GetObject", "s3:PutObject", "s3:CreateMultipartUpload",
          "s3:UploadPart", "s3:CompleteMultipartUpload", "s3:AbortMultipartUpload")
"""barman-cloud in child processes with drplan's credentials (drplan.clients.child_aws_env): WAL archive and
restore, base backups, the archive check. Not seen by in-process recording."""
RESTORE = ("rds:DescribeDBInstanceAutomatedBackups", "rds:RestoreDBInstanceToPointInTime",
           "rds:AddTagsToResource", "rds:DeleteDBInstance", "rds:DescribeDBInstances") + S3_READ + BARMAN
FENCE = ("rds:DescribeDBInstances", "ec2:DescribeSecurityGroups", "ec2:CreateSecurityGroup",
         "rds:ModifyDBInstance", "rds:AddTagsToResource", "rds:RemoveTagsFromResource")
PROMOTE = ("rds:RebootDBInstance", "rds:PromoteReadReplica", "cloudwatch:GetMetricStatistics")
HEALTH = ("cloudwatch:GetMetricStatistics", "secretsmanager:GetSecretValue", "rds:DescribeDBInstances")
"""Recovery validation (tasks/health.py): RDS metrics, the API token secret, the database's endpoint."""
DNS_READ = ("route53:ListHostedZonesByName", "route53:ListResourceRecordSets")
DNS = DNS_READ + ("route53:ChangeResourceRecordSets", "route53:GetChange")
EKS_READ = ("eks:DescribeCluster", "eks:DescribeNodegroup")
SELF_CHECK = ("sts:GetCallerIdentity", "iam:SimulatePrincipalPolicy")
ROTATE = ("secretsmanager:DescribeSecret", "secretsmanager:PutSecretValue", "secretsmanager:UpdateSecretVersionStage",
          "ec2:DescribeSecurityGroups")
"""A credential rotation (tasks/rotation.py): versions staged and moved; the database's exposure before and after."""
REVOKE = ("iam:GetUser", "iam:GetRole", "iam:ListAccessKeys", "iam:UpdateAccessKey", "iam:ListUserPolicies",
          "iam:ListRolePolicies", "iam:PutUserPolicy", "iam:PutRolePolicy", "iam:DeleteUserPolicy",
          "iam:DeleteRolePolicy", "iam:ListUserTags", "iam:ListRoleTags", "iam:TagUser", "iam:TagRole",
          "iam:UntagUser", "iam:UntagRole")
"""Revoking and restoring a principal's access (tasks/iam.py Principal)."""

INVENTORY = ("rds:DescribeDBInstances", "s3:ListBuckets", "s3:GetBucketTagging")
"""Discovery and drift (tasks/inventory.py): every RDS instance and every bucket with its tags."""

_READINESS = (TOPOLOGY + FENCE + EKS_READ + DNS_READ + S3_READ + INVENTORY
              + ("route53:ListHealthChecks", "cloudwatch:GetMetricStatistics") + SELF_CHECK)
_RPO = TOPOLOGY + S3_READ + INVENTORY + ("rds:DescribeDBSnapshots", "cloudwatch:GetMetricData",
                                         "sts:GetCallerIdentity")
_DRILL = TOPOLOGY + RESTORE + ("sts:GetCallerIdentity",)
_REHEARSAL = TOPOLOGY + HEALTH + ("rds:CreateDBInstanceReadReplica", "rds:PromoteReadReplica", "rds:DeleteDBInstance",
                                  "sts:GetCallerIdentity")
"""The cross-region rehearsal: copies of the DR replicas (tasks/clones.py), validation, removal."""

OPERATIONS: dict[str, tuple[str, ...]] = {
    "rpo-verification": _RPO,
    "restore-drill": _DRILL,
    "fleet-drill": _DRILL,  # no AWS call of its own: the restore-drill runs it starts, on the pool's workers (one role)
    "pitr-recovery": _DRILL + FENCE + HEALTH,
    "db-failover": TOPOLOGY + FENCE + PROMOTE + HEALTH + ("sts:GetCallerIdentity",),
    "region-failover": _READINESS + FENCE + PROMOTE + DNS + HEALTH + EKS_READ + ("eks:UpdateNodegroupConfig",),
    "reprotect": TOPOLOGY + FENCE + BARMAN + ("rds:ModifyDBInstance", "rds:CreateDBInstanceReadReplica",
                                              "sts:GetCallerIdentity"),
    "fence-keeper": FENCE,
    "dns-failover": TOPOLOGY + DNS + HEALTH + ("sts:GetCallerIdentity",),
    "eks-recovery": EKS_READ + ("eks:UpdateNodegroupConfig",),
    "s3-backup": S3_SYNC,
    "s3-recovery": S3_SYNC,
    "configuration-backup": ("s3:PutObject",) + HEALTH,  # known-good revisions of validated services
    "rollback": HEALTH,
    "config-restore": S3_READ + HEALTH,
    "dr-readiness": _READINESS,
    "alarm-watch": ("cloudwatch:DescribeAlarms",),
    "dr-rehearsal": _REHEARSAL,
    "dr-test": _RPO + _READINESS + _DRILL + _REHEARSAL + S3_SYNC + PROMOTE + FENCE
    + ("s3:ListBuckets", "s3:CreateBucket", "s3:DeleteBucket", "rds:ModifyDBInstance",
       "rds:CreateDBInstanceReadReplica"),
    "rotate-credentials": TOPOLOGY + HEALTH + ROTATE + ("sts:GetCallerIdentity",),
    "revoke-access": REVOKE + ("sts:GetCallerIdentity",),
    "commands": TOPOLOGY + S3_READ + INVENTORY + ("rds:DeleteDBInstance", "sts:GetCallerIdentity"),
}
"""Per runbook (flow name; `commands`: the in-process CLI commands topology, copies, s3-verify, evidence, plan
drift), the AWS operations it calls as `service:Operation` (botocore's names)."""

S3_ACTIONS = {
    "s3:ListObjectsV2": ("s3:ListBucket",), "s3:HeadBucket": ("s3:ListBucket",), "s3:HeadObject": ("s3:GetObject",),
    "s3:CopyObject": ("s3:GetObject", "s3:PutObject"), "s3:UploadPartCopy": ("s3:GetObject", "s3:PutObject"),
    "s3:CreateMultipartUpload": ("s3:PutObject",), "s3:UploadPart": ("s3:PutObject",),
    "s3:CompleteMultipartUpload": ("s3:PutObject",), "s3:DeleteObjects": ("s3:DeleteObject",),
    "s3:ListBuckets": ("s3:ListAllMyBuckets",),
}
"""S3 operations whose IAM action has another name; every other operation is its own action."""
UNAUTHORIZED = {"sts:GetCallerIdentity"}
"""Operations IAM never refuses: no action needed."""


def actions_of(operation: str) -> tuple[str, ...]:
    """The IAM actions one `service:Operation` needs."""
    if operation in UNAUTHORIZED:
        return ()
    return S3_ACTIONS.get(operation, (operation,))


def _regions(plan: Plan) -> list[str]:
    return sorted({plan.aws.region, plan.aws.dr_region}
                  | {db.dr_replica.region for db in plan.databases if db.dr_replica}
                  | {plan.region_of(c) for c in plan.clusters})


def _s3_locations(plan: Plan) -> list[tuple[str, str]]:
    """(bucket, prefix) of every S3 location drplan reads or writes."""
    uris = [uri for b in plan.buckets for uri in (b.live, b.backup)]
    uris += [db.backup.destination for db in plan.databases if db.backup]
    uris += [plan.configuration.backup] if plan.configuration else []
    uris += [plan.evidence.location] if plan.evidence and plan.evidence.location.startswith("s3://") else []
    for selector in plan.discover:  # what a selector may take in: its name pattern (any bucket for a tag alone)
        if selector.kind == "bucket":
            uris += [f"s3://{selector.name or '*'}/", selector.backup.replace("{name}", selector.name or "*")]
    return sorted({_bucket_prefix(uri) for uri in uris})


def _bucket_prefix(uri: str) -> tuple[str, str]:
    """A plan's S3 URI (validated, ends with "/") as (bucket, prefix)."""
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    return bucket, prefix


def _scratch_buckets(plan: Plan) -> list[str]:
    """`tasks.s3.scratch_bucket_name` patterns: the DR test's restore copies of each live bucket."""
    suffix = len("-drtest-20260101t000000z")
    names = {_bucket_prefix(b.live)[0][:63 - suffix].rstrip(".-") for b in plan.buckets}
    return sorted(f"arn:aws:s3:::{name}-drtest-*" for name in names)


def _rds(plan: Plan, account: str, *kinds: str) -> list[str]:
    return [f"arn:aws:rds:{region}:{account}:{kind}" for region in _regions(plan) for kind in kinds]


def _instances(plan: Plan, account: str) -> list[str]:
    """The plan's RDS members where they run, and the copies drplan creates (`<database>-drill-…`, `-recovery-…`,
    `-replica-…`, `-dr-…`) in every region of the plan."""
    rds = [db for db in plan.databases if db.kind is DatabaseKind.rds]
    arns = {f"arn:aws:rds:{plan.member_region(db, role)}:{account}:db:{identifier}"
            for db in rds for role, identifier in db.members.items()}
    arns |= {arn for db in rds for arn in _rds(plan, account, f"db:{db.name}-*")}
    for selector in plan.discover:  # the instances a selector may take in, and the copies of each
        if selector.kind == "rds":
            arns |= set(_rds(plan, account, f"db:{selector.name or '*'}", f"db:{selector.name or '*'}-*"))
    return sorted(arns)


def _resources(plan: Plan, action: str, account: str) -> tuple[str, list[str]]:
    """(statement id, resources) of one IAM action. Actions AWS cannot scope get "*" and say so in their id."""
    service, name = action.split(":")
    locations = _s3_locations(plan)
    match action:
        case "s3:ListAllMyBuckets":
            return "S3ListAllMyBucketsHasNoResourceScope", ["*"]
        case "s3:GetBucketTagging":
            return "S3TagsOfEveryBucketForDiscovery", ["arn:aws:s3:::*"]
        case "s3:CreateBucket" | "s3:DeleteBucket":
            return "S3ScratchBucketsOfTheDrTest", _scratch_buckets(plan)
        case "s3:ListBucket":
            return "S3ListThePlansBuckets", sorted({f"arn:aws:s3:::{b}" for b, _ in locations}
                                                   | set(_scratch_buckets(plan)))
        case _ if service == "s3":
            return "S3ObjectsUnderThePlansPrefixes", sorted(
                {f"arn:aws:s3:::{b}/{p}*" for b, p in locations} | {f"{s}/*" for s in _scratch_buckets(plan)})
        case "rds:RestoreDBInstanceToPointInTime" | "rds:CreateDBInstanceReadReplica":
            return "RdsCopiesWithTheSourcesNetworkAndParameters", _instances(plan, account) + _rds(
                plan, account, "subgrp:*", "pg:*", "og:*")
        case "rds:DescribeDBInstances" | "rds:DescribeDBSnapshots" | "rds:DescribeDBInstanceAutomatedBackups":
            return "RdsDescribeListsEveryInstance", _rds(plan, account, "db:*", "snapshot:*", "auto-backup:*")
        case _ if service == "rds":
            return "RdsThePlansMembersAndCopies", _instances(plan, account)
        case "ec2:DescribeSecurityGroups":
            return "Ec2DescribeHasNoResourceScope", ["*"]
        case "ec2:CreateSecurityGroup":
            return "Ec2FenceSecurityGroup", [
                f"arn:aws:ec2:{region}:{account}:{kind}" for region in _regions(plan)
                for kind in ("security-group/*", "vpc/*")]
        case _ if service == "secretsmanager":
            refs = {db.credentials_secret for db in plan.databases} | {
                s.token_secret for s in plan.services if s.token_secret}
            return "SecretsManagerThePlansCredentials", sorted(
                f"arn:aws:secretsmanager:{plan.aws.region}:{account}:secret:{ref}-??????"
                for ref in refs if not ref.startswith("prefect:"))
        case "route53:ListHostedZonesByName" | "route53:ListHealthChecks":
            return "Route53ListingsHaveNoResourceScope", ["*"]
        case "route53:GetChange":
            return "Route53Changes", ["arn:aws:route53:::change/*"]
        case _ if service == "route53":
            return "Route53TheZoneFoundByNameAtRunTime", ["arn:aws:route53:::hostedzone/*"] if plan.dns else []
        case "eks:DescribeCluster":
            return "EksThePlansClusters", sorted(
                f"arn:aws:eks:{plan.region_of(c)}:{account}:cluster/{c.name}" for c in plan.clusters)
        case _ if service == "eks":
            return "EksThePlansNodeGroups", sorted(
                f"arn:aws:eks:{plan.region_of(c)}:{account}:nodegroup/{c.name}/*/*" for c in plan.clusters)
        case "cloudwatch:DescribeAlarms":
            return "CloudWatchThePlansMappedAlarms", sorted(
                f"arn:aws:cloudwatch:{m.region or plan.aws.region}:{account}:alarm:{m.alarm}" for m in plan.alarms)
        case _ if service == "cloudwatch":
            return "CloudWatchMetricReadsHaveNoResourceScope", ["*"]
        case "iam:SimulatePrincipalPolicy":
            return "IamReadinessSimulatesItsOwnPermissions", [f"arn:aws:iam::{account}:user/*",
                                                               f"arn:aws:iam::{account}:role/*"]
        case _ if service == "iam":
            return "IamRevokeAccessOfAnyPrincipalNamedAtRunTime", [f"arn:aws:iam::{account}:user/*",
                                                                    f"arn:aws:iam::{account}:role/*"]
    raise ValueError(f"{action}: no resource scope known; add it to drplan/iam_policy.py")


def operations(flows: list[str] | None = None) -> set[str]:
    """The operations of `flows` (default: every runbook). An unknown name is refused, naming the known ones."""
    unknown = sorted(set(flows or ()) - set(OPERATIONS))
    if unknown:
        raise DrplanError(f"unknown runbook {', '.join(unknown)}; use one of {', '.join(OPERATIONS)}")
    return {op for flow in flows or OPERATIONS for op in OPERATIONS[flow]}


def iam_policy(plan: Plan, flows: list[str] | None = None, account: str = "*") -> dict[str, Any]:
    """The IAM policy document `flows` (default: all) need for `plan`: one statement per kind of resource."""
    statements: dict[str, tuple[set[str], list[str]]] = {}
    for action in {a for op in operations(flows) for a in actions_of(op)}:
        sid, resources = _resources(plan, action, account)
        if resources:
            statements.setdefault(sid, (set(), resources))[0].add(action)
    return {"Version": "2012-10-17", "Statement": [
        {"Sid": sid, "Effect": "Allow", "Action": sorted(actions), "Resource": resources}
        for sid, (actions, resources) in sorted(statements.items())]}
