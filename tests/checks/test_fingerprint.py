"""Fingerprint diff against real PostgreSQL: a snapshot at T against a live copy changed after T."""

from __future__ import annotations

from datetime import timedelta

import pytest
from psycopg import sql

from checks import DiffReport, fingerprint_diff
from drplan.clients import PgTarget
from drplan.results import Status
from tests.checks.conftest import TARGET_TIME, Cluster

LATER = (TARGET_TIME + timedelta(hours=1)).isoformat()
AFTER_T = [  # what the live database did after T
    f"UPDATE orders SET status = 'refunded', updated_at = '{LATER}' WHERE id IN (10, 20)",
    "DELETE FROM orders WHERE id = 30",
    f"INSERT INTO orders VALUES (401, 1, 1.00, 'new', '{LATER}', '{LATER}'), "
    f"(402, 2, 2.00, 'new', '{LATER}', '{LATER}')",
]
CODES = "CREATE TABLE codes (code text PRIMARY KEY, v int, doc json, every interval); " \
        "INSERT INTO codes SELECT 'code-' || i, i, '{\"a\": 1}', '1 day' FROM generate_series(1, 500) i"  # fmt: skip


@pytest.fixture(scope="module")
def snapshot(pg_cluster: Cluster) -> PgTarget:
    """The copy restored to T."""
    target = pg_cluster.clone("fp_snapshot")
    pg_cluster.run(target, CODES)
    return target


@pytest.fixture(scope="module")
def live(pg_cluster: Cluster) -> PgTarget:
    target = pg_cluster.clone("fp_live")
    pg_cluster.run(target, *AFTER_T, CODES, "UPDATE codes SET v = -1 WHERE code IN ('code-1', 'code-77')",
                "UPDATE codes SET doc = '{\"a\": 2}' WHERE code = 'code-5'",  # json has no hash function: as text
                "UPDATE codes SET every = '24 hours' WHERE code = 'code-6'",  # equal to '1 day', but not the same
                "DELETE FROM codes WHERE code = 'code-300'", "INSERT INTO codes VALUES ('a', 0), ('code-2x', 0)")
    return target


def diffs(report: DiffReport) -> dict[str, set]:
    found: dict[str, set] = {"missing": set(), "extra": set(), "changed": set()}
    for d in report.keys:
        found[d.kind].add(d.key)
    return found


CHANGED_AFTER_T = {"missing": {401, 402}, "extra": {30}, "changed": {10, 20}}


def test_identical_copies_have_no_differences(pg_cluster: Cluster, snapshot: PgTarget) -> None:
    copy = pg_cluster.clone("fp_copy")
    report = fingerprint_diff(snapshot, copy, "orders")
    assert report.status is Status.passed and report.passed
    assert (report.rows_source, report.rows_restored, report.differing, report.keys) == (400, 400, 0, [])
    assert report.key == "id" and report.levels == 1 and report.ranges_hashed >= 1
    assert pg_cluster.sessions_end("fp_snapshot", "fp_copy"), "fingerprint_diff left connections open"


def test_finds_exactly_the_rows_changed_after_the_snapshot(live: PgTarget, snapshot: PgTarget) -> None:
    report = fingerprint_diff(live, snapshot, "orders")
    assert report.status is Status.failed
    assert diffs(report) == CHANGED_AFTER_T
    assert (report.missing, report.extra, report.changed, report.differing) == (2, 1, 2, 5)
    assert (report.rows_source, report.rows_restored, report.unresolved_rows) == (401, 400, 0)


def test_narrowing_over_several_levels_finds_the_same_keys(live: PgTarget, snapshot: PgTarget) -> None:
    report = fingerprint_diff(live, snapshot, "orders", first_level=2, leaf_rows=4, fanout=4)
    assert diffs(report) == CHANGED_AFTER_T
    assert report.levels >= 4
    assert report.ranges_hashed < 100, "only mismatching ranges are narrowed"


def test_text_keys_are_split_at_sampled_quantiles(live: PgTarget, snapshot: PgTarget) -> None:
    expected = {"missing": {"a", "code-2x"}, "extra": {"code-300"},
                "changed": {"code-1", "code-77", "code-5", "code-6"}}
    assert diffs(fingerprint_diff(live, snapshot, "codes")) == expected
    narrowed = fingerprint_diff(live, snapshot, "codes", first_level=4, leaf_rows=8, fanout=4)
    assert diffs(narrowed) == expected and narrowed.levels >= 3


def test_predicate_restricts_both_sides(live: PgTarget, snapshot: PgTarget) -> None:
    by_key = fingerprint_diff(live, snapshot, "orders", predicate=("id", "<", 25))
    assert diffs(by_key) == {"missing": set(), "extra": set(), "changed": {10, 20}}
    assert by_key.predicate == '"id" < 25' and (by_key.rows_source, by_key.rows_restored) == (24, 24)
    at_t = sql.SQL("{} <= {}").format(sql.Identifier("updated_at"), sql.Literal(TARGET_TIME))
    # the live side has no version as of T of rows changed after T: they show as extra in the snapshot
    assert diffs(fingerprint_diff(live, snapshot, "orders", predicate=at_t)) == {
        "missing": set(), "extra": {10, 20, 30}, "changed": set()}  # fmt: skip


def test_raw_sql_predicates_are_refused(live: PgTarget, snapshot: PgTarget) -> None:
    with pytest.raises(TypeError, match="raw SQL strings are not accepted"):
        fingerprint_diff(live, snapshot, "orders", predicate="id < 25")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        fingerprint_diff(live, snapshot, "orders", predicate=("id", "; DROP TABLE orders; --", 1))


def test_caps_and_budget(live: PgTarget, snapshot: PgTarget) -> None:
    capped = fingerprint_diff(live, snapshot, "orders", max_keys=2)
    assert len(capped.keys) == 2 and capped.differing == 5
    unresolved = fingerprint_diff(live, snapshot, "orders", leaf_rows=8, max_fetch_rows=10)
    assert unresolved.status is Status.failed and unresolved.unresolved_rows > 0
    assert unresolved.markdown_row()[3].startswith("≥ ")


def test_unusable_keys_and_tables_are_errors(pg_cluster: Cluster, live: PgTarget, snapshot: PgTarget) -> None:
    pg_cluster.run(live, "CREATE TABLE IF NOT EXISTS nokey (v int)",
                "CREATE TABLE IF NOT EXISTS onlylive (id int PRIMARY KEY)")
    no_key = fingerprint_diff(live, live, "nokey")
    assert no_key.status is Status.error and "no single-column primary key" in no_key.errors[0]
    not_unique = fingerprint_diff(live, snapshot, "orders", key="user_id")
    assert not_unique.status is Status.error and "not a column with a unique index" in not_unique.errors[0]
    missing = fingerprint_diff(live, snapshot, "onlylive")
    assert missing.status is Status.error and 'relation "public.onlylive" does not exist' in missing.errors[0]
    gone = fingerprint_diff(live, PgTarget("gone", "127.0.0.1", 1, "x", pg_cluster.credentials), "orders")
    assert gone.status is Status.error and "cannot connect" in gone.errors[0]


def test_markdown_row(live: PgTarget, snapshot: PgTarget) -> None:
    row = fingerprint_diff(live, snapshot, "orders").markdown_row()
    assert row[:4] == ["orders", "failed", "401 / 400", "5: 10 (changed), 20 (changed), 30 (extra), 401 (missing), "
                       "402 (missing)"]  # fmt: skip
    assert len(row) == len(DiffReport.MARKDOWN_HEADER)
