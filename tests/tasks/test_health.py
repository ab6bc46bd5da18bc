"""Recovery validation against the real sandbox: every check reported separately, a broken expectation fails
only its own check, and neither the API token nor the database password reaches the logs or the result."""

from __future__ import annotations

import json
import logging

from prefect import flow

from drplan.clients import aws_client, db_credentials, pg_target
from drplan.plan import load_plan
from drplan.results import Status
from sandbox import stack
from tasks.health import (
    Exposure,
    ServiceValidation,
    moved_exposure_check,
    network_exposure,
    validate_service,
    validate_service_task,
)
from tests.helpers import logged_text

CHECKS = ["health", "database", "GET /api/me with token", "GET /api/me without token", "GET /api/stats"]


def _failing(result: ServiceValidation) -> dict[str, str]:
    return {c.name: c.observed for c in result.checks if not c.passed}


def _validate_variant(plan_variant, change) -> ServiceValidation:
    plan = load_plan(plan_variant(change))
    return validate_service(plan, plan.services[0])


def test_healthy_sandbox_passes_every_check(sandbox):
    result = validate_service(sandbox, sandbox.services[0])
    assert result.passed, _failing(result)
    assert [c.name for c in result.checks] == CHECKS
    assert {c.name: c.observed for c in result.checks}["GET /api/me without token"] == "HTTP 401"
    assert all(0 <= c.duration_s < 5 for c in result.checks)
    assert json.loads(result.model_dump_json())["passed"] is True


def test_wrong_token_fails_only_the_token_check(sandbox, plan_variant):
    secrets_manager = aws_client(sandbox, "secretsmanager")
    secrets_manager.create_secret(Name="devonn/api/wrong-token", SecretString=json.dumps({"token": "not-it"}))
    try:
        result = _validate_variant(plan_variant,
                                   lambda d: d["services"][0].update(token_secret="devonn/api/wrong-token"))
    finally:
        secrets_manager.delete_secret(SecretId="devonn/api/wrong-token", ForceDeleteWithoutRecovery=True)
    assert _failing(result) == {"GET /api/me with token": "HTTP 401"}
    assert not result.passed


def test_missing_token_secret_fails_only_the_token_check(sandbox, plan_variant):
    result = _validate_variant(plan_variant, lambda d: d["services"][0].update(token_secret="devonn/api/nope"))
    assert list(_failing(result)) == ["GET /api/me with token"]
    assert "secret devonn/api/nope: not found" in _failing(result)["GET /api/me with token"]


def test_unmatchable_endpoint_expectations_fail_only_their_checks(sandbox, plan_variant):
    def change(data: dict) -> None:
        data["services"][0]["endpoints"][1]["expect_contains"] = "no-such-text"
        data["services"][0]["endpoints"].append({"path": "/api/users/99999999", "expect_status": 200})

    result = _validate_variant(plan_variant, change)
    assert _failing(result) == {
        "GET /api/stats": "HTTP 200, body without 'no-such-text'",
        "GET /api/users/99999999": "HTTP 404",
    }
    expected = {c.name: c.expectation for c in result.checks}
    assert expected["GET /api/stats"] == "HTTP 200 containing 'no-such-text'"


def test_rds_database_reports_cloudwatch_no_data_as_its_own_status(sandbox, plan_variant):
    def rds_without_metrics(data: dict) -> None:  # an instance name no other test published metrics for
        data["services"][0]["database"] = "devonn-rds"
        db = next(d for d in data["databases"] if d["name"] == "devonn-rds")
        postgres = next(d for d in data["databases"] if d["name"] == "devonn-postgres")
        db["endpoints"] = {"devonn-rds-without-metrics": postgres["endpoints"][postgres["primary"]]}
        db["primary"] = "devonn-rds-without-metrics"

    result = _validate_variant(plan_variant, rds_without_metrics)
    metrics = {c.name: c.status for c in result.checks if c.name.startswith("cloudwatch")}
    assert metrics == {"cloudwatch CPUUtilization": Status.no_data,
                       "cloudwatch DatabaseConnections": Status.no_data}
    assert set(_failing(result)) == set(metrics)  # the data-plane checks (real PostgreSQL) still pass
    assert not result.passed


def test_secrets_never_logged_nor_reported(sandbox, sandbox_dir, caplog):
    values = stack.sandbox_secrets(sandbox_dir)
    with caplog.at_level(logging.DEBUG):
        result = validate_service(sandbox, sandbox.services[0])
    logged = logged_text(caplog)
    assert "check GET /api/me with token: passed" in logged
    for secret in (values["api_token"], values["db_password"]):
        assert secret not in logged
        assert secret not in result.model_dump_json()


def test_task_runs_in_a_flow(sandbox, prefect_server):
    @flow
    def validate() -> ServiceValidation:
        return validate_service_task(sandbox, sandbox.services[0])

    assert validate().passed


def test_validations_of_several_services_fail_when_any_check_fails():
    def check(name: str, status: Status) -> dict:
        return {"name": name, "status": status, "observed": "-", "expectation": "-", "duration_s": 0.0}

    api = ServiceValidation(service="api", checks=[check("GET /health", Status.passed)])
    worker = ServiceValidation(service="worker", checks=[check("GET /health", Status.no_data)])
    both = ServiceValidation.of_all([api, worker])
    assert both.service == "api, worker" and not both.passed
    assert [c.name for c in both.checks if not c.passed] == ["worker: GET /health"]
    assert ServiceValidation.of_all([api]) is api


def test_network_exposure_compared_across_servers_fails_naming_a_new_pg_hba_rule(sandbox):
    """The replica (another port) is exposed as the primary; a rule added to its pg_hba.conf (read from the file,
    never loaded) fails the check, naming it. Not measured before: skipped, and validation is not failed by it."""
    db = sandbox.database("devonn-postgres")
    credentials = db_credentials(sandbox, db)
    primary, replica = (pg_target(sandbox, db, role, credentials) for role in ("primary", "replica"))
    before = Exposure(db.primary, network_exposure(sandbox, db, primary))
    assert primary.port != replica.port and before.facts["pg_hba"]
    same = moved_exposure_check(sandbox, db, before, replica)
    assert (same.status, same.observed) == (Status.passed, "unchanged")
    hba = stack.sandbox_postgres(sandbox, db).data_dir(db.replica) / "pg_hba.conf"
    original = hba.read_text()
    try:
        hba.write_text(original + "host all all 0.0.0.0/0 scram-sha-256\n")
        changed = moved_exposure_check(sandbox, db, before, replica)
    finally:
        hba.write_text(original)
    assert changed.status is Status.failed and changed.name == "database devonn-postgres: network exposure"
    assert changed.observed.startswith("changed: pg_hba ") and "0.0.0.0 0.0.0.0 scram-sha-256" in changed.observed
    unread = moved_exposure_check(sandbox, db, Exposure(db.primary, None, "connection refused"), replica)
    assert unread.status is Status.skipped and "not measured" in unread.observed and "connection refused" in (
        unread.observed)
    assert ServiceValidation(service="x", checks=[same, unread]).passed
