"""Benchmark: drplan's fingerprint diff (checks/fingerprint.py) against reladiff (the maintained data-diff) and
against pulling every row into Python, on two 1M-row copies of a 4-column table with 0 and 100 changed rows.

The floor is what any exact comparison must at least do: read every row as text once on both sides,
`SELECT sum(length(t::text)) FROM t t` on both databases at once. PostgreSQL 18 runs locally (one cluster, one
database per copy, all cached in shared_buffers); reladiff runs in its own virtualenv (benchmarks/.venv-peers,
made here on first use) as a fresh process that times only its connect + diff. Needs root (initdb runs as the
OS user drplan-pg).

    .venv/bin/python benchmarks/fingerprint_diff.py [--rows 1000000] [--rounds 3] [--out PATH]

Tools alternate within each round, the order rotating; every run's found keys are checked against the
changes made. Reported: median seconds per tool, drplan / floor, and peer / drplan.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

from pydantic import SecretStr

from checks import fingerprint_diff
from drplan.clients import DbCredentials, PgTarget
from sandbox.launchers import throwaway_postgres

ROOT = Path(__file__).resolve().parents[1]

PEERS = ROOT / "benchmarks" / ".venv-peers"
RELADIFF = "reladiff[postgresql]==0.6.0"
COLUMNS = ("name", "amount", "updated_at")
SCHEMA = "CREATE TABLE t (id bigint PRIMARY KEY, name text NOT NULL, amount numeric(12,2), updated_at timestamptz)"
LOAD = ("INSERT INTO t SELECT i, 'customer ' || i, (i * 7919 %% 100000) / 100.0, "
        "timestamptz '2024-01-01' + i * interval '1 second' FROM generate_series(1, %s::bigint) i")  # fmt: skip
FLOOR = "SELECT sum(length(t::text)) FROM t t"
GOALS = {"floor_ratio_max": 1.2, "peer_speedup_min": 2.0}

# Runs in the peers' venv: parameters (password included) arrive on stdin, never in argv.
RELADIFF_RUN = """
import json, sys, time
from reladiff import connect_to_table, diff_tables
p = json.load(sys.stdin)
started = time.perf_counter()
a, b = (connect_to_table(url, "t", "id", thread_count=2) for url in (p["source"], p["restored"]))
rows = list(diff_tables(a, b, extra_columns=tuple(p["columns"]), threaded=True, max_threadpool_size=4))
seconds = time.perf_counter() - started
print(json.dumps({"seconds": seconds, "minus": [int(r[0]) for s, r in rows if s == "-"],
                  "plus": [int(r[0]) for s, r in rows if s == "+"]}))
