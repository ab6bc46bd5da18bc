"""The DR plan: one YAML file, validated here, that says what is protected and what the objectives are.

A broken plan fails at load with one line per problem, naming the field path and what to write instead.
"""

from __future__ import annotations

import os
import re
from datetime import timedelta
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ByteSize,
    ConfigDict,
    Field,
    PrivateAttr,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from drplan.errors import DrplanError
from drplan.timeutil import parse_duration

PLANS_DIR = Path(__file__).resolve().parent.parent / "plans"
DEFAULT_PLAN = "plans/devonn.yaml"
"""The plan a flow run uses when none is given (deployments pass theirs)."""

Duration = Annotated[timedelta, BeforeValidator(parse_duration)]


class PlanError(DrplanError):
    """A plan that cannot be used; `problems` holds one line per problem."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))


def _s3_uri(value: str) -> str:
    if not re.fullmatch(r"s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/[^\s]*)?", value):
        raise ValueError(f"{value!r} is not an S3 URI; write s3://bucket-name/optional/prefix/")
    return value if value.endswith("/") else value + "/"


def _evidence_location(value: str) -> str:
    if value.startswith("s3://"):
        return _s3_uri(value)
    if not value.strip() or re.match(r"^[A-Za-z][A-Za-z0-9+.\-]*://", value):
        raise ValueError(f"{value!r} is neither an S3 prefix nor a directory; write s3://bucket-name/prefix/ "
                         "or a directory path (relative to the plan file)")
    return value


def _endpoint(value: str) -> str:
    match = re.fullmatch(r"([A-Za-z0-9.\-\[\]:]+):(\d{1,5})", value)
    if not match or not 0 < int(match.group(2)) < 65536:
        raise ValueError(f"{value!r} is not host:port; write e.g. 127.0.0.1:5432")
    return value


def _secret_ref(value: str) -> str:
    if not re.fullmatch(r"(prefect:)?[A-Za-z0-9/_+=.@\-]+", value):
        raise ValueError(
            f"{value!r} is not a secret reference; write a Secrets Manager name (devonn/db/admin) "
            "or prefect:BLOCK-NAME for a Prefect Secret block"
        )
    return value


def host_port(endpoint: str) -> tuple[str, int]:
    """A validated `host:port` endpoint as (host, port)."""
    host, _, port = endpoint.rpartition(":")
    return host, int(port)


S3Uri = Annotated[str, AfterValidator(_s3_uri)]
Endpoint = Annotated[str, AfterValidator(_endpoint)]
SecretRef = Annotated[str, AfterValidator(_secret_ref)]
Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$", max_length=63)]


class Tier(StrEnum):
    critical = "critical"
    secondary = "secondary"
    tertiary = "tertiary"


class DatabaseKind(StrEnum):
    rds = "rds"
    postgres = "postgres"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RtoObjectives(_Model):
    critical: Duration = timedelta(hours=1)
    secondary: Duration = timedelta(hours=4)
    tertiary: Duration = timedelta(hours=24)


class RpoObjectives(_Model):
    database: Duration = timedelta(minutes=5)
    file_storage: Duration = timedelta(minutes=15)
    configuration: Duration = timedelta(hours=1)


class Objectives(_Model):
    rto: RtoObjectives = RtoObjectives()
    rpo: RpoObjectives = RpoObjectives()

    def rto_for(self, tier: Tier) -> timedelta:
        return getattr(self.rto, tier.value)


class AwsSettings(_Model):
    region: str = Field(pattern=r"^[a-z]{2}(-[a-z]+)+-\d$")
    dr_region: str = Field(pattern=r"^[a-z]{2}(-[a-z]+)+-\d$")
    endpoint_url: str | None = Field(default=None, pattern=r"^https?://[^\s/@]+(:\d+)?/?$")
    credentials_block: str | None = None
    """Name of a prefect-aws AwsCredentials block; when unset, boto3's default credential chain is used."""

    @property
    def is_loopback(self) -> bool:
        """True when the endpoint is a local stand-in (the sandbox), never AWS."""
        host = (self.endpoint_url or "").split("://", 1)[-1].rsplit(":", 1)[0].strip("[]/")
        return host in ("localhost", "::1") or host.startswith("127.")

    @model_validator(mode="after")
    def _regions_differ(self) -> AwsSettings:
        if self.region == self.dr_region:
            raise ValueError("dr_region must differ from region; the DR region is where a region failover goes")
        return self


