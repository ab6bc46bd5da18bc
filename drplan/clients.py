"""Client factories: boto3, Kubernetes and PostgreSQL, built from the plan. Credentials are resolved here,
from a prefect-aws block, AWS Secrets Manager or a Prefect Secret block, and never come from parameters."""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import boto3
import psycopg
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError
from pydantic import SecretStr

from drplan.errors import AccessDenied, DrplanError, first_line
from drplan.iam_policy import actions_of
from drplan.plan import AwsSettings, Cluster, Database, DatabaseKind, Plan, Service, host_port

# botocore logs request parameters and response bodies at DEBUG, Secrets Manager values included: never let
# those two loggers below INFO, whatever level the caller configures.
for _name in ("botocore.endpoint", "botocore.parsers"):
    logging.getLogger(_name).setLevel(logging.INFO)


MAX_ATTEMPTS = 10
"""Attempts per AWS call (botocore's standard mode, backoff with jitter up to 20 s): a call fails only when all
ten were throttled or reset (0.3^10 at a 30% fault rate). Standard mode also keeps a retry quota per client (500
tokens, 5 per retried throttle, 14 per other retry, given back on success): a long run of a client under a high
sustained fault rate can drain it, and then a faulted call fails at its first error, as botocore intends."""


def botocore_config(aws: AwsSettings) -> Config:
    """Standard retry mode; for non-AWS endpoints only the checksums S3-compatible stores accept."""
    options: dict[str, Any] = {
        "retries": {"mode": "standard", "max_attempts": MAX_ATTEMPTS},
        "connect_timeout": 5,
        "read_timeout": 60,
    }
    if aws.endpoint_url:
        options["request_checksum_calculation"] = "when_required"
        options["response_checksum_validation"] = "when_required"
    return Config(**options)


def boto3_session(aws: AwsSettings) -> boto3.Session:
    """The prefect-aws block when the plan names one, else the default chain. A loopback endpoint (the
    sandbox's moto) accepts any key, so there a missing chain falls back to placeholder keys."""
    if aws.credentials_block:
        from prefect_aws import AwsCredentials

        return AwsCredentials.load(aws.credentials_block).get_boto3_session()
    session = boto3.Session()
    if session.get_credentials() is None and aws.is_loopback:
        session = boto3.Session(aws_access_key_id="sandbox", aws_secret_access_key="sandbox")
    return session


class _RetryCount:
    """The retries of every AWS call drplan's clients made in this process, thread-safe. Retries inside child
    processes (barman-cloud fetching WAL, taking a base backup) happen in their own botocore and are not counted."""

    def __init__(self) -> None:
        self.total = 0
        self._lock = threading.Lock()

    def seen(self, context: dict[str, Any], **_: Any) -> None:
        """after-call and after-call-error handler: the call's attempts beyond the first (ClientErrors and
        exhausted retries included)."""
        retries = context.get("retries", {}).get("attempt", 1) - 1
        if retries > 0:
            with self._lock:
                self.total += retries


_RETRIES = _RetryCount()


def retries_since() -> Callable[[], int]:
    """A function giving the AWS retries made since this call, for a run's report. Process-wide: runs going on in
    parallel in one process count each other's."""
    start = _RETRIES.total
    return lambda: _RETRIES.total - start


UNREACHABLE_ATTEMPTS = 3
"""Attempts for a call whose endpoint refuses the connection or does not resolve: that is no throttle to ride out,
and ten attempts would take a minute and a half to say so."""


def _give_up_when_unreachable(attempts: int, caught_exception: Exception | None = None, **_: Any) -> None:
    """needs-retry handler, ahead of botocore's own: raise the connection error after UNREACHABLE_ATTEMPTS."""
    if isinstance(caught_exception, EndpointConnectionError) and attempts >= UNREACHABLE_ATTEMPTS:
        raise caught_exception


DENIED_CODES = frozenset({"AccessDenied", "AccessDeniedException", "UnauthorizedOperation", "AuthorizationError"})
_PERFORM = re.compile(r"perform: (?P<action>[\w-]+:\w+)(?: on resource: \"?(?P<resource>[^\s\"]+))?")
_NAMING_PARAMS = ("DBInstanceIdentifier", "SourceDBInstanceIdentifier", "SecretId", "HostedZoneId", "DNSName",
                  "clusterName", "nodegroupName", "name", "GroupName", "Id")
"""Request parameters that name what a call acts on, for a denial's line when AWS's message does not."""


def _keep_params(params: dict[str, Any], context: dict[str, Any], **_: Any) -> None:
    """before-parameter-build handler: the call's parameters, for `_refuse_denied`."""
    context["drplan-params"] = params


def _denied_resource(service: str, params: dict[str, Any]) -> str:
    if service == "s3" and isinstance(params.get("Bucket"), str):
        return f"arn:aws:s3:::{params['Bucket']}" + (f"/{params['Key']}" if isinstance(params.get("Key"), str) else "")
    return ", ".join(f"{name} {params[name]}" for name in _NAMING_PARAMS if isinstance(params.get(name), str)) or "*"


