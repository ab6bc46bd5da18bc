"""Where runs keep their report files (`drill.report_dir`), and how RPO verification and readiness write theirs.
The files outlive the Prefect server: `drplan metrics` reads the newest of each kind from here."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from drplan.plan import Plan
from drplan.timeutil import utcnow

RPO_PREFIX = "rpo-verification-"
READINESS_PREFIX = "readiness-"
DRILL_PREFIX = "drill-"


def reports_dir(plan: Plan) -> Path:
    """The plan's report directory (created on first use)."""
    directory = plan.resolve_path(plan.drill.report_dir)
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def write_json(plan: Plan, prefix: str, report: BaseModel) -> Path:
    """`report` as `<report_dir>/<prefix><UTC stamp>.json`; returns the path."""
    path = reports_dir(plan) / f"{prefix}{utcnow():%Y%m%dT%H%M%S%fZ}.json"
    path.write_text(report.model_dump_json(indent=2))
    return path
