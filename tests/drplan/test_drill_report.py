"""The drill report's split of the measured RTO."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from drplan.drill_report import DrillReport, Measured

S = timedelta(seconds=1)


def report(**fields) -> DrillReport:
    return DrillReport(**{"plan": "p", "database": "db", "kind": "postgres", "tier": "critical",
                          "scratch": "db-drill-x", "started_at": datetime(2026, 12, 6, tzinfo=UTC), **fields})


def test_rto_splits_into_download_replay_checks_and_the_rest():
    done = report(restore_duration=40 * S, download=3 * S, replay=35 * S, checks_duration=5 * S,
                  rto=Measured(measured=47 * S, objective=3600 * S))
    assert done.rto_split == "download 3.0s, replay 35.0s, checks 5.0s, the rest 4.0s"
    assert "- RTO 47.0s (objective 1h00m, met): download 3.0s, replay 35.0s" in done.markdown()


def test_a_restore_without_download_and_replay_is_one_part():
    rds = report(kind="rds", restore_duration=600 * S, checks_duration=20 * S,
                 rto=Measured(measured=630 * S, objective=3600 * S))
    assert rds.rto_split == "restore 10m00s, checks 20.0s, the rest 10.0s"


def test_no_split_before_the_rto_is_measured():
    failed = report(restore_duration=40 * S, download=3 * S, replay=35 * S)
    assert failed.rto_split is None
    assert "- RTO -\n" in failed.markdown()
