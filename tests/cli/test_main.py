"""The `drplan` command line: `plan validate`."""

from __future__ import annotations

from typer.testing import CliRunner

from cli.main import app

runner = CliRunner()


def test_plan_validate_cli(tmp_path):
    ok = runner.invoke(app, ["plan", "validate", "plans/devonn.yaml"])
    assert ok.exit_code == 0 and "valid (1 databases" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("aws: {region: us-east-1, dr_region: us-west-2, password: hunter2}\n")
    result = runner.invoke(app, ["plan", "validate", str(bad)])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        f"{bad}: aws.password: inline secrets are not allowed in a plan; store it in AWS Secrets Manager or a "
        "Prefect Secret block and reference it with credentials_secret / token_secret"
    ]
