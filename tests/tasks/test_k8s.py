"""Application cutover through the Kubernetes Secret, against the real sandbox: the demo app really moves to
another database and back, writes are idempotent, failures are one clear line, and the database password
never reaches a result or a log. Everything changed is restored, the shared sandbox stays as it was."""

from __future__ import annotations

import base64
import dataclasses
import logging
from collections.abc import Iterator

import httpx
import pytest
from kubernetes import client as k8s
from pydantic import SecretStr

from drplan.clients import db_credentials, kube_client, pg_target
from drplan.errors import DrplanError
from flows.shared.cutover import database_url
from sandbox import demo_data, stack
from tasks.k8s import (
    PREVIOUS_SUFFIX,
    DeploymentNotAvailable,
    cut_over,
    find_database_secret,
    read_secret_value,
    redact_url,
    roll_back,
    wait_deployment_available,
    write_secret_value,
)
from tasks.manifests import render_manifests
from tests.helpers import logged_text, wait_for

CLUSTER = "devonn-eks-sandbox"
TARGET_DB = "cutover_target"
TARGET_ROWS = 321


@pytest.fixture
def api(sandbox):
    return kube_client(sandbox, sandbox.cluster(CLUSTER))


@pytest.fixture
def namespace(sandbox) -> str:
    return sandbox.cluster(CLUSTER).namespace


@pytest.fixture
def restored_app_secret(api, namespace) -> Iterator[dict[str, str]]:
    """The app's database Secret as it was; put back exactly (extra keys removed) after the test."""
    core = k8s.CoreV1Api(api)
    original = dict(core.read_namespaced_secret("devonn-api-db", namespace).data)
    yield original
    current = core.read_namespaced_secret("devonn-api-db", namespace).data
    if current != original:
        core.patch_namespaced_secret("devonn-api-db", namespace,
                                     {"data": {k: original.get(k) for k in current | original}})


@pytest.fixture
def target_url(sandbox) -> Iterator[SecretStr]:
    """URL of database cutover_target on the sandbox primary, with the demo schema and TARGET_ROWS users."""
    db = sandbox.database("devonn-postgres")
    credentials = db_credentials(sandbox, db)
    primary = pg_target(sandbox, db, "primary", credentials)
    admin = dataclasses.replace(primary, dbname="postgres")
    drop = f"DROP DATABASE IF EXISTS {TARGET_DB} WITH (FORCE)"
    with admin.connect(autocommit=True) as conn:
        conn.execute(drop)
        conn.execute(f"CREATE DATABASE {TARGET_DB}")
    try:
        with dataclasses.replace(primary, dbname=TARGET_DB).connect() as conn:
            demo_data.load(conn, TARGET_ROWS)
        yield database_url(credentials, primary.host, primary.port, TARGET_DB)
    finally:
        with admin.connect(autocommit=True) as conn:
            conn.execute(drop)


def _users(sandbox) -> int | None:
    response = httpx.get(sandbox.services[0].health.replace("/health", "/api/stats"), timeout=5)
    return response.json().get("users") if response.status_code == 200 else None


def test_cut_over_moves_the_app_and_roll_back_returns_it(sandbox, sandbox_dir, api, namespace, target_url,
                                                          restored_app_secret, caplog):
    cluster = sandbox.cluster(CLUSTER)
    password = stack.sandbox_secrets(sandbox_dir)["db_password"]
    apps = k8s.AppsV1Api(api)
    generation = apps.read_namespaced_deployment("devonn-api", namespace).metadata.generation
    with caplog.at_level(logging.DEBUG):
        moved = cut_over(sandbox, cluster, "devonn-api", target_url, timeout=60)
        wait_for(lambda: _users(sandbox) == TARGET_ROWS, 10, "the app to serve cutover_target")
        again = cut_over(sandbox, cluster, "devonn-api", target_url, timeout=60)
        back = roll_back(sandbox, cluster, "devonn-api", timeout=60)
        wait_for(lambda: _users(sandbox) == sandbox.sandbox.demo_rows, 10, "the app to serve devonn again")

    host_port = sandbox.database("devonn-postgres").endpoints["devonn-postgres-production"]
    assert moved.changed and moved.secret == f"{namespace}/devonn-api-db:DATABASE_URL"
    assert moved.url_redacted == f"postgresql://devonn_admin:***@{host_port}/{TARGET_DB}"
    assert moved.previous_url_redacted == f"postgresql://devonn_admin:***@{host_port}/devonn"
    assert not again.changed and again.previous_url_redacted == moved.url_redacted
    assert back.changed and back.url_redacted == moved.previous_url_redacted
    assert "already holds this value; nothing to change" in caplog.text
    deployment = apps.read_namespaced_deployment("devonn-api", namespace)
    assert deployment.metadata.generation == generation + 2  # one restart per change, none for the no-op
    assert "kubectl.kubernetes.io/restartedAt" in deployment.spec.template.metadata.annotations
    current = k8s.CoreV1Api(api).read_namespaced_secret("devonn-api-db", namespace).data
    # the kept previous value is gone after the roll back (also one an earlier recovery of the session had kept)
    assert current == {k: v for k, v in restored_app_secret.items() if not k.endswith(PREVIOUS_SUFFIX)}
    encoded = [*restored_app_secret.values(), base64.b64encode(target_url.get_secret_value().encode()).decode()]
    for text in (logged_text(caplog), *(r.model_dump_json() for r in (moved, again, back))):
        assert password not in text
        assert not any(value in text for value in encoded)  # nor the Secret's base64 form
    with pytest.raises(DrplanError, match=r"holds no DATABASE_URL\.drplan-previous; nothing to roll back"):
        roll_back(sandbox, cluster, "devonn-api", timeout=60)


