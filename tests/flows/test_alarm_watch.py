"""alarm-watch against CloudWatch on moto: an alarm in ALARM is reported firing (its event drives the automation,
see tests/cli/test_serve.py), one in OK is not, and a mapped alarm that does not exist fails the run by name."""

from __future__ import annotations

import pytest
import yaml

from flows.alarm_watch import alarm_watch
from sandbox.launchers import moto
from tests.helpers import REPO


@pytest.fixture(scope="module")
def cloudwatch_endpoint(tmp_path_factory):
    with moto(tmp_path_factory.mktemp("moto")) as url:
        yield url


def plan_with(tmp_path, endpoint: str, alarms: list[str]) -> str:
    data = yaml.safe_load((REPO / "plans" / "sandbox.yaml").read_text())
    data["aws"]["endpoint_url"] = endpoint
    data["alarms"] = [{"alarm": a, "runbook": "db-failover", "parameters": {"database": "devonn-rds"}} for a in alarms]
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def alarm(endpoint: str, name: str, state: str) -> None:
    import boto3

    cloudwatch = boto3.client("cloudwatch", endpoint_url=endpoint, region_name="us-east-1",
                              aws_access_key_id="sandbox", aws_secret_access_key="sandbox")
    cloudwatch.put_metric_alarm(AlarmName=name, MetricName="CPUUtilization", Namespace="AWS/RDS", Statistic="Average",
                                Period=60, EvaluationPeriods=1, Threshold=90, ComparisonOperator="GreaterThanThreshold")
    cloudwatch.set_alarm_state(AlarmName=name, StateValue=state, StateReason=f"test: {state}")


@pytest.mark.usefixtures("prefect_server")
def test_firing_quiet_and_missing_alarms(cloudwatch_endpoint, tmp_path):
    alarm(cloudwatch_endpoint, "db-down", "ALARM")
    alarm(cloudwatch_endpoint, "db-fine", "OK")
    assert alarm_watch(plan=plan_with(tmp_path, cloudwatch_endpoint, ["db-down", "db-fine"])) == ["db-down"]
    state = alarm_watch(plan=plan_with(tmp_path, cloudwatch_endpoint, ["db-down", "db-typo"]), return_state=True)
    assert state.is_failed()
    assert state.message == ("no such CloudWatch alarm: db-typo (us-east-1); fix alarms[].alarm in plan "
                             "sandbox")
    assert state.result(raise_on_failure=False) == ["db-down"]
