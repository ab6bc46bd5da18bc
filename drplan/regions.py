"""Which parts of the plan serve from a region: for each service with a `dr` section, its cluster, health URL
and database member in the primary region (aws.region) or the DR region (aws.dr_region)."""

from __future__ import annotations

from pydantic import BaseModel

from drplan.errors import DrplanError
from drplan.plan import Cluster, Database, Plan, Service


class Placement(BaseModel):
    """A service as it runs in one region."""

    service: Service
    cluster: Cluster
    health: str
    database: Database | None
    member: str | None
    """Role of the database member in that region: `primary` or `dr_replica`."""

    def serving(self) -> Service:
        """The service as validation must see it in this region (its cluster and health URL there)."""
        return self.service.model_copy(update={"cluster": self.cluster.name, "health": self.health})


def placements(plan: Plan, region: str) -> list[Placement]:
    """Every service that can fail over (has `dr`), placed in `region`; refuses a region the plan does not have."""
    if region not in (plan.aws.region, plan.aws.dr_region):
        raise DrplanError(f"region {region} is neither aws.region ({plan.aws.region}) nor aws.dr_region "
                          f"({plan.aws.dr_region}); choose one of them")
    dr = region == plan.aws.dr_region
    found = []
    for service in plan.services:
        if service.dr is None or service.cluster is None:
            continue
        db = plan.database(service.database) if service.database else None
        if dr and db is not None and db.dr_replica is None:
            raise DrplanError(f"service {service.name} uses database {db.name}, which has no dr_replica; add "
                              "databases[].dr_replica or remove services[].dr")
        found.append(Placement(
            service=service, cluster=plan.cluster(service.dr.cluster if dr else service.cluster),
            health=service.dr.health if dr else service.health, database=db,
            member=None if db is None else "dr_replica" if dr else "primary"))
    if not found:
        raise DrplanError("no service of the plan has a dr section (services[].dr: {cluster, health}); nothing can "
                          "fail over")
    return found


def traffic_target(plan: Plan, region: str | None) -> tuple[str, list[Placement]]:
    """The region traffic moves to (default: aws.dr_region) and the services placed there; refuses a region the
    plan cannot move traffic to (not one of its regions, no service with `dr`, no dns.targets entry)."""
    region = region or plan.aws.dr_region
    placed = placements(plan, region)
    if plan.dns is None or region not in plan.dns.targets:
        raise DrplanError(f"dns.targets has no target for {region}; add the name the records point at in that region")
    return region, placed