def test_write_secret_value_is_idempotent_and_returns_the_previous_value(api, namespace, caplog):
    core = k8s.CoreV1Api(api)
    core.create_namespaced_secret(namespace, {"metadata": {"name": "drplan-test-scratch"}, "data": {}})
    try:
        with caplog.at_level(logging.DEBUG):
            assert write_secret_value(api, namespace, "drplan-test-scratch", "k", "canary-1") is None
            assert write_secret_value(api, namespace, "drplan-test-scratch", "k", "canary-2") == "canary-1"
        version = core.read_namespaced_secret("drplan-test-scratch", namespace).metadata.resource_version
        with caplog.at_level(logging.DEBUG):
            assert write_secret_value(api, namespace, "drplan-test-scratch", "k", "canary-2") == "canary-2"
        assert "key k already holds this value; nothing to change" in caplog.text
        assert core.read_namespaced_secret("drplan-test-scratch", namespace).metadata.resource_version == version
        assert write_secret_value(api, namespace, "drplan-test-scratch", "k", None) == "canary-2"
        assert read_secret_value(api, namespace, "drplan-test-scratch", "k") is None
        assert "canary-" not in logged_text(caplog)
    finally:
        core.delete_namespaced_secret("drplan-test-scratch", namespace)


def test_finds_the_secret_behind_database_url(api, namespace):
    assert find_database_secret(api, namespace, "devonn-api") == ("devonn-api-db", "DATABASE_URL")


def test_missing_deployment_or_reference_is_one_clear_line(sandbox, api, namespace):
    with pytest.raises(DrplanError) as missing:
        cut_over(sandbox, sandbox.cluster(CLUSTER), "no-such-app", SecretStr("postgresql://x@127.0.0.1/db"))
    assert str(missing.value) == (f"deployment no-such-app in namespace {namespace} does not exist; "
                                  "check clusters[].deployments")
    apps = k8s.AppsV1Api(api)
    apps.create_namespaced_deployment(namespace, {  # a deployment that takes no database URL from a Secret
        "metadata": {"name": "no-database-app"},
        "spec": {"selector": {"matchLabels": {"app": "x"}}, "template": {
            "metadata": {"labels": {"app": "x"}}, "spec": {"containers": [{"name": "x", "image": "x"}]}}}})
    try:
        with pytest.raises(DrplanError, match=r"^deployment no-database-app in namespace \S+ has no DATABASE_URL "
                                              r"from a Secret \(env valueFrom\.secretKeyRef\); [^\n]+$"):
            find_database_secret(api, namespace, "no-database-app")
    finally:
        apps.delete_namespaced_deployment("no-database-app", namespace)


def test_unavailable_deployment_times_out_with_its_status(sandbox, api, namespace):
    apps = k8s.AppsV1Api(api)
    manifest = next(o for o in render_manifests(sandbox, sandbox.cluster(CLUSTER))
                    if o["kind"] == "Deployment" and o["metadata"]["name"] == "devonn-worker")
    manifest = {**manifest, "metadata": {"name": "devonn-worker-broken"}}
    container = manifest["spec"]["template"]["spec"]["containers"][0]
    container["image"] = container["image"].rsplit(":", 1)[0] + ":broken"  # the sandbox's broken build
    apps.create_namespaced_deployment(namespace, manifest)
    try:
        wait_for(lambda: (apps.read_namespaced_deployment("devonn-worker-broken", namespace).status
                          .observed_generation), 30, "the kubelet to run the pods")
        with pytest.raises(DeploymentNotAvailable) as timed_out:
            wait_deployment_available(api, namespace, "devonn-worker-broken", timeout=1.5, interval=0.2)
        message = str(timed_out.value)
        assert message.startswith(f"deployment devonn-worker-broken in namespace {namespace} not available after "
                                  "1.5s: 0/2 replicas available (2 updated, 2 in all), observed generation 1 of 1")
        assert "Progressing=False (ProgressDeadlineExceeded: ReplicaSet has timed out progressing: image " in message
        assert ":broken is the sandbox's broken build" in message and "\n" not in message
    finally:
        apps.delete_namespaced_deployment("devonn-worker-broken", namespace)


@pytest.mark.parametrize(("url", "redacted"), [
    ("postgresql://admin:s%40cret@db.example:5432/app", "postgresql://admin:***@db.example:5432/app"),
    ("postgresql://admin@db.example/app", "postgresql://admin@db.example/app"),
    ("postgresql://admin:pw@[::1]:5433/app?sslmode=require&password=pw", "postgresql://admin:***@[::1]:5433/app?***"),
    ("postgresql://admin:pw@db.example:notaport/app", "***"),
])
def test_redact_url(url, redacted):
    assert redact_url(url) == redacted
