"""`drplan s3-verify` on the sandbox: the newest bucket backup checked against its manifest."""

from typer.testing import CliRunner

from cli.main import app
from drplan.clients import aws_client
from drplan.s3manifest import resolve_backup
from drplan.timeutil import utcnow
from tasks.s3 import back_up_prefix, split_uri

runner = CliRunner()


def test_intact_backup_verifies_and_a_missing_object_is_named(sandbox, sandbox_plan_path):
    bucket = sandbox.buckets[0]
    ok = runner.invoke(app, ["s3-verify", "--plan", str(sandbox_plan_path)])
    assert ok.exit_code == 0 and ": verified, 200 objects" in ok.stdout, ok.output

    s3 = aws_client(sandbox, "s3")
    name, prefix = split_uri(resolve_backup(s3, bucket.backup))
    victim = s3.list_objects_v2(Bucket=name, Prefix=prefix, MaxKeys=1)["Contents"][0]["Key"]
    s3.delete_object(Bucket=name, Key=victim)
    try:
        broken = runner.invoke(app, ["s3-verify", "--plan", str(sandbox_plan_path)])
        assert broken.exit_code == 1
        assert "does not match its manifest" in broken.stdout and "1 missing" in broken.stdout
    finally:
        back_up_prefix(s3, bucket.live, bucket.backup, utcnow())  # a fresh, complete backup for later tests
