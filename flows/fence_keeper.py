"""Pending fences: a member that could not be fenced when a failover moved away from it (unreachable: a region
loss) is fenced as soon as it answers again. Scheduled every minute; readiness and the failover flows apply them
too before they look at a region."""

from __future__ import annotations

from prefect import flow, get_run_logger

from drplan.plan import DEFAULT_PLAN, load_plan
from tasks.fencing import Fence, apply_pending_fences_task


@flow(name="fence-keeper")
def fence_keeper(plan: str = DEFAULT_PLAN) -> list[Fence]:
    """Apply every pending fence of the plan's databases whose member answers; report what is still pending."""
    fences = apply_pending_fences_task(load_plan(plan))
    logger = get_run_logger()
    for fence in fences:
        (logger.warning if fence.status == "pending" else logger.info)(
            "%s %s: %s%s", fence.database, fence.member, fence.status, f" ({fence.detail})" if fence.detail else "")
    return fences
