"""`drplan serve`: the Prefect platform on this machine for a sandbox plan. Idempotent; `down()` stops it.

`prefect server start` on 127.0.0.1 (UI and API, basic auth on), the `drplan` process work pool and a worker on
it, every deployment of prefect.yaml against the plan (`prefect deploy --all` with DRPLAN_PLAN), a local receiver
standing in for the plan's notification channel, and the automations (deployments/automations.py).

State lives in `<sandbox state dir>/prefect/`: `home/` (PREFECT_HOME, the SQLite database), `auth` (the
`admin:<random>` auth string, mode 0600, handed to the processes in their environment, never on a command line),
`ports.json`, `notifications.jsonl` (what the stand-in channel received), `pids/` and `logs/`.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from prefect.blocks.notifications import CustomWebhookNotificationBlock
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.objects import WorkPoolStatus
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings
from rich.console import Console

from cli.prefect_api import SERVER_LEASE_SETTINGS
from deployments import automations
from drplan import processes
from drplan.errors import DrplanError
from drplan.plan import Plan, load_plan
from sandbox.stack import Component

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PREFECT = str(BIN / "prefect")
POOL = "drplan"
DEFAULT_PORT = 4200
SERVER, WORKER, RECEIVER = "prefect-server", "prefect-worker", "notification-receiver"
STAND_IN = "drplan-local-receiver"
"""The webhook `name` field marking a notification block as the local stand-in, ours to repoint."""


@dataclass(frozen=True)
class Platform:
    directory: Path

    @property
    def home(self) -> Path:
        return self.directory / "home"

    @property
    def auth_file(self) -> Path:
        return self.directory / "auth"

    @property
    def notifications(self) -> Path:
        return self.directory / "notifications.jsonl"

    @property
    def ports(self) -> dict[str, int]:
        path = self.directory / "ports.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def record_port(self, name: str, port: int) -> int:
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / "ports.json").write_text(json.dumps({**self.ports, name: port}))
        return port

    def auth(self) -> str:
        """The API auth string `admin:<random>`, generated on first use into a file only the owner can read."""
        if not self.auth_file.is_file():
            fd = os.open(self.auth_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(f"admin:{secrets.token_urlsafe(24)}\n")
        return self.auth_file.read_text().strip()

    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.ports[SERVER]}/api"

    def env(self) -> dict[str, str]:
        """Environment of the server, the worker and `prefect deploy`: this server, its credentials, and the
        virtualenv first on PATH (prefect.yaml's build step runs `drplan`)."""
        return {
            **os.environ,
            "PREFECT_HOME": str(self.home),
            "PREFECT_API_URL": self.api_url(),
            "PREFECT_API_AUTH_STRING": self.auth(),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        }

    @contextmanager
    def client_settings(self) -> Iterator[None]:
        """Point this process's Prefect client at the server (restored on exit)."""
        with temporary_settings(updates={PREFECT_API_URL: self.api_url(), PREFECT_API_AUTH_STRING: self.auth()}):
            yield


def platform_of(plan: Plan) -> Platform:
    return Platform(plan.state_dir() / "prefect")


def up(plan_ref: str, console: Console, port: int | None = None) -> Platform:
    """Start (or complete) the platform for plan `plan_ref` and print where everything is."""
    plan = load_plan(plan_ref)
    platform = platform_of(plan)
    start_server(platform, port, console)
    with platform.client_settings():
        ensure_pool()
        channel = plan.notifications.slack_webhook_block
        if channel:
            ensure_channel(platform, channel, console)
        deploy(platform, plan_ref, console)
        processes.start(platform.directory, WORKER, [PREFECT, "worker", "start", "--pool", POOL, "--type", "process"],
                        env=platform.env(), cwd=ROOT)
        _wait(f"a worker on pool {POOL}", _pool_ready, 60)
        for line in automations.ensure(channel) if channel else ["no notifications.slack_webhook_block: "
                                                                  "no automations"]:
            console.print(line, highlight=False)
        for line in automations.ensure_alarm_runbooks(plan):
            console.print(line, highlight=False)
    api = platform.api_url()
    console.print(f"Prefect UI  {api.removesuffix('/api')}  (log in with the auth string in {platform.auth_file})\n"
                  f"API         {api}  (basic auth; for the prefect CLI and `drplan trigger`:\n"
                  f"            export PREFECT_API_URL={api} PREFECT_API_AUTH_STRING=\"$(cat {platform.auth_file})\")\n"
                  f"stop with   drplan serve --stop", highlight=False, soft_wrap=True)
    return platform


def down(plan: Plan) -> list[str]:
    """Stop the worker, the receiver and the server (their state stays for the next `up`); one line each."""
    directory = platform_of(plan).directory
    return [f"stopped {name}" for name in (WORKER, RECEIVER, SERVER) if processes.stop(directory, name)]


def status(plan: Plan) -> list[Component]:
    """The platform's processes, if `up` started them and no `down` stopped them since: running, and the server
    answering."""
    platform = platform_of(plan)
    rows = []
    for name in (SERVER, WORKER, RECEIVER):
        if processes.get(platform.directory, name) is None:
            continue
        proc = processes.running(platform.directory, name)
        port = platform.ports.get(name)
        address = f"127.0.0.1:{port}" if port else "-"
        if proc is None:
            rows.append(Component(name, address, None, False, "not running (drplan serve --stop, then serve again)"))
        elif name == SERVER and not _healthy(platform.api_url()):
            rows.append(Component(name, address, proc.pid, False, "running, API not answering"))
        else:
            rows.append(Component(name, address, proc.pid, True, "running"))
    return rows


def start_server(platform: Platform, port: int | None, console: Console) -> None:
    running = processes.running(platform.directory, SERVER)
    if running is None:
        default = platform.ports.get(SERVER) or (DEFAULT_PORT if _port_free(DEFAULT_PORT) else _free_port())
        if (port or default) != platform.ports.get(SERVER):  # a worker outliving its server points at the old port
            processes.stop(platform.directory, WORKER)  # else it (and the flow runs it started) goes on, reconnecting
        platform.record_port(SERVER, port or default)
        env = {**platform.env(), **SERVER_LEASE_SETTINGS, "PREFECT_SERVER_API_AUTH_STRING": platform.auth()}
        processes.start(platform.directory, SERVER, [PREFECT, "server", "start", "--host", "127.0.0.1", "--port",
                                                     str(platform.ports[SERVER])], env=env, cwd=ROOT)
        console.print(f"starting the Prefect server on {platform.api_url()} (log {platform.directory}/logs)",
                      highlight=False)
    elif port and port != platform.ports[SERVER]:
        console.print(f"the Prefect server already runs on port {platform.ports[SERVER]} (pid {running.pid})")
    _wait("the Prefect server", lambda: _healthy(platform.api_url()) or _exited(platform, SERVER), 180)
    if not processes.running(platform.directory, SERVER):
        raise DrplanError(f"the Prefect server exited; see {platform.directory}/logs/{SERVER}.log")


def ensure_pool() -> None:
    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(POOL)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=POOL, type="process"))