"""

Found = dict[str, set[int]]


def peer_python() -> Path:
    python = PEERS / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(PEERS)], check=True)
        subprocess.run([str(PEERS / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", RELADIFF],
                       check=True)  # fmt: skip
    return python


def prepare(admin: PgTarget, rows: int, changes: int, seed: int = 7) -> Found:
    """Databases a (the source), b (identical copy) and c (copy with `changes` changed rows); returns c's changes
    as the diff must report them."""
    with admin.connect(autocommit=True) as conn:
        conn.execute("CREATE DATABASE a")
    with PgTarget("a", admin.host, admin.port, "a", admin.credentials).connect(autocommit=True) as conn:
        conn.execute(SCHEMA)
        conn.execute(LOAD, (rows,))
        conn.execute("VACUUM ANALYZE t")
    with admin.connect(autocommit=True) as conn:
        conn.execute("CREATE DATABASE b TEMPLATE a")
        conn.execute("CREATE DATABASE c TEMPLATE a")
    picked = random.Random(seed).sample(range(1, rows + 1), changes)
    deleted, updated = set(picked[: changes // 10]), set(picked[changes // 10:changes - changes // 10])
    inserted = set(range(rows + 1, rows + 1 + changes - len(deleted) - len(updated)))
    with PgTarget("c", admin.host, admin.port, "c", admin.credentials).connect(autocommit=True) as conn:
        conn.execute("UPDATE t SET name = name || ' (changed)' WHERE id = ANY(%s)", (sorted(updated),))
        conn.execute("DELETE FROM t WHERE id = ANY(%s)", (sorted(deleted),))
        conn.execute("INSERT INTO t SELECT i, 'new ' || i, 1, now() FROM unnest(%s::bigint[]) i", (sorted(inserted),))
        conn.execute("VACUUM ANALYZE t")
    return {"missing": deleted, "extra": inserted, "changed": updated}


def both(fn: Callable[[PgTarget], object], source: PgTarget, restored: PgTarget) -> tuple:
    with ThreadPoolExecutor(2) as pool:
        return tuple(pool.map(fn, (source, restored)))


def run_floor(source: PgTarget, restored: PgTarget) -> tuple[float, Found | None]:
    def read(target: PgTarget) -> None:
        with target.connect() as conn:
            conn.execute(FLOOR).fetchone()

    started = time.perf_counter()
    both(read, source, restored)
    return time.perf_counter() - started, None


def run_drplan(source: PgTarget, restored: PgTarget) -> tuple[float, Found]:
    started = time.perf_counter()
    report = fingerprint_diff(source, restored, "t", max_keys=10_000)
    seconds = time.perf_counter() - started
    found: Found = {"missing": set(), "extra": set(), "changed": set()}
    for d in report.keys:
        found[d.kind].add(d.key)
    return seconds, found


def run_python(source: PgTarget, restored: PgTarget) -> tuple[float, Found]:
    def fetch(target: PgTarget) -> dict:
        with target.connect() as conn:
            return {row[0]: row[1:] for row in conn.execute("SELECT id, name, amount, updated_at FROM t")}

    started = time.perf_counter()
    a, b = both(fetch, source, restored)
    found = {"missing": a.keys() - b.keys(), "extra": b.keys() - a.keys(),
             "changed": {k for k in a.keys() & b.keys() if a[k] != b[k]}}  # fmt: skip
    return time.perf_counter() - started, found


def url(target: PgTarget) -> str:  # the benchmark's throwaway password is hex: nothing to quote
    return (f"postgresql://{target.credentials.username}:{target.credentials.password.get_secret_value()}"
            f"@{target.host}:{target.port}/{target.dbname}")  # fmt: skip


def run_reladiff(source: PgTarget, restored: PgTarget) -> tuple[float, Found]:
    params = {"source": url(source), "restored": url(restored), "columns": COLUMNS}
    done = subprocess.run([str(peer_python()), "-c", RELADIFF_RUN], input=json.dumps(params), text=True,
                          capture_output=True, check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})  # fmt: skip
    out = json.loads(done.stdout.strip().splitlines()[-1])
    minus, plus = set(out["minus"]), set(out["plus"])
    return out["seconds"], {"missing": minus - plus, "extra": plus - minus, "changed": minus & plus}


TOOLS = {"floor": run_floor, "drplan": run_drplan, "reladiff": run_reladiff, "python": run_python}


def server_cpu(postmaster: int) -> float:
    """CPU seconds the cluster used so far: the postmaster, its reaped children and the live ones (from /proc)."""
    ticks = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # fields from the 3rd (state) on
        except OSError:
            continue  # gone meanwhile
        if stat.parent.name == str(postmaster) or fields[1] == str(postmaster):
            ticks += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def postmaster_of(admin: PgTarget) -> int:
    with admin.connect() as conn:
        backend = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        return int(Path(f"/proc/{backend}/stat").read_text().rsplit(")", 1)[1].split()[1])


def measure(tool: str, source: PgTarget, copy: PgTarget, postmaster: int) -> tuple[float, float, Found | None]:
    """Wall seconds, server CPU seconds and the keys found by one run of `tool`."""
    before = server_cpu(postmaster)
    wall, found = TOOLS[tool](source, copy)
    time.sleep(0.3)  # let the postmaster reap the run's backends, so their CPU time is counted
    return wall, server_cpu(postmaster) - before, found


def summary(wall: dict[str, list[float]], cpu: dict[str, list[float]], correct: dict[str, bool]) -> dict:
    med = {t: statistics.median(v) for t, v in wall.items()}
    best = {t: min(v) for t, v in wall.items()}
    med_cpu = {t: statistics.median(v) for t, v in cpu.items()}
    result = {
        "wall_s": wall, "server_cpu_s": cpu,
        "median_wall_s": {t: round(v, 3) for t, v in med.items()},
        "min_wall_s": {t: round(v, 3) for t, v in best.items()},
        "median_server_cpu_s": {t: round(v, 2) for t, v in med_cpu.items()},
        "drplan_over_floor": {"median_wall": round(med["drplan"] / med["floor"], 2),
                              "min_wall": round(best["drplan"] / best["floor"], 2),
                              "median_server_cpu": round(med_cpu["drplan"] / med_cpu["floor"], 2)},
        "reladiff_over_drplan": round(med["reladiff"] / med["drplan"], 2),
        "python_over_drplan": round(med["python"] / med["drplan"], 2),
        "every_change_found": correct,
    }  # fmt: skip
    result["goals_met"] = {
        "drplan <= 1.2x floor (median wall)": result["drplan_over_floor"]["median_wall"] <= GOALS["floor_ratio_max"],
        ">= 2x faster than reladiff": result["reladiff_over_drplan"] >= GOALS["peer_speedup_min"],
        ">= 2x faster than python": result["python_over_drplan"] >= GOALS["peer_speedup_min"],
    }
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--changes", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "fingerprint_diff.json")
    args = parser.parse_args()
    peer_python()
    password = secrets.token_hex(16)
    load_before = os.getloadavg()
    with throwaway_postgres(password, shared_buffers="1GB") as port:
        admin = PgTarget("admin", "127.0.0.1", port, "postgres", DbCredentials("postgres", SecretStr(password)))
        expected = prepare(admin, args.rows, args.changes)
        a, b, c = (PgTarget(n, admin.host, port, n, admin.credentials) for n in "abc")
        scenarios = {"identical": (b, {"missing": set(), "extra": set(), "changed": set()}),
                     f"{args.changes} changed": (c, expected)}  # fmt: skip
        for copy, _ in scenarios.values():  # warm the buffers
            run_floor(a, copy)
        with admin.connect() as conn:
            server = conn.execute("SHOW server_version").fetchone()[0]
        postmaster = postmaster_of(admin)
        wall = {s: {t: [] for t in TOOLS} for s in scenarios}
        cpu = {s: {t: [] for t in TOOLS} for s in scenarios}
        correct = {s: {t: True for t in TOOLS if t != "floor"} for s in scenarios}
        names = list(TOOLS)
        for round_no in range(args.rounds):
            order = names[round_no % len(names):] + names[:round_no % len(names)]
            for scenario, (copy, want) in scenarios.items():
                for tool in order:
                    seconds, cpu_seconds, found = measure(tool, a, copy, postmaster)
                    wall[scenario][tool].append(round(seconds, 4))
                    cpu[scenario][tool].append(round(cpu_seconds, 2))
                    verdict = "" if found is None else " ok" if found == want else " WRONG"
                    if found is not None:
                        correct[scenario][tool] &= found == want
                    print(f"round {round_no + 1} {scenario:>12} {tool:>8} {seconds:7.3f}s wall "
                          f"{cpu_seconds:6.2f}s server CPU{verdict}", flush=True)
    results = {s: summary(wall[s], cpu[s], correct[s]) for s in scenarios}
    document = {
        "benchmark": "fingerprint_diff",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "postgresql": server, "load_average_before": load_before,
                    "load_average_after": os.getloadavg()},  # fmt: skip
        "setup": {"rows": args.rows, "columns": 4, "changes": {k: len(v) for k, v in expected.items()},
                  "rounds": args.rounds, "peer": RELADIFF, "floor_query": FLOOR,
                  "reladiff_settings": "hashdiff, thread_count=2 per database, max_threadpool_size=4",
                  "python_baseline": "fetch every row of both sides (two threads) into dicts, compare"},  # fmt: skip
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    for scenario, r in results.items():
        print(f"{scenario}: median wall {r['median_wall_s']}, server CPU {r['median_server_cpu_s']}; "
              f"drplan/floor {r['drplan_over_floor']}, reladiff/drplan {r['reladiff_over_drplan']}, "
              f"python/drplan {r['python_over_drplan']}; correct {r['every_change_found']}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