class DrReplica(_Model):
    identifier: Name
    region: str = Field(pattern=r"^[a-z]{2}(-[a-z]+)+-\d$")


class Integrity(_Model):
    """What a restored copy is checked for (checks/): these tables, against the source."""

    tables: list[Name] = []
    heartbeat_table: Name = "drplan_heartbeat"
    row_count_tolerance: float = Field(default=0.05, ge=0, le=1)
    """Allowed relative difference of row counts between the restored copy and the source."""
    timestamp_column: Name = "updated_at"
    """Per-row change time; a restored row newer than the target time means the restore overshot."""
    fingerprint: bool = True
    """Drills also compare the rows unchanged since T (timestamp column <= T) between source and copy."""


class BarmanBackup(_Model):
    """Where barman-cloud keeps WAL and base backups of a self-managed PostgreSQL."""

    destination: S3Uri
    server_name: Name


class Database(_Model):
    name: Name
    tier: Tier
    kind: DatabaseKind
    primary: Name
    replica: Name | None = None
    dr_replica: DrReplica | None = None
    dbname: Name = "postgres"
    credentials_secret: SecretRef
    """Secrets Manager secret (JSON with username and password) or prefect:BLOCK for a Prefect Secret block."""
    integrity: Integrity = Integrity()
    endpoints: dict[Name, Endpoint] = {}
    """Data-plane address per member (host:port). Required for `postgres`; for `rds` it overrides the
    address RDS reports (a tunnel or proxy; the sandbox points it at real PostgreSQL)."""
    backup: BarmanBackup | None = None
    base_backup_max_age: Duration = timedelta(hours=25)

    @property
    def members(self) -> dict[str, str]:
        """Role -> identifier for every member the plan names."""
        roles = {"primary": self.primary}
        if self.replica:
            roles["replica"] = self.replica
        if self.dr_replica:
            roles["dr_replica"] = self.dr_replica.identifier
        return roles

    @model_validator(mode="after")
    def _kind_rules(self) -> Database:
        members = list(self.members.values())
        if len(set(members)) != len(members):
            raise ValueError("primary, replica and dr_replica must be different instances")
        unknown = sorted(set(self.endpoints) - set(members))
        if unknown:
            raise ValueError(
                f"endpoints names {', '.join(unknown)}, which is not a member; "
                f"use one of: {', '.join(members)}"
            )
        if self.kind is DatabaseKind.postgres:
            missing = [m for m in members if m not in self.endpoints]
            if missing:
                raise ValueError(
                    f"kind postgres needs an endpoint for every member; add endpoints: "
                    f"{{{missing[0]}: host:port}} for {', '.join(missing)}"
                )
            if self.backup is None:
                raise ValueError(
                    "kind postgres needs backup: {destination: s3://bucket/prefix/, server_name: NAME} "
                    "(barman-cloud WAL archive and base backups)"
                )
        return self


class Bucket(_Model):
    name: Name
    live: S3Uri
    backup: S3Uri

    @model_validator(mode="after")
    def _distinct(self) -> Bucket:
        if self.backup.startswith(self.live) or self.live.startswith(self.backup):
            raise ValueError("backup and live must not contain each other; use separate buckets or prefixes")
        return self


PROTECT_TAG = "drplan:protect"
"""The tag that asks for protection (its value a tier: critical, secondary, tertiary): `drplan plan drift` lists the
resources carrying it that the plan does not cover."""


