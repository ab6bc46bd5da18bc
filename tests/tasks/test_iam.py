"""Readiness's own permissions (tasks/iam.py, the "AWS permissions" finding of flows/dr_readiness.py) against a
stand-in IAM that simulates: moto has no SimulatePrincipalPolicy."""

import pytest

from drplan.errors import AccessDenied
from drplan.iam_policy import iam_policy
from drplan.plan import PLANS_DIR, load_plan
from flows import dr_readiness
from tasks.iam import CannotSimulate, denied_permissions, principal_of

PLAN = load_plan(PLANS_DIR / "sandbox.yaml")
USER = "arn:aws:iam::123456789012:user/drplan"


class SimulatingIam:
    """Answers SimulatePrincipalPolicy, denying `denied` actions; records the requests."""

    def __init__(self, denied: set[str] = frozenset(), refuse: Exception | None = None) -> None:
        self.denied, self.refuse, self.requests = denied, refuse, []

    def get_paginator(self, name: str):
        assert name == "simulate_principal_policy"
        return self

    def paginate(self, PolicySourceArn: str, ActionNames: list[str], ResourceArns: list[str]):  # noqa: N803
        if self.refuse:
            raise self.refuse
        self.requests.append((PolicySourceArn, ActionNames, ResourceArns))
        yield {"EvaluationResults": [
            {"EvalActionName": action, "EvalResourceName": resource,
             "EvalDecision": "implicitDeny" if action in self.denied else "allowed"}
            for action in ActionNames for resource in ResourceArns]}


def test_an_assumed_role_is_simulated_as_its_role_and_a_root_caller_not_at_all():
    assert principal_of("arn:aws:sts::123456789012:assumed-role/DrPlan/session-1") == (
        "arn:aws:iam::123456789012:role/DrPlan", "123456789012")
    assert principal_of(USER) == (USER, "123456789012")
    with pytest.raises(CannotSimulate, match="is no IAM user or role"):
        principal_of("arn:aws:iam::123456789012:root")


def test_each_statement_is_simulated_on_its_own_resources_in_the_callers_account():
    iam = SimulatingIam({"rds:PromoteReadReplica"})
    denied = denied_permissions(iam, USER, PLAN)
    statements = iam_policy(PLAN, account="123456789012")["Statement"]
    assert [(a, r) for _, a, r in iam.requests] == [(s["Action"], s["Resource"]) for s in statements]
    assert {principal for principal, _, _ in iam.requests} == {USER}
    assert denied and {action for action, _ in denied} == {"rds:PromoteReadReplica"}
    assert all(":123456789012:" in resource for _, resource in denied)


def readiness_with(monkeypatch, iam: SimulatingIam) -> tuple[bool, str]:
    monkeypatch.setattr(dr_readiness, "check_aws_access", lambda plan: USER)
    monkeypatch.setattr(dr_readiness, "aws_client", lambda plan, service, region=None: iam)
    return dr_readiness.permissions_probe(PLAN)()


def test_readiness_names_the_denied_actions(monkeypatch):
    ready, detail = readiness_with(monkeypatch, SimulatingIam({"s3:PutObject", "route53:ChangeResourceRecordSets"}))
    assert not ready
    assert detail.startswith(f"{USER} is denied route53:ChangeResourceRecordSets, s3:PutObject (e.g. ")
    ready, detail = readiness_with(monkeypatch, SimulatingIam())
    assert ready and detail == f"{USER} may perform every action the runbooks need (IAM policy simulation)"


def test_readiness_skips_the_check_when_the_credentials_may_not_simulate(monkeypatch):
    refused = AccessDenied("AWS denied iam:SimulatePrincipalPolicy on arn:aws:iam::123456789012:user/drplan")
    ready, detail = readiness_with(monkeypatch, SimulatingIam(refuse=refused))
    assert ready and detail == f"not checked: {USER} may not simulate its policies (iam:SimulatePrincipalPolicy)"