def _refuse_denied(region: str, http_response: Any, parsed: dict[str, Any], model: Any, context: dict[str, Any],
                   **_: Any) -> None:
    """after-call handler: a refusal for lack of permission becomes AccessDenied, one line naming the IAM action
    and the resource (AWS's own words when its message has them, else the operation's action and parameters)."""
    error = parsed.get("Error", {}) if http_response.status_code >= 300 else {}
    if error.get("Code") not in DENIED_CODES and not (error.get("Code") == "403" and http_response.status_code == 403):
        return
    service, operation = model.service_model.service_name, model.name
    said = _PERFORM.search(error.get("Message") or "")
    params = context.get("drplan-params", {})
    resource = said["resource"] if said and said["resource"] else _denied_resource(service, params)
    if said:
        what = f"{said['action']} on {resource}"
    elif isinstance(source := params.get("CopySource"), str | dict):  # a copy reads its source, writes its target
        source = source if isinstance(source, str) else f"{source.get('Bucket')}/{source.get('Key')}"
        what = f"s3:GetObject on arn:aws:s3:::{source.lstrip('/')} or s3:PutObject on {resource}"
    else:
        what = f"{' or '.join(actions_of(f'{service}:{operation}'))} on {resource}"
    raise AccessDenied(f"AWS denied {what} ({operation} in {region}); grant it to drplan's credentials "
                       "(drplan plan iam-policy PLAN prints what the runbooks need)")


def new_client(aws: AwsSettings, service: str, region: str, config: Config | None = None) -> Any:
    """A boto3 client (botocore_config, merged with `config`) whose retries are counted (`retries_since`), that
    gives up on an unreachable endpoint after UNREACHABLE_ATTEMPTS and raises AccessDenied for a refused call."""
    base = botocore_config(aws)
    client = boto3_session(aws).client(service, region_name=region, endpoint_url=aws.endpoint_url,
                                       config=base.merge(config) if config else base)
    events = client.meta.events
    for event in ("after-call", "after-call-error"):
        events.register(event, _RETRIES.seen, unique_id=f"drplan-retries-{event}")
    events.register_first("needs-retry", _give_up_when_unreachable, unique_id="drplan-unreachable")
    events.register("before-parameter-build", _keep_params, unique_id="drplan-params")
    events.register("after-call", partial(_refuse_denied, region), unique_id="drplan-denied")
    return client


def aws_client(plan: Plan, service: str, region: str | None = None) -> Any:
    """A boto3 client for `service` in `region` (default: the plan's primary region)."""
    return _cached_client(plan.aws, service, region or plan.aws.region)


@lru_cache(maxsize=64)
def _cached_client(aws: AwsSettings, service: str, region: str) -> Any:
    return new_client(aws, service, region)


def check_aws_access(plan: Plan) -> str:
    """Preflight: the endpoint answers and the credentials are valid (STS GetCallerIdentity). Returns the ARN."""
    where = plan.aws.endpoint_url or f"AWS ({plan.aws.region})"
    try:
        return aws_client(plan, "sts").get_caller_identity()["Arn"]
    except EndpointConnectionError:
        hint = "is the sandbox up? (drplan sandbox up)" if plan.aws.is_loopback else "check network and region"
        raise DrplanError(f"{where} is unreachable; {hint}") from None
    except NoCredentialsError:
        raise DrplanError("no AWS credentials found; configure the default chain or aws.credentials_block") from None
    except ClientError as exc:
        raise DrplanError(f"{where} refused the credentials: {exc.response['Error']['Code']}") from None


def kubeconfig_path(plan: Plan, cluster: Cluster) -> Path:
    """The cluster's kubeconfig file (default ~/.kube/config)."""
    return plan.resolve_path(cluster.kubeconfig) if cluster.kubeconfig else Path("~/.kube/config").expanduser()


def kube_client(plan: Plan, cluster: Cluster) -> Any:
    """A Kubernetes ApiClient from the cluster's kubeconfig (default ~/.kube/config) and context."""
    from kubernetes import config as kube_config

    path = kubeconfig_path(plan, cluster)
    if not path.is_file():
        raise DrplanError(f"cluster {cluster.name}: kubeconfig {path} not found; set clusters[].kubeconfig")
    try:
        return kube_config.new_client_from_config(config_file=str(path), context=cluster.context)
    except kube_config.ConfigException as exc:
        raise DrplanError(f"cluster {cluster.name}: {exc}; check clusters[].context") from None


@dataclass(frozen=True)
class DbCredentials:
    username: str
    password: SecretStr = field(repr=False)


