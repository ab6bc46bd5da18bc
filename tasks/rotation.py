"""Secrets Manager rotation, the steps of AWS's own rotation functions: a new version staged AWSPENDING
(createSecret), set in the system that checks it (setSecret, the caller's job), tested (testSecret), then moved to
AWSCURRENT (finishSecret; the old version becomes AWSPREVIOUS, the rotated-out credential). Values are never
logged, returned unredacted or put into an error message."""

from __future__ import annotations

import json
import secrets
import uuid
from typing import Any

from botocore.exceptions import ClientError
from pydantic import SecretStr

from drplan.clients import aws_client
from drplan.errors import DrplanError
from drplan.logs import run_logger
from drplan.plan import Plan

PASSWORD_BYTES = 32
"""A new password or token: 32 random bytes, URL-safe base64 (43 characters, no quoting needed in a URL)."""


def new_credential() -> SecretStr:
    return SecretStr(secrets.token_urlsafe(PASSWORD_BYTES))


def check_rotatable(ref: str) -> None:
    """Only a Secrets Manager secret has versions to stage; refuse a Prefect Secret block."""
    if ref.startswith("prefect:"):
        raise DrplanError(f"secret {ref} is a Prefect Secret block: drplan rotates Secrets Manager secrets only; "
                          "move the credential to Secrets Manager or rotate it by hand")


def current_version(plan: Plan, ref: str) -> str:
    """The version id labelled AWSCURRENT."""
    try:
        stages = aws_client(plan, "secretsmanager").describe_secret(SecretId=ref)["VersionIdsToStages"]
    except ClientError as exc:
        raise DrplanError(f"secret {ref}: {exc.response['Error']['Code']}") from None
    return next(version for version, labels in stages.items() if "AWSCURRENT" in labels)


def stage_pending(plan: Plan, ref: str, value: dict[str, Any]) -> str:
    """createSecret: a new version of `ref` holding `value` (JSON), labelled AWSPENDING only; returns its id."""
    version = str(uuid.uuid4())
    aws_client(plan, "secretsmanager").put_secret_value(
        SecretId=ref, ClientRequestToken=version, SecretString=json.dumps(value), VersionStages=["AWSPENDING"])
    run_logger().info("secret %s: version %s staged AWSPENDING", ref, version)
    return version


def make_current(plan: Plan, ref: str, version: str, replaced: str) -> None:
    """finishSecret: AWSCURRENT moved from `replaced` (which becomes AWSPREVIOUS) to `version`, AWSPENDING removed.
    Run with the two swapped, it rolls a rotation back."""
    sm = aws_client(plan, "secretsmanager")
    sm.update_secret_version_stage(SecretId=ref, VersionStage="AWSCURRENT", MoveToVersionId=version,
                                   RemoveFromVersionId=replaced)
    stages = sm.describe_secret(SecretId=ref)["VersionIdsToStages"]
    for pending in (v for v, labels in stages.items() if "AWSPENDING" in labels):
        sm.update_secret_version_stage(SecretId=ref, VersionStage="AWSPENDING", RemoveFromVersionId=pending)
    run_logger().info("secret %s: AWSCURRENT is version %s (was %s)", ref, version, replaced)


LEAKED_TAG = "drplan:leaked-at"
"""A secret tagged with this (value: when) held a credential known to have leaked (`drplan sandbox break
leaked-credentials` sets it); a rotation reports it. Versions created after that time are new credentials."""


def leaked_at(plan: Plan, ref: str) -> str | None:
    """When the secret's credential leaked, from its LEAKED_TAG; None when it is not tagged."""
    tags = aws_client(plan, "secretsmanager").describe_secret(SecretId=ref).get("Tags", [])
    return next((t["Value"] for t in tags if t["Key"] == LEAKED_TAG), None)
