"""IAM: may drplan's own credentials do what the plan's runbooks need? IAM policy simulation of the caller
(SimulatePrincipalPolicy) against the plan's least-privilege policy (`drplan.iam_policy`). And a compromised
principal's access revoked and restored (`Principal`)."""

from __future__ import annotations

import json
import re

from botocore.exceptions import BotoCoreError, ClientError

from drplan.errors import AccessDenied, DrplanError
from drplan.iam_policy import iam_policy
from drplan.plan import Plan

_ASSUMED_ROLE = re.compile(r"arn:(?P<partition>[\w-]+):sts::(?P<account>\d{12}):assumed-role/(?P<role>[^/]+)/.+")
_PRINCIPAL = re.compile(r"arn:[\w-]+:iam::(?P<account>\d{12}):(user|role)/.+")


class CannotSimulate(DrplanError):
    """The credentials' permissions could not be simulated (not allowed, a root or federated caller, no IAM)."""


def principal_of(caller: str) -> tuple[str, str]:
    """(IAM principal ARN, account) of an STS caller ARN: an assumed role's session maps to its role."""
    if found := _ASSUMED_ROLE.fullmatch(caller):
        return f"arn:{found['partition']}:iam::{found['account']}:role/{found['role']}", found["account"]
    if found := _PRINCIPAL.fullmatch(caller):
        return caller, found["account"]
    raise CannotSimulate(f"{caller} is no IAM user or role")


def denied_permissions(iam, caller: str, plan: Plan) -> list[tuple[str, str]]:
    """(action, resource) pairs of the plan's policy that the caller's own policies do not allow: one simulation
    per statement (its actions on its resources, the caller's account filled in)."""
    principal, account = principal_of(caller)
    denied = []
    try:
        for statement in iam_policy(plan, account=account)["Statement"]:
            pages = iam.get_paginator("simulate_principal_policy").paginate(
                PolicySourceArn=principal, ActionNames=statement["Action"], ResourceArns=statement["Resource"])
            denied += [(result["EvalActionName"], result.get("EvalResourceName", "*"))
                       for page in pages for result in page["EvaluationResults"]
                       if result["EvalDecision"] != "allowed"]
    except AccessDenied:
        raise CannotSimulate(f"{principal} may not simulate its policies (iam:SimulatePrincipalPolicy)") from None
    except ClientError as exc:
        raise CannotSimulate(f"IAM policy simulation of {principal}: {exc.response['Error']['Code']}") from None
    except BotoCoreError as exc:
        raise CannotSimulate(f"IAM policy simulation of {principal}: {exc}") from None
    return denied


# Revoking a compromised principal's access (flows/access_revocation.py). What was done is recorded on the
# principal itself (REVOKED_TAG: the access keys drplan deactivated), so that `--restore` undoes exactly that.

DENY_POLICY = "drplan-deny-all"
DENY_ALL = {"Version": "2012-10-17", "Statement": [{"Sid": "DrplanRevokedAccess", "Effect": "Deny", "Action": "*",
                                                    "Resource": "*"}]}
REVOKED_TAG = "drplan:revoked-keys"
_ARN = re.compile(r"arn:[\w-]+:iam::\d{12}:(?P<kind>user|role)/(?:[\w+=,.@-]+/)*(?P<name>[\w+=,.@-]+)")


class Principal:
    """An IAM user or role named by its ARN; an ARN of anything else, or of no existing principal, is refused."""

    def __init__(self, iam, arn: str):
        found = _ARN.fullmatch(arn)
        if not found:
            raise DrplanError(f"{arn!r} is no IAM user or role ARN; write arn:aws:iam::ACCOUNT:user/NAME or "
                              "arn:aws:iam::ACCOUNT:role/NAME")
        self.iam, self.arn, self.kind, self.name = iam, arn, found["kind"], found["name"]
        try:
            getattr(iam, f"get_{self.kind}")(**self._key)
        except ClientError as exc:
            if exc.response["Error"]["Code"] == "NoSuchEntity":
                raise DrplanError(f"no IAM {self.kind} {self.name} ({arn}); check the ARN") from None
            raise

    @property
    def _key(self) -> dict[str, str]:
        return {"UserName" if self.kind == "user" else "RoleName": self.name}

    def active_keys(self) -> list[str]:
        if self.kind != "user":
            return []
        return [k["AccessKeyId"] for k in self.iam.list_access_keys(UserName=self.name)["AccessKeyMetadata"]
                if k["Status"] == "Active"]

    def set_key(self, key: str, status: str) -> None:
        self.iam.update_access_key(UserName=self.name, AccessKeyId=key, Status=status)

    def denied(self) -> bool:
        """Whether drplan's deny-all policy is attached (inline)."""
        names = getattr(self.iam, f"list_{self.kind}_policies")(**self._key)["PolicyNames"]
        return DENY_POLICY in names

    def deny_all(self, on: bool) -> None:
        """Attach (on) or remove drplan's inline deny-all policy; idempotent."""
        if on and not self.denied():
            getattr(self.iam, f"put_{self.kind}_policy")(**self._key, PolicyName=DENY_POLICY,
                                                         PolicyDocument=json.dumps(DENY_ALL))
        elif not on and self.denied():
            getattr(self.iam, f"delete_{self.kind}_policy")(**self._key, PolicyName=DENY_POLICY)

    def revoked_keys(self) -> list[str] | None:
        """The keys the last revocation deactivated (REVOKED_TAG); None when no revocation is recorded."""
        tags = getattr(self.iam, f"list_{self.kind}_tags")(**self._key)["Tags"]
        value = next((t["Value"] for t in tags if t["Key"] == REVOKED_TAG), None)
        return None if value is None else [k for k in value.split(" ") if k]

    def record_revoked(self, keys: list[str] | None) -> None:
        """Record the deactivated keys (a revocation), or with None remove the record (a restore)."""
        if keys is None:
            getattr(self.iam, f"untag_{self.kind}")(**self._key, TagKeys=[REVOKED_TAG])
        else:
            getattr(self.iam, f"tag_{self.kind}")(**self._key, Tags=[{"Key": REVOKED_TAG, "Value": " ".join(keys)}])
