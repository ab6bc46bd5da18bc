"""Restore targets: copy names, the target time and served mark each copy keeps, the refusal to reuse a copy made for
another time or that served, and drills sweeping only their own RDS copies. PostgreSQL copies from markers written
here (no server), RDS instances on a real moto_server."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest
from pydantic import SecretStr

from drplan.clients import DbCredentials
from drplan.errors import DrplanError
from drplan.plan import DrillSettings, load_plan
from drplan.s3manifest import STAMP
from tasks.targets import RDS_IDENTIFIER, Copy, PostgresArchive, RdsInstance, Scratch, scratch_name
from tests.rds_moto import create_copy, create_instance, identifiers, on_moto

T = datetime(2026, 12, 2, 12, 55, 12, 123456, tzinfo=UTC)
CREDENTIALS = DbCredentials("postgres", SecretStr("unused"))


def sandbox_plan(tmp_path):
    return load_plan("plans/sandbox.yaml").model_copy(update={"drill": DrillSettings(work_dir=str(tmp_path))})


def test_copy_names_are_unique_below_one_second_and_valid_rds_identifiers(tmp_path):
    plan = sandbox_plan(tmp_path)
    postgres, rds = plan.database("devonn-postgres"), plan.database("devonn-rds")

    assert scratch_name(postgres, T, "recovery") == "devonn-postgres-recovery-20261202t125512123z"
    later = T + timedelta(milliseconds=1)
    assert scratch_name(rds, T) != scratch_name(rds, later)
    assert scratch_name(postgres, T.astimezone(timezone(timedelta(hours=2)))) == scratch_name(postgres, T)
    for name in (scratch_name(rds, later), scratch_name(rds, T, "recovery")):
        assert RDS_IDENTIFIER.fullmatch(name) and len(name) <= 63
        assert name.rsplit("-", 2)[0] == "devonn-rds"  # the stamp has no dash
    assert STAMP == "%Y%m%dT%H%M%SZ"  # bucket backups keep their stamp


@pytest.mark.parametrize("name", ["a" * 35, "9devonn", "devonn--rds", "devonn_rds"])
def test_an_rds_database_whose_copies_could_not_be_named_is_refused_in_one_line(tmp_path, name):
    db = sandbox_plan(tmp_path).database("devonn-rds").model_copy(update={"name": name})
    with pytest.raises(DrplanError, match=r"is no valid RDS instance identifier; name database .* at most 34 charac"):
        scratch_name(db, T, "recovery")
    assert RDS_IDENTIFIER.fullmatch(scratch_name(db.model_copy(update={"name": "a" * 34}), T, "recovery"))


def write_marker(plan, name: str, **fields) -> None:
    scratch = Scratch(name=name, host="127.0.0.1", port=40001, created_at=T, target_time=T, backup_id="b1") \
        .model_copy(update=fields)
    markers = PostgresArchive(plan, plan.database("devonn-postgres")).markers
    markers.mkdir(parents=True, exist_ok=True)
    (markers / f"{name}.json").write_text(scratch.model_dump_json())


def test_a_rerun_reuses_no_postgres_copy_made_for_another_time_or_that_served(tmp_path):
    plan = sandbox_plan(tmp_path)
    target = PostgresArchive(plan, plan.database("devonn-postgres"))
    name = "devonn-postgres-recovery-20261202t125512123z"
    write_marker(plan, name)

    with pytest.raises(DrplanError) as other_time:
        target.restore(name, T + timedelta(microseconds=1), CREDENTIALS)
    assert str(other_time.value) == (
        f"copy {name} was restored to 2026-12-02T12:55:12.123456+00:00, not 2026-12-02T12:55:12.123457+00:00; "
        f"remove it with `drplan copies remove {name}` or choose another target time")

    target.mark_served(name)
    served = target.copies()[0].served_at
    assert served is not None
    target.mark_served(name)  # a second cutover keeps the first time
    assert target.copies()[0].served_at == served
    with pytest.raises(DrplanError, match=rf"^copy {name} has served an application since .*, so it is no longer the "
                                          rf"database as of 2026-12-02T12:55:12.123456\+00:00; remove it with "
                                          rf"`drplan copies remove {name}` or choose another target time$"):
        target.restore(name, T, CREDENTIALS)


def test_a_marker_without_a_target_time_is_listed_but_never_reused(tmp_path):
    plan = sandbox_plan(tmp_path)
    target = PostgresArchive(plan, plan.database("devonn-postgres"))
    name = "devonn-postgres-drill-20261126t120000z"  # restored before copies recorded their target time
    target.markers.mkdir(parents=True)
    (target.markers / f"{name}.json").write_text(
        json.dumps({"name": name, "host": "127.0.0.1", "port": 40001, "created_at": "2026-11-26T12:00:00Z"}))

    assert [(c.name, c.kind, c.target_time) for c in target.copies()] == [(name, "drill", None)]
    with pytest.raises(DrplanError, match=f"^copy {name} was restored to an unrecorded time, not "):
        target.restore(name, T, CREDENTIALS)


def test_the_same_time_never_served_is_reusable():
    Copy(name="db-recovery-x", target_time=T).check_reusable(T)


def test_rds_copies_keep_their_target_time_and_a_served_one_is_never_reused(tmp_path, moto_rds):
    plan = on_moto(sandbox_plan(tmp_path), moto_rds)
    target = RdsInstance(plan, plan.database("devonn-rds"))
    name = "devonn-rds-recovery-20261202t125512123z"
    create_instance(target.rds, target.db.primary)  # the source: a restore attempted would succeed
    endpoint = create_copy(target.rds, name, T)["Endpoint"]
    create_copy(target.rds, "devonn-rds-drill-20261202t125512123z", T)
    create_copy(target.rds, "other-drill-20261202t125512123z", T, database="other")
    before = identifiers(target.rds)
    target.poll_seconds = 0

    assert target.restore(name, T, CREDENTIALS).reused  # the same time, never served: found, not restored again
    target.mark_served(name)
    (served,) = [c for c in target.copies() if c.name == name]
    assert (served.target_time, served.host, served.port) == (T, endpoint["Address"], 5432)
    assert served.served_at is not None
    with pytest.raises(DrplanError, match=rf"^copy {name} has served an application since "):
        target.restore(name, T, CREDENTIALS)
    assert identifiers(target.rds) == before  # nothing restored: no new instance
    assert [c.name for c in target.leftovers()] == ["devonn-rds-drill-20261202t125512123z"]  # never a recovery copy


def test_rds_restore_request_tags_the_target_time(tmp_path, moto_rds):
    plan = on_moto(sandbox_plan(tmp_path), moto_rds)
    target = RdsInstance(plan, plan.database("devonn-rds"))
    create_instance(target.rds, target.db.primary, instance_class="db.t3.micro")
    tags = {t["Key"]: t["Value"] for t in target.restore_request("devonn-rds-drill-x", T)["Tags"]}
    assert datetime.fromisoformat(tags["drplan:target-time"]) == T
    assert tags["drplan:target-time"].endswith("+00:00")