class Selector(_Model):
    """Resources the plan takes in without listing each: those carrying a tag (`key=value`, or `key` for any value),
    whose name matches a pattern (`*` and `?`), or both. What an entry needs besides its name comes from here."""

    kind: Literal["bucket", "rds"]
    tag: str | None = Field(default=None, pattern=r"^[^=\s]+(=\S*)?$")
    name: str | None = Field(default=None, min_length=1)
    """A glob on the bucket name or the RDS instance identifier."""
    backup: str | None = None
    """bucket: where each bucket's backups go, with `{name}` for its name (s3://devonn-backup/{name}/)."""
    tier: Tier | None = None
    """rds: the tier (default: the tag's value, when it is a tier)."""
    credentials_secret: SecretRef | None = None
    """rds: the secret of every database selected here."""
    dbname: Name = "postgres"

    @model_validator(mode="after")
    def _complete(self) -> Selector:
        if not self.tag and not self.name:
            raise ValueError("a selector needs tag: KEY=VALUE, name: PATTERN, or both")
        if self.kind == "bucket" and (not self.backup or "{name}" not in self.backup):
            raise ValueError("a bucket selector needs backup: s3://backup-bucket/prefix/{name}/ ({name} is "
                             "replaced by each bucket's name)")
        if self.kind == "bucket" and self.backup:
            _s3_uri(self.backup.replace("{name}", "name"))
        if self.kind == "rds" and not self.credentials_secret:
            raise ValueError("an rds selector needs credentials_secret: the secret of the databases it selects")
        if self.kind == "rds" and self.tier is None and self.tag_value not in {t.value for t in Tier}:
            raise ValueError("an rds selector needs tier: critical|secondary|tertiary, unless its tag's value is one")
        return self

    @property
    def tag_key(self) -> str | None:
        return self.tag.split("=", 1)[0] if self.tag else None

    @property
    def tag_value(self) -> str | None:
        """The value the tag must have; None: any value (or no tag)."""
        return self.tag.split("=", 1)[1] if self.tag and "=" in self.tag else None