def read_secret(plan: Plan, ref: str, stage: str = "AWSCURRENT") -> str:
    """The value of a secret reference: `prefect:NAME` (Prefect Secret block) or a Secrets Manager id (its version
    labelled `stage`: AWSCURRENT, or AWSPENDING / AWSPREVIOUS during and after a rotation)."""
    if ref.startswith("prefect:"):
        if stage != "AWSCURRENT":
            raise DrplanError(f"secret {ref}: a Prefect Secret block has no {stage} version")
        from prefect.blocks.system import Secret

        try:
            value = Secret.load(ref.removeprefix("prefect:")).get()
        except ValueError:
            raise DrplanError(f"secret {ref}: no such Prefect Secret block; create it first") from None
        return value if isinstance(value, str) else json.dumps(value)
    try:
        return aws_client(plan, "secretsmanager").get_secret_value(SecretId=ref, VersionStage=stage)["SecretString"]
    except ClientError as exc:
        code = exc.response["Error"]["Code"]
        if code == "ResourceNotFoundException":
            version = "" if stage == "AWSCURRENT" else f" version {stage}"
            raise DrplanError(f"secret {ref}{version}: not found in Secrets Manager ({plan.aws.region}); create it"
                              ) from None
        raise DrplanError(f"secret {ref}: {code}: {exc.response['Error'].get('Message', '')}") from None
    except BotoCoreError as exc:
        raise DrplanError(f"secret {ref}: {exc}") from None


def db_credentials(plan: Plan, db: Database, stage: str = "AWSCURRENT") -> DbCredentials:
    """The database's credentials (the `stage` version of its secret: see read_secret)."""
    raw = read_secret(plan, db.credentials_secret, stage)
    try:
        data = json.loads(raw)
        return DbCredentials(data["username"], SecretStr(data["password"]))
    except (ValueError, KeyError, TypeError):
        raise DrplanError(
            f"secret {db.credentials_secret}: expected JSON with username and password"
        ) from None


def api_token(plan: Plan, service: Service, stage: str = "AWSCURRENT") -> SecretStr:
    """The service's API token (the `stage` version of its token_secret, JSON with `token`)."""
    if not service.token_secret:
        raise DrplanError(f"service {service.name} has no token_secret; set services[].token_secret")
    try:
        return SecretStr(json.loads(read_secret(plan, service.token_secret, stage))["token"])
    except (ValueError, KeyError, TypeError):
        raise DrplanError(f"secret {service.token_secret}: expected JSON with token") from None


@dataclass(frozen=True)
class PgTarget:
    """Where and as whom to connect to one member of a database. The password never leaves this object."""

    label: str
    host: str
    port: int
    dbname: str
    credentials: DbCredentials = field(repr=False)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}/{self.dbname}"

    def connect(self, timeout: int = 5, **kwargs: Any) -> psycopg.Connection:
        try:
            return psycopg.connect(
                host=self.host,
                port=self.port,
                dbname=self.dbname,
                user=self.credentials.username,
                password=self.credentials.password.get_secret_value(),
                connect_timeout=timeout,
                application_name="drplan",
                **kwargs,
            )
        except psycopg.OperationalError as exc:
            reason = first_line(exc).rpartition("failed: ")[2].strip()  # libpq: 'connection to server at ... failed: X'
            raise DrplanError(
                f"{self.label} ({self.address}): cannot connect: {reason}; check that it is up and reachable"
            ) from None


def member_endpoint(plan: Plan, db: Database, role: str) -> tuple[str, int]:
    """host, port of a member: the plan's endpoint override, else (rds) the address RDS reports."""
    identifier = db.members[role]
    if identifier in db.endpoints:
        return host_port(db.endpoints[identifier])
    if db.kind is not DatabaseKind.rds:
        raise DrplanError(f"{db.name}: no endpoint for {identifier}; add it under endpoints")
    region = plan.member_region(db, role)
    try:
        instance = aws_client(plan, "rds", region).describe_db_instances(DBInstanceIdentifier=identifier)
    except ClientError as exc:
        raise DrplanError(f"{db.name}: RDS instance {identifier}: {exc.response['Error']['Code']}") from None
    endpoint = instance["DBInstances"][0].get("Endpoint") or {}
    if "Address" not in endpoint:
        raise DrplanError(f"{db.name}: RDS instance {identifier} has no endpoint yet (still creating?)")
    return endpoint["Address"], int(endpoint["Port"])


def pg_target(plan: Plan, db: Database, role: str, credentials: DbCredentials) -> PgTarget:
    host, port = member_endpoint(plan, db, role)
    return PgTarget(f"{db.name}/{role}", host, port, db.dbname, credentials)


def child_aws_env(plan: Plan) -> dict[str, str]:
    """AWS settings for child processes (barman-cloud) as environment variables, never argv: the same retries as
    drplan's clients, so that a throttled WAL fetch in a restore_command is retried, not taken for the end of the
    archive (which would end the replay early)."""
    credentials = boto3_session(plan.aws).get_credentials()
    if credentials is None:
        raise DrplanError("no AWS credentials found; configure the default chain or aws.credentials_block")
    frozen = credentials.get_frozen_credentials()
    env = {
        "AWS_ACCESS_KEY_ID": frozen.access_key,
        "AWS_SECRET_ACCESS_KEY": frozen.secret_key,
        "AWS_DEFAULT_REGION": plan.aws.region,
        "AWS_RETRY_MODE": "standard",
        "AWS_MAX_ATTEMPTS": str(MAX_ATTEMPTS),
    }
    if frozen.token:
        env["AWS_SESSION_TOKEN"] = frozen.token
    if plan.aws.endpoint_url:
        env |= {
            "AWS_ENDPOINT_URL": plan.aws.endpoint_url,
            "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
            "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
        }
    return env
