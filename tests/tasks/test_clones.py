"""Finding what rehearsals left: RDS copies on a real moto_server (tagged as tasks/clones.py tags them, in the DR
region), PostgreSQL copies as data directories in the drill work directory, and the time in a copy's name."""

from __future__ import annotations

from datetime import UTC, datetime

from drplan.clients import aws_client
from drplan.plan import DrillSettings, load_plan
from tasks.clones import REHEARSAL_TAG, rehearsal_clones
from tasks.targets import PLAN_TAG, copy_stamp, stamp_time
from tests.rds_moto import create_instance, on_moto

T = datetime(2026, 12, 2, 12, 55, 12, 123000, tzinfo=UTC)


def test_a_stamp_names_the_time_it_was_made_to_the_millisecond():
    assert stamp_time(f"devonn-rds-rehearsal-{copy_stamp(T)}") == T
    assert stamp_time(f"drplan-rehearsal-{copy_stamp(T)}") == T
    assert stamp_time("devonn-rds-dr") is None and stamp_time("drplan-rehearsal-x") is None


def test_rds_copies_are_those_tagged_as_this_plans_rehearsal_copies(moto_rds):
    plan = on_moto(load_plan("plans/sandbox.yaml"), moto_rds)
    db = plan.database("devonn-rds")
    rds = aws_client(plan, "rds", plan.member_region(db, "dr_replica"))
    mine = f"devonn-rds-rehearsal-{copy_stamp(T)}"
    create_instance(rds, mine, {REHEARSAL_TAG: "true", PLAN_TAG: plan.name})
    create_instance(rds, f"devonn-rds-rehearsal-{copy_stamp(T.replace(hour=1))}",  # another plan's
                    {REHEARSAL_TAG: "true", PLAN_TAG: "other-plan"})
    create_instance(rds, f"devonn-rds-drill-{copy_stamp(T)}", {PLAN_TAG: plan.name})  # a drill's, not tagged
    create_instance(rds, f"devonn-rds-rehearsal-{copy_stamp(T.replace(hour=2))}", {PLAN_TAG: plan.name})  # untagged
    assert rehearsal_clones.fn(plan, db) == [mine]


def test_postgres_copies_are_the_rehearsal_data_directories_of_the_database(tmp_path):
    plan = load_plan("plans/sandbox.yaml").model_copy(update={"drill": DrillSettings(work_dir=str(tmp_path))})
    db = plan.database("devonn-postgres")
    assert rehearsal_clones.fn(plan, db) == []  # no work directory yet
    root = tmp_path / "postgres"
    mine = f"devonn-postgres-rehearsal-{copy_stamp(T)}"
    for name in (mine, f"devonn-postgres-drill-{copy_stamp(T)}", f"devonn-rds-rehearsal-{copy_stamp(T)}"):
        (root / name).mkdir(parents=True)
    (root / f"{mine}.log").write_text("")
    assert rehearsal_clones.fn(plan, db) == [mine]
