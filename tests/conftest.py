"""Session fixtures: one Prefect test server, and one real sandbox (moto with the RDS data plane, PostgreSQL
primary + 2 streaming replicas + barman-cloud archive, Kubernetes APIs, demo apps) on free loopback ports with short
objectives."""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

# Each test session has a Prefect home of its own (so has each pytest-xdist worker, with its own sandbox): the
# CLI's temporary servers keep their database, and the recovery locks in it, under PREFECT_HOME; in ~/.prefect two
# sessions would take each other's locks and leave paused runs for the next. Set before Prefect loads.
PREFECT_HOME = Path(tempfile.mkdtemp(prefix="drplan-test-prefect-home-"))
os.environ["PREFECT_HOME"] = str(PREFECT_HOME)

import pytest
import yaml
from prefect.testing.fixtures import asserting_and_emitting_events_worker  # noqa: F401 - fixture re-export
from rich.console import Console

from drplan.plan import PLANS_DIR, Plan, load_plan
from sandbox.launchers import world_traversable_dir
from tests.helpers import free_ports

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")  # tasks called directly by tests
# A test that runs a flow asks for the prefect_server fixture: no temporary server started behind its back.
os.environ["PREFECT_SERVER_EPHEMERAL_ENABLED"] = "false"

# Short objectives so that a stopped heartbeat or archiver breaches within seconds, not minutes.
TEST_RPO = {"database": "20s", "file_storage": "15m", "configuration": "1h"}

# Markers follow from the fixtures a test requests (directly or through other fixtures), never written by hand:
# `slow` = the session sandbox or a Prefect server (a minute or more to start); `sandbox` = any real server, those
# and the ones a test module starts for itself. `pytest -m "not sandbox"` is the fast suite.
SLOW_FIXTURES = frozenset({"sandbox", "prefect_server", "platform", "probe_wal", "ui_server"})  # probe_wal: WAL
SERVER_FIXTURES = SLOW_FIXTURES | {"moto_env", "moto_backup", "moto_s3", "moto_rds", "iam_moto", "pg_cluster",
                                   "postgres_port", "kube_api", "own_processes", "kubelet"}


def pytest_sessionfinish(session: pytest.Session) -> None:
    shutil.rmtree(PREFECT_HOME, ignore_errors=True)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        used = set(item.fixturenames)
        if used & SLOW_FIXTURES:
            item.add_marker(pytest.mark.slow)
        if used & SERVER_FIXTURES:
            item.add_marker(pytest.mark.sandbox)


def sandbox_plan_data(state_dir: Path) -> dict:
    data = yaml.safe_load((PLANS_DIR / "sandbox.yaml").read_text())
    moto, pg1, pg2, pg3, kube, kube_dr, *apps = free_ports(6 + 2 * len(data["services"]))
    data["name"] = "test-sandbox"
    data["objectives"]["rpo"] = dict(TEST_RPO)
    data["aws"]["endpoint_url"] = f"http://127.0.0.1:{moto}"
    for db in data["databases"]:
        if db.get("endpoints"):  # postgres; rds endpoints come from its data plane
            db["endpoints"] = dict(zip(db["endpoints"], (f"127.0.0.1:{p}" for p in (pg1, pg2, pg3)), strict=True))
    for cluster in data["clusters"]:  # the DR cluster (in aws.dr_region) gets its own kubeconfig
        dr = cluster.get("region") == data["aws"]["dr_region"]
        cluster["kubeconfig"] = str(state_dir / ("kubeconfig-dr" if dr else "kubeconfig"))
        if cluster.get("manifests"):  # relative to plans/, and this plan file lives in the state dir
            cluster["manifests"] = str((PLANS_DIR / cluster["manifests"]).resolve())
    for service, app, app_dr in zip(data["services"], apps[::2], apps[1::2], strict=True):
        service["health"] = f"http://127.0.0.1:{app}/health"
        service["dr"]["health"] = f"http://127.0.0.1:{app_dr}/health"
    data["drill"] = {"work_dir": str(state_dir / "drills"), "report_dir": str(state_dir / "reports"),
                     "target_margin": "10s", "sweep_after": "30m", "restore_timeout": "5m"}
    # No evidence chain: a fresh sandbox has no DR test recorded, which readiness would report; tests of the chain
    # give their plan variant one.
    del data["evidence"]
    data["sandbox"] = {
        "state_dir": str(state_dir), "kube_api": f"127.0.0.1:{kube}", "kube_api_dr": f"127.0.0.1:{kube_dr}",
        "demo_rows": 2000, "heartbeat_interval": "1s", "archive_timeout": "5s",
    }
    return data


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def moto_rds() -> Iterator[str]:
    """A moto_server of the session's own on a free loopback port (no RDS data plane: instances, tags and endpoints
    only); yields its URL. Tests empty it before setting up their instances (`tests.rds_moto.on_moto`)."""
    from sandbox.launchers import moto

    with moto() as url:
        yield url