def ensure_channel(platform: Platform, block_name: str, console: Console) -> None:
    """Unless block `block_name` is a real channel, run the local receiver and point the block at it."""
    existing = automations.find_notification_block(block_name)
    if existing is not None and existing.data.get("name") != STAND_IN:
        console.print(f"notifications go to the existing block {block_name!r}", highlight=False)
        return
    if not processes.running(platform.directory, RECEIVER):
        port = platform.record_port(RECEIVER, _free_port())
        processes.start(platform.directory, RECEIVER, [sys.executable, "-m", "deployments.receiver", str(port),
                                                       str(platform.notifications)], cwd=ROOT)
        _wait("the notification receiver", lambda: not _port_free(port), 15)
    url = f"http://127.0.0.1:{platform.ports[RECEIVER]}/"
    CustomWebhookNotificationBlock(name=STAND_IN, url=url, json_data={"text": "{{subject}}\n{{body}}"}).save(
        block_name, overwrite=True)  # Slack-shaped JSON
    console.print(f"notifications ({block_name}) are appended to {platform.notifications}", highlight=False)


def deploy(platform: Platform, plan_ref: str, console: Console) -> None:
    """`prefect deploy --all` from prefect.yaml with every deployment's plan parameter set to `plan_ref`."""
    plan_path = Path(plan_ref)
    env = {**platform.env(), "DRPLAN_PLAN": str(plan_path.resolve()) if plan_path.is_file() else plan_ref}
    log = platform.directory / "logs" / "deploy.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        result = subprocess.run([PREFECT, "--no-prompt", "deploy", "--all"], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=600)
    if result.returncode:
        raise DrplanError(f"prefect deploy --all failed (exit {result.returncode}); see {log}")
    with get_client(sync_client=True) as client:
        for d in client.read_deployments():
            schedules = ", ".join(s.schedule.cron for s in d.schedules if getattr(s.schedule, "cron", None))
            plan = d.parameters.get("plan")
            console.print(f"deployment {d.name}: {schedules or 'on demand'}" + (f", plan {plan}" if plan else ""),
                          highlight=False, soft_wrap=True)


def _pool_ready() -> bool:
    with get_client(sync_client=True) as client:
        return client.read_work_pool(POOL).status == WorkPoolStatus.READY


def _healthy(api_url: str) -> bool:
    try:
        return httpx.get(f"{api_url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _exited(platform: Platform, name: str) -> bool:
    return processes.running(platform.directory, name) is None


def _wait(what: str, ready: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise DrplanError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.3)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