class Nodegroup(_Model):
    min: int = Field(ge=0)
    desired: int = Field(ge=0)
    max: int = Field(ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> Nodegroup:
        if not self.min <= self.desired <= self.max:
            raise ValueError(f"need min <= desired <= max, got {self.min}/{self.desired}/{self.max}")
        return self


class ManifestOverrides(_Model):
    """Per-environment changes applied to the manifests when they are deployed into this cluster."""

    replicas: dict[Name, int] = {}
    """deployment -> replicas (e.g. fewer in a pilot-light DR region)."""
    image_registry: dict[str, str] = {}
    """registry prefix -> replacement (e.g. the DR region's ECR)."""


class Cluster(_Model):
    name: Name
    region: str | None = None
    """Default: aws.region."""
    context: str
    kubeconfig: str | None = None
    namespace: Name = "default"
    nodegroups: dict[Name, Nodegroup] = {}
    manifests: str | None = None
    """Folder of YAML manifests the EKS recovery and region failover apply (relative to the plan)."""
    overrides: ManifestOverrides = ManifestOverrides()
    deployments: list[Name] = []


class Dns(_Model):
    zone: str = Field(pattern=r"^([a-z0-9\-]+\.)+[a-z]{2,}\.?$")
    records: list[str] = []
    ttl: int = Field(default=60, ge=1, le=300)
    targets: dict[str, str] = {}
    """region -> the name the records point at (CNAME) while that region serves, e.g. its load balancer."""


class ServiceEndpoint(_Model):
    path: str = Field(pattern=r"^/")
    expect_status: int = 200
    expect_contains: str | None = None
    auth: bool = False


class ServiceDr(_Model):
    """Where the service runs in the DR region (its health URL there, before DNS moves to it)."""

    cluster: Name
    health: str = Field(pattern=r"^https?://[^\s@]+$")


class Service(_Model):
    name: Name
    tier: Tier
    health: str = Field(pattern=r"^https?://[^\s@]+$")
    database: Name | None = None
    cluster: Name | None = None
    token_secret: SecretRef | None = None
    endpoints: list[ServiceEndpoint] = []
    dr: ServiceDr | None = None
    settle: Duration = timedelta(seconds=60)
    """After a cutover, validation is repeated for up to this long before it counts as failed (pods restarting,
    load balancer targets registering)."""


class RegionFailover(_Model):
    """What the region taking over needs (runbook "Full Region Recovery")."""

    nodes: dict[Name, int] = {}
    """node group -> nodes to run while the region serves."""
    scale: dict[Name, int] = {}
    """deployment -> replicas while the region serves (e.g. devonn-api 3, devonn-worker 5)."""
    min_ready_nodes: int = Field(default=1, ge=0)
    """Readiness: the standby cluster needs at least this many Ready nodes before a failover."""


class ConfigurationBackup(_Model):
    """Where configuration backups (cluster manifests, parameter exports) land; their age is the config RPO."""

    backup: S3Uri


class EscalationLevel(_Model):
    name: str = Field(min_length=1)
    """Who this level is (e.g. Engineering Manager)."""
    block: str = Field(min_length=1)
    """The Prefect notification block that reaches them."""


class Notifications(_Model):
    slack_webhook_block: str | None = None
    """The DR room: every recovery run posts its start, changes, approvals and end here."""
    secondary_block: str | None = None
    """SMS or email (a Prefect notification block): told when a recovery fails."""
    escalation: list[EscalationLevel] = []
    """Notified in turn, one more level each `escalation_interval` an approval stays unanswered."""
    escalation_interval: Duration = timedelta(minutes=15)

    def blocks(self) -> dict[str, str]:
        """Plan field -> the notification block it names."""
        named = {"notifications.slack_webhook_block": self.slack_webhook_block,
                 "notifications.secondary_block": self.secondary_block,
                 **{f"notifications.escalation[{i}].block": level.block for i, level in enumerate(self.escalation)}}
        return {field: block for field, block in named.items() if block}

    @model_validator(mode="after")
    def _interval(self) -> Notifications:
        if self.escalation_interval.total_seconds() < 1:
            raise ValueError("notifications.escalation_interval must be at least 1s (e.g. 15m)")
        return self


class ApprovalSettings(_Model):
    timeout: Duration = timedelta(hours=1)
    """An approval not given within this ends the run as refused, with nothing changed."""

    @model_validator(mode="after")
    def _positive(self) -> ApprovalSettings:
        if self.timeout.total_seconds() < 1:
            raise ValueError("approval.timeout must be at least 1s (e.g. 1h)")
        return self


WAL_SEGMENT = 16 * 1024 * 1024
"""PostgreSQL's default WAL segment size: the least a prefetch spool must hold."""


def _spool_size(value: Any) -> int:
    try:
        size = TypeAdapter(ByteSize).validate_python(value)
    except ValidationError:
        raise ValueError(f"{value!r} is not a size; write e.g. 1GiB or 512MiB") from None
    if size < WAL_SEGMENT:
        raise ValueError(f"{value!r} is smaller than one WAL segment (16 MiB); write 16MiB or more (default 1GiB)")
    return int(size)


class WalPrefetch(_Model):
    """Self-managed PostgreSQL restores: the WAL segments after the one recovery asks for are fetched in parallel into
    a bounded local spool (drplan/wal_prefetch.py)."""

    parallel: int = Field(default=8, ge=1, le=64)
    """Segments fetched at once."""
    spool: Annotated[int, BeforeValidator(_spool_size)] = 1024**3
    """Disk the spool may use (e.g. 1GiB, 512MiB): segments fetched ahead, at most this much at a time."""
    spool_dir: str | None = None
    """Where spools live (one directory per restore below it, relative to the plan file); default: next to the
    restored copies, under drill.work_dir. The OS user must be able to write there."""


class BaseDownload(_Model):
    """Self-managed PostgreSQL restores: the base backup's tar files are fetched in byte ranges over several
    connections at once and extracted as they arrive (drplan/base_restore.py)."""

    parallel: int = Field(default=8, ge=1, le=64)
    """Ranges fetched at once (each a connection)."""


class DrillSettings(_Model):
    """Restore drills: where scratch copies go, how long they may take, which target time by default."""

    work_dir: str = "/var/tmp/drplan-drills"
    """postgres kind: scratch restores live here (the OS user must be able to reach it)."""
    os_user: Name = "drplan-pg"
    restore_timeout: Duration = timedelta(hours=1)
    target_margin: Duration = timedelta(minutes=1)
    """Default target time: the latest restorable time minus this margin."""
    sweep_after: Duration = timedelta(hours=2)
    """Leftovers of earlier drills (crashed runs) older than this are removed before each drill."""
    report_dir: str = "../reports"
    """Where drill reports (JSON) are written, relative to the plan file."""
    wal_prefetch: WalPrefetch = WalPrefetch()
    """postgres kind: how restores (drills and recoveries) fetch archived WAL."""
    base_download: BaseDownload = BaseDownload()
    """postgres kind: how restores download the base backup."""
    fleet_concurrency: int = Field(default=2, ge=1, le=64)
    """Fleet drill (`drplan fleet-drill`): at most this many databases drilled at once, across all workers (the
    Prefect global concurrency limit `drplan-fleet-drill`, set to this value at each fleet drill's start)."""


class EvidenceSettings(_Model):
    """Where every DR test result is kept as an append-only hash chain (drplan/evidence.py), and how late a DR test
    may be before readiness reports it."""

    location: Annotated[str, AfterValidator(_evidence_location)]
    """s3://bucket/prefix/, or a local directory (relative to the plan file)."""
    grace: Duration = timedelta(days=14)
    """Readiness: a DR test older than a quarter (92 days) plus this is a not-ready finding."""


class SandboxSettings(_Model):
    """Only for the local sandbox: where its state lives and on which loopback ports its parts listen."""

    state_dir: str = "../.sandbox"
    os_user: Name = "drplan-pg"
    kube_api: Endpoint = "127.0.0.1:15980"
    kube_api_dr: Endpoint = "127.0.0.1:15981"
    """The Kubernetes API of the cluster in aws.dr_region."""
    demo_rows: int = Field(default=100_000, ge=100)
    heartbeat_interval: Duration = timedelta(seconds=5)
    archive_timeout: Duration = timedelta(seconds=60)


ALARM_RUNBOOKS = ("db-failover", "region-failover")
"""The runbooks an alarm may start: they take `first_alarm` (the impact window starts there) and wait for approval."""


class AlarmRunbook(_Model):
    """A CloudWatch alarm that starts a runbook: the alarm-watch flow sees it in ALARM and emits an event, and an
    automation (created by `drplan serve`) runs the runbook's deployment, which waits for approval unless
    `unattended`."""

    alarm: str = Field(min_length=1)
    """The CloudWatch alarm's name."""
    region: str | None = None
    """Where the alarm lives (default aws.region)."""
    runbook: Literal[ALARM_RUNBOOKS]  # type: ignore[valid-type]
    deployment: str | None = Field(default=None, pattern=r"^[^/]+/[^/]+$")
    """The deployment to run, `flow/deployment` (default `<runbook>/<runbook>`, as prefect.yaml names them)."""
    parameters: dict[str, str] = {}
    """The runbook's parameters (e.g. database: devonn-rds, mode: multi-az)."""
    unattended: bool = False
    """Start it approved in advance: a destructive step with nobody asked. Only where the plan owner decided so."""
    cooldown: Duration = timedelta(hours=1)
    """A flapping alarm starts at most one run per cooldown."""

    @property
    def deployment_name(self) -> str:
        return self.deployment or f"{self.runbook}/{self.runbook}"

    @property
    def resource_id(self) -> str:
        """The Prefect event resource of the alarm (alarm-watch emits ALARM_FIRING for it)."""
        return f"drplan.alarm.{self.alarm}"


ALARM_FIRING = "drplan.alarm.firing"


class Plan(_Model):
    name: Name = "drplan"
    objectives: Objectives = Objectives()
    aws: AwsSettings
    databases: list[Database] = []
    buckets: list[Bucket] = []
    clusters: list[Cluster] = []
    dns: Dns | None = None
    services: list[Service] = []
    failover: RegionFailover = RegionFailover()
    configuration: ConfigurationBackup | None = None
    discover: list[Selector] = []
    """Buckets and RDS databases taken in by tag or name pattern (drplan/discovery.py), besides those listed."""
    notifications: Notifications = Notifications()
    alarms: list[AlarmRunbook] = []
    approval: ApprovalSettings = ApprovalSettings()
    drill: DrillSettings = DrillSettings()
    evidence: EvidenceSettings | None = None
    sandbox: SandboxSettings | None = None
    _base_dir: Path = PrivateAttr(default=Path("."))

    def state_dir(self) -> Path:
        """Where the local servers of a plan with `sandbox:` keep their state (DRPLAN_SANDBOX_DIR overrides)."""
        if self.sandbox is None:
            raise DrplanError(f"plan {self.name} has no sandbox: section; use plans/sandbox.yaml or add one")
        return Path(os.environ.get("DRPLAN_SANDBOX_DIR") or self.resolve_path(self.sandbox.state_dir))

    def resolve_path(self, value: str) -> Path:
        """Paths in a plan are relative to the plan file."""
        path = Path(value).expanduser()
        return path if path.is_absolute() else (self._base_dir / path).resolve()

    def database(self, name: str) -> Database:
        return _lookup(self.databases, name, "database")

    def bucket(self, name: str) -> Bucket:
        return _lookup(self.buckets, name, "bucket")

    def cluster(self, name: str) -> Cluster:
        return _lookup(self.clusters, name, "cluster")

    def service(self, name: str) -> Service:
        return _lookup(self.services, name, "service")

    def region_of(self, cluster: Cluster) -> str:
        return cluster.region or self.aws.region

    def member_region(self, db: Database, role: str) -> str:
        """Where a database member runs: the DR replica in its own region, the others in aws.region."""
        return db.dr_replica.region if role == "dr_replica" and db.dr_replica else self.aws.region


def _lookup(items: list[Any], name: str, what: str) -> Any:
    for item in items:
        if item.name == name:
            return item
    known = ", ".join(i.name for i in items) or "(none defined)"
    raise PlanError("plan", [f"unknown {what} {name!r}; the plan defines: {known}"])


# Keys whose literal value in a plan would be a credential. A plan holds references, never secrets.
_SECRET_KEYS = re.compile(r"(pass(word|wd)?|secret(_key)?|token|api_key|private_key|credentials?)$", re.I)
_REFERENCE_KEYS = {"credentials_secret", "token_secret", "credentials_block", "slack_webhook_block"}
_URL_WITH_PASSWORD = re.compile(r"^[a-z][a-z0-9+.\-]*://[^/\s:@]+:[^/\s@]+@", re.I)


def _inline_secrets(node: Any, path: str = "") -> list[str]:
    problems: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            child = f"{path}.{key}" if path else str(key)
            if (
                isinstance(key, str)
                and _SECRET_KEYS.search(key)
                and key not in _REFERENCE_KEYS
                and not isinstance(value, dict | list)
                and value not in (None, "")
            ):
                problems.append(
                    f"{child}: inline secrets are not allowed in a plan; store it in AWS Secrets Manager "
                    "or a Prefect Secret block and reference it with credentials_secret / token_secret"
                )
            else:
                problems.extend(_inline_secrets(value, child))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            problems.extend(_inline_secrets(value, f"{path}[{index}]"))
    elif isinstance(node, str) and _URL_WITH_PASSWORD.match(node):
        problems.append(
            f"{path}: this URL carries a password; remove user:password@ and reference the credentials "
            "with credentials_secret"
        )
    return problems


def _location(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not str(part).startswith(("function-", "lax-")):  # pydantic's validator wrappers
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def _error_line(error: dict[str, Any], fields_at: dict[str, list[str]]) -> str:
    loc = _location(error["loc"])
    kind = error["type"]
    if kind == "extra_forbidden":
        parent = re.sub(r"\[\d+\]", "", loc).rpartition(".")[0]
        allowed = fields_at.get(parent)
        hint = f"; allowed here: {', '.join(allowed)}" if allowed else ""
        return f"{loc}: unknown field{hint}"
    if kind == "missing":
        return f"{loc}: required field is missing; add it"
    if kind == "enum":
        expected = error.get("ctx", {}).get("expected", "")
        return f"{loc}: {error['input']!r} is not allowed; write one of: {expected.replace(' or ', ', ')}"
    if kind in ("less_than_equal", "greater_than_equal", "less_than", "greater_than"):
        bound = next(iter(error["ctx"].values()))
        op = {"less_than_equal": "<=", "greater_than_equal": ">=", "less_than": "<", "greater_than": ">"}[kind]
        return f"{loc}: {error['input']!r} is out of range; write a number {op} {bound}"
    if kind == "string_pattern_mismatch":
        return f"{loc}: {error['input']!r} has the wrong form (expected pattern {error['ctx']['pattern']})"
    message = error["msg"].removeprefix("Value error, ")
    return f"{loc}: {message}"


def _fields_by_path(model: type[BaseModel], prefix: str = "") -> dict[str, list[str]]:
    """Map a (list-index-free) field path to the field names allowed there, for 'unknown field' hints."""
    out = {prefix: list(model.model_fields)}
    for name, field in model.model_fields.items():
        for sub in _models_in(field.annotation):
            out.update(_fields_by_path(sub, f"{prefix}.{name}" if prefix else name))
    return out


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in getattr(annotation, "__args__", ()) for m in _models_in(arg)]


def _cross_references(plan: Plan) -> list[str]:
    """Unique names, and services that name a database or cluster the plan defines."""
    problems = []
    for attr in ("databases", "buckets", "clusters", "services"):
        first: dict[str, int] = {}
        for index, item in enumerate(getattr(plan, attr)):
            if item.name in first:
                problems.append(f"{attr}[{index}].name: {item.name!r} is already used by {attr}[{first[item.name]}]; "
                                "names must be unique")
            first.setdefault(item.name, index)
    for index, service in enumerate(plan.services):
        for attr, known in (("database", plan.databases), ("cluster", plan.clusters)):
            wanted = getattr(service, attr)
            names = [item.name for item in known]
            if wanted and wanted not in names:
                problems.append(f"services[{index}].{attr}: {wanted!r} is not a {attr} of this plan; "
                                f"use one of: {', '.join(names) or f'(no {attr}s defined)'}")
        clusters = [c.name for c in plan.clusters]
        if service.dr and service.dr.cluster not in clusters:
            problems.append(f"services[{index}].dr.cluster: {service.dr.cluster!r} is not a cluster of this plan; "
                            f"use one of: {', '.join(clusters) or '(no clusters defined)'}")
    regions = {plan.aws.region, plan.aws.dr_region} - {None}
    for region in sorted(set(plan.dns.targets) - regions if plan.dns else set()):
        problems.append(f"dns.targets.{region}: not a region of this plan; use {' or '.join(sorted(regions))}")
    databases = [db.name for db in plan.databases]
    for index, mapping in enumerate(plan.alarms):
        wanted = mapping.parameters.get("database")
        if wanted is not None and wanted not in databases:
            problems.append(f"alarms[{index}].parameters.database: {wanted!r} is not a database of this plan; use "
                            f"one of: {', '.join(databases) or '(no databases defined)'}")
        if mapping.region and mapping.region not in regions:
            problems.append(f"alarms[{index}].region: {mapping.region!r} is not a region of this plan; use "
                            f"{' or '.join(sorted(regions))}")
    return problems


def parse_plan(data: Any, source: str = "plan") -> Plan:
    """Validate plan data (already parsed from YAML). Raises PlanError listing every problem."""
    if not isinstance(data, dict):
        raise PlanError(source, ["(top level): a plan is a YAML mapping with aws:, databases:, ... keys"])
    problems = _inline_secrets(data)
    flagged = {line.split(":", 1)[0] for line in problems}
    try:
        plan = Plan.model_validate(data)
    except ValidationError as exc:
        fields = _fields_by_path(Plan)
        lines = (_error_line(error, fields) for error in exc.errors())
        problems.extend(line for line in lines if line.split(":", 1)[0] not in flagged)
        raise PlanError(source, problems) from None
    problems.extend(_cross_references(plan))
    if problems:
        raise PlanError(source, problems)
    return plan


def resolve_plan_path(ref: str | Path) -> Path:
    """A plan reference is a file path, or a bare name looked up as plans/NAME.yaml."""
    path = Path(ref)
    if path.is_file():
        return path
    named = PLANS_DIR / f"{ref}.yaml"
    if not path.suffix and named.is_file():
        return named
    known = ", ".join(sorted(p.stem for p in PLANS_DIR.glob("*.yaml")))
    raise PlanError(str(ref), [f"no such plan file; pass a path to a YAML plan or one of: {known}"])


def load_plan(ref: str | Path) -> Plan:
    """The plan `ref` names. Parsed once per file content: loading the unchanged file again (the CLI, then each
    flow and subflow of a command) returns the same Plan, which is frozen and must not be mutated."""
    path = resolve_plan_path(ref)
    return _parse_file(str(path), path.resolve(), path.read_text())


@lru_cache(maxsize=32)
def _parse_file(source: str, resolved: Path, text: str) -> Plan:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "somewhere"
        raise PlanError(source, [f"not valid YAML at {where}: {getattr(exc, 'problem', exc)}"]) from None
    plan = parse_plan(data, source)
    plan._base_dir = resolved.parent
    return plan
