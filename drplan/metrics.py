"""Prometheus metrics of a plan, read from the newest report files its runs left in `drill.report_dir`.

No AWS or database call happens at scrape time: the runs measure, the exporter publishes what they measured. Data
age is computed at scrape time from the newest recoverable copy a verification found, so it keeps growing when
verification stops running, and each kind of report also exports its own timestamp: alert on both.

    drplan_data_age_seconds{resource,data_class,measure}            now - newest recoverable copy
    drplan_data_age_objective_seconds{resource,data_class,measure}  its RPO objective
    drplan_rpo_verification_timestamp_seconds                       when the newest verification finished
    drplan_drill_success{database}, drplan_drill_timestamp_seconds{database}
    drplan_rto_seconds{tier}, drplan_rto_objective_seconds{tier}    newest drill per database, worst per tier
    drplan_region_ready{region}, drplan_readiness_timestamp_seconds{region}
    drplan_runs_in_progress{flow}, drplan_prefect_up                from the Prefect API, when one is reachable
    drplan_report_unreadable{file}                                  a newest report that could not be read
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from pydantic import BaseModel

from drplan.drill_report import DrillReport
from drplan.plan import Plan
from drplan.report_files import DRILL_PREFIX, READINESS_PREFIX, RPO_PREFIX, reports_dir
from drplan.results import Status
from drplan.rpo import RpoReport
from drplan.timeutil import parse_utc, utcnow

M = TypeVar("M", bound=BaseModel)

RunsInProgress = Callable[[], dict[str, int] | None]
"""Flow name -> runs RUNNING, PENDING or PAUSED; None when no Prefect API answers."""


def _newest_first(directory: Path, prefix: str) -> list[Path]:
    return sorted(directory.glob(f"{prefix}*.json"), key=lambda p: p.stat().st_mtime, reverse=True)


class PlanCollector(Collector):
    """Collects the plan's metrics on every scrape (the report directory is read each time)."""

    def __init__(self, plan: Plan, runs_in_progress: RunsInProgress | None = None) -> None:
        self.plan = plan
        self.runs_in_progress = runs_in_progress
        self.unreadable = _unreadable()

    def describe(self) -> list[GaugeMetricFamily]:
        """Nothing up front: registering must not read the reports (they are read on each scrape)."""
        return []

    def _read(self, path: Path, model: type[M] | None = None) -> M | dict[str, Any] | None:
        """The report in `path` (validated as `model` when given); None, and counted unreadable, if it is not one."""
        try:
            text = path.read_text()
            return model.model_validate_json(text) if model else json.loads(text)
        except (OSError, ValueError):
            self.unreadable.add_metric([path.name], 1)
            return None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        self.unreadable = _unreadable()
        directory = reports_dir(self.plan)
        yield from self._data_age(directory, utcnow())
        yield from self._drills(directory)
        yield from self._readiness(directory)
        yield from self._runs()
        yield self.unreadable

    def _data_age(self, directory: Path, now: datetime) -> Iterator[GaugeMetricFamily]:
        labels = ["resource", "data_class", "measure"]
        age = GaugeMetricFamily("drplan_data_age_seconds", "Age of the newest recoverable copy", labels=labels)
        objective = GaugeMetricFamily("drplan_data_age_objective_seconds", "RPO objective of that age",
                                      labels=labels)
        verified = GaugeMetricFamily("drplan_rpo_verification_timestamp_seconds",
                                     "When the newest RPO verification finished")
        newest = _newest_first(directory, RPO_PREFIX)[:1]
        if newest and (report := self._read(newest[0], RpoReport)) is not None:
            verified.add_metric([], report.finished_at.timestamp())
            for m in report.measurements:
                key = [m.resource, m.data_class, m.measure]
                objective.add_metric(key, m.objective.total_seconds())
                if m.newest is not None:
                    age.add_metric(key, (now - m.newest).total_seconds())
        yield from (age, objective, verified)

    def _drills(self, directory: Path) -> Iterator[GaugeMetricFamily]:
        success = GaugeMetricFamily("drplan_drill_success", "1 if the newest drill passed", labels=["database"])
        when = GaugeMetricFamily("drplan_drill_timestamp_seconds", "When the newest drill finished",
                                 labels=["database"])
        rto = GaugeMetricFamily("drplan_rto_seconds", "Longest RTO of the newest drills of a tier", labels=["tier"])
        rto_objective = GaugeMetricFamily("drplan_rto_objective_seconds", "RTO objective of the tier",
                                          labels=["tier"])
        tiers = {db.name: db.tier.value for db in self.plan.databases}
        newest: dict[str, DrillReport] = {}
        for path in _newest_first(directory, DRILL_PREFIX):
            if set(tiers) <= set(newest):
                break
            report = self._read(path, DrillReport)
            if report is not None and report.database in tiers:
                newest.setdefault(report.database, report)
        worst: dict[str, float] = {}
        for database, report in sorted(newest.items()):
            success.add_metric([database], 1 if report.status is Status.passed else 0)
            if report.finished_at is not None:
                when.add_metric([database], report.finished_at.timestamp())
            if report.rto is not None and report.rto.measured is not None:
                tier = tiers[database]
                worst[tier] = max(report.rto.measured.total_seconds(), worst.get(tier, 0.0))
        for tier, seconds in sorted(worst.items()):
            rto.add_metric([tier], seconds)
        for tier in sorted(set(tiers.values())):
            rto_objective.add_metric([tier], getattr(self.plan.objectives.rto, tier).total_seconds())
        yield from (success, when, rto, rto_objective)

    def _readiness(self, directory: Path) -> Iterator[GaugeMetricFamily]:
        ready = GaugeMetricFamily("drplan_region_ready", "1 if the newest readiness check found the region ready",
                                  labels=["region"])
        when = GaugeMetricFamily("drplan_readiness_timestamp_seconds", "When the region was last checked",
                                 labels=["region"])
        seen: set[str] = set()
        for path in _newest_first(directory, READINESS_PREFIX):
            report = self._read(path)
            if report is None or report["region"] in seen:
                continue
            seen.add(report["region"])
            ready.add_metric([report["region"]], 1 if all(f["ready"] for f in report["findings"]) else 0)
            when.add_metric([report["region"]], parse_utc(report["checked_at"]).timestamp())
        yield from (ready, when)

    def _runs(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily("drplan_prefect_up", "1 if the Prefect API answered this scrape")
        runs = GaugeMetricFamily("drplan_runs_in_progress", "Flow runs running, pending or paused", labels=["flow"])
        counts = self.runs_in_progress() if self.runs_in_progress else None
        up.add_metric([], 0 if counts is None else 1)
        for name, count in sorted((counts or {}).items()):
            runs.add_metric([name], count)
        yield from (up, runs)


def _unreadable() -> GaugeMetricFamily:
    return GaugeMetricFamily("drplan_report_unreadable", "A newest report that could not be read", labels=["file"])
