"""IAM: may drplan's own credentials do what the plan's runbooks need? IAM policy simulation of the caller
(SimulatePrincipalPolicy) against the plan's least-privilege policy (`drplan.iam_policy`)."""

from __future__ import annotations

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
