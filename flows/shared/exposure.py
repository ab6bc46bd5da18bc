"""Network exposure around a recovery: read on the server that serves before the first change, compared on the
server that serves after it (tasks/health.py, part of recovery validation)."""

from __future__ import annotations

from collections.abc import Callable

from drplan.clients import DbCredentials
from drplan.plan import Database, Plan
from drplan.results import CheckResult
from drplan.topology import DatabaseTopology
from flows.shared.report import RecoveryReport
from tasks.health import Exposure, ServiceValidation, read_exposure


def exposure_before(report: RecoveryReport, plan: Plan, db: Database, topology: DatabaseTopology,
                    credentials: DbCredentials) -> Exposure:
    """The exposure of the live primary (else the last one); read only. A failure is recorded as a step."""
    serving = topology.last_primary
    if serving is None:
        exposure = Exposure("the primary", None, "no primary found")
    else:
        exposure = read_exposure(plan, db, serving, credentials, topology.region_of(serving) or plan.aws.region)
    if exposure.facts is None:
        report.record("exposure not measured", exposure.server, exposure.unreadable)
    return exposure


def with_exposure(validation: ServiceValidation, *exposures: Callable[[], CheckResult] | None) -> ServiceValidation:
    """`validation` with the network exposure checks added (each run now; None: no check)."""
    checks = [exposure() for exposure in exposures if exposure is not None]
    return validation.model_copy(update={"checks": [*validation.checks, *checks]}) if checks else validation