@pytest.fixture(scope="session")
def sandbox_dir() -> Path:
    return world_traversable_dir("drplan-test-sandbox-")


@pytest.fixture(scope="session")
def sandbox_plan_path(sandbox_dir: Path) -> Path:
    path = sandbox_dir / "plan.yaml"
    path.write_text(yaml.safe_dump(sandbox_plan_data(sandbox_dir), sort_keys=False))
    return path


@pytest.fixture(scope="session")
def sandbox(sandbox_plan_path: Path) -> Iterator[Plan]:
    """The sandbox, up for the whole session; torn down (processes stopped, state deleted) at the end."""
    from drplan import processes
    from sandbox import stack

    plan = load_plan(sandbox_plan_path)
    try:
        stack.up(plan, Console(quiet=True))
        yield plan
    finally:
        stack.down(plan)
        directory = plan.state_dir()
        leftovers = [n for n in processes.tracked_names(directory) if processes.running(directory, n)]
        stack.down(plan, purge=True)
        assert not leftovers, f"sandbox processes left running: {leftovers}"


@pytest.fixture
def fresh_base_backup(sandbox: Plan) -> None:
    """A base backup of the sandbox's devonn-postgres taken now, the archive restorable past it by the drill margin.
    A restore replays every WAL segment since its base backup, one barman-cloud process each, and the test sandbox
    switches segments every 5 s: from the session's first backup that is minutes of replay, the more the later the
    test runs."""
    from sandbox import stack

    db = sandbox.database("devonn-postgres")
    pg = stack.sandbox_postgres(sandbox, db)
    pg.base_backup(db.primary)
    stack.wait_until_drillable(sandbox, db, pg)


@pytest.fixture
def fresh_bucket_backups(sandbox: Plan) -> None:
    """A backup of each bucket taken now: other tests of the session change the live buckets, so the session's first
    backups may trail them by more than the file objective by the time an RPO test runs."""
    from sandbox import aws_seed

    aws_seed.back_up_buckets(sandbox)


@pytest.fixture
def fresh_configuration_backup(sandbox: Plan) -> None:
    """A configuration backup taken now: other tests of the session change the cluster (a recovery keeps the
    previous DATABASE_URL in the app's Secret, for instance)."""
    from flows.config_backup import export_configuration

    export_configuration(sandbox)


@pytest.fixture
def fresh_backups(fresh_bucket_backups: None, fresh_configuration_backup: None) -> None:
    """Fresh bucket backups and a configuration backup taken now."""


@pytest.fixture
def own_processes(tmp_path: Path) -> Iterator[Path]:
    """The state dir for processes a test starts itself (`drplan.processes`); whatever still runs is stopped after."""
    from drplan import processes

    yield tmp_path
    for name in processes.tracked_names(tmp_path):
        processes.stop(tmp_path, name)


@pytest.fixture
def plan_variant(sandbox_plan_path: Path, tmp_path: Path) -> Callable[[Callable[[dict], None]], Path]:
    """Write a copy of the sandbox plan with one change applied (for fault injection via the plan)."""
    def make(change: Callable[[dict], None]) -> Path:
        data = copy.deepcopy(yaml.safe_load(sandbox_plan_path.read_text()))
        change(data)
        path = tmp_path / "variant.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path
    return make
