"""Drill overhead: the restore-drill flow against the raw runbook commands on the same backup and target time.

Raw = what an engineer types: barman-cloud-restore, recovery settings, pg_ctl start, poll until promoted.
Drill = flows/restore_drill.py end to end (window, sweep, restore, integrity suites, fingerprints, RPO, cleanup).
Goal (issue "Restore drill"): drill <= 1.1 x raw + 5 s. Rounds alternate so both see the same machine load.

Needs the sandbox: `drplan sandbox up` first. Run: .venv/bin/python benchmarks/restore_drill.py [--rounds 3]
Writes benchmarks/results/restore_drill.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import psycopg

from drplan import processes
from drplan.clients import child_aws_env, db_credentials
from drplan.pgserver import PG_BIN, VENV_BIN, free_port
from drplan.plan import load_plan
from drplan.timeutil import utcnow
from flows.shared.requests import choose_target_time
from tasks.targets import PostgresArchive

ROOT = Path(__file__).resolve().parent.parent
RESULT = ROOT / "benchmarks" / "results" / "restore_drill.json"


def raw_restore(plan, db, backup_id: str, target_time, workdir: Path, port: int) -> float:
    """The runbook's commands, run as the PostgreSQL OS user; returns seconds until the copy is promoted."""
    user = plan.drill.os_user
    data = workdir / "raw"
    cloud = ["--cloud-provider", "aws-s3", "--endpoint-url", plan.aws.endpoint_url]
    env = {"PATH": f"{PG_BIN}:{VENV_BIN}:/usr/sbin:/usr/bin:/sbin:/bin", **child_aws_env(plan)}

    def run(*argv: str | Path, check: bool = True) -> None:
        subprocess.run(["runuser", "-u", user, "--", *map(str, argv)], env=env, check=check, capture_output=True)

    started = time.monotonic()
    run(VENV_BIN / "barman-cloud-restore", *cloud, db.backup.destination, db.backup.server_name, backup_id, data)
    restore_command = shlex.join([str(VENV_BIN / "barman-cloud-wal-restore"), *cloud, db.backup.destination,
                                  db.backup.server_name]) + " %f %p"
    settings = {"port": str(port), "archive_mode": "off", "restore_command": restore_command,
                "recovery_target_time": target_time.isoformat(), "recovery_target_action": "promote"}
    run("touch", data / "recovery.signal")
    with open(data / "postgresql.auto.conf", "a") as conf:  # read after postgresql.conf: these settings win
        conf.writelines(f"{k} = '{v.replace(chr(39), chr(39) * 2)}'\n" for k, v in settings.items())
    run(PG_BIN / "pg_ctl", "-D", data, "-l", workdir / "raw.log", "-w", "-t", "600", "start")
    processes.record(workdir, "raw", int((data / "postmaster.pid").read_text().split()[0]), workdir / "raw.log")
    credentials = db_credentials(plan, db)
    try:
        while True:
            with psycopg.connect(host="127.0.0.1", port=port, dbname=db.dbname, user=credentials.username,
                                 password=credentials.password.get_secret_value()) as conn:
                if not conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]:
                    break
            time.sleep(0.1)
        return time.monotonic() - started
    finally:  # stopped also when the copy never came up; by its tracked PID if pg_ctl cannot
        run(PG_BIN / "pg_ctl", "-D", data, "-m", "immediate", "stop", check=False)
        processes.stop(workdir, "raw")
        shutil.rmtree(data)


def drill(plan_path: str, database: str, target_time) -> tuple[float, dict]:
    from flows.restore_drill import restore_drill
    from flows.shared.report import run_report

    started = time.monotonic()
    (report,) = run_report(restore_drill, list, plan=plan_path, database=database, target_time=target_time.isoformat())
    elapsed = time.monotonic() - started
    return elapsed, {"status": report.status.value, "restore_s": report.restore_duration.total_seconds(),
                     "checks": len(report.checks)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", default=str(ROOT / "plans" / "sandbox.yaml"))
    parser.add_argument("--database", default="devonn-postgres")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    plan = load_plan(args.plan)
    db = plan.database(args.database)
    target = PostgresArchive(plan, db)
    target_time = choose_target_time(target.window(), None, None, plan.drill.target_margin)
    backup = target.local().backup_for(target_time)
    workdir = plan.resolve_path(plan.drill.work_dir) / "benchmark"
    workdir.mkdir(parents=True, exist_ok=True)
    shutil.chown(workdir, plan.drill.os_user)
    drill(args.plan, args.database, target_time)  # warm-up: Prefect's server start and imports are not measured

    raw, flow, details = [], [], []
    for _ in range(args.rounds):
        raw.append(raw_restore(plan, db, backup.id, target_time, workdir, free_port()))
        seconds, detail = drill(args.plan, args.database, target_time)
        flow.append(seconds)
        details.append(detail)
        assert detail["status"] == "passed", detail
    raw_median, flow_median = statistics.median(raw), statistics.median(flow)
    budget = 1.1 * raw_median + 5
    result = {
        "when": utcnow().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "backup": backup.id, "target_time": target_time.isoformat(), "rounds": args.rounds,
        "raw_seconds": [round(s, 2) for s in raw], "drill_seconds": [round(s, 2) for s in flow],
        "drill_details": details, "raw_median": round(raw_median, 2), "drill_median": round(flow_median, 2),
        "ratio": round(flow_median / raw_median, 2), "overhead_seconds": round(flow_median - raw_median, 2),
        "goal": "drill <= 1.1 x raw + 5 s", "budget_seconds": round(budget, 2), "goal_met": flow_median <= budget,
    }
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
