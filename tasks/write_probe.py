"""Where the DR test's write probe (drplan/write_probe.py) writes: the database the application uses now."""

from __future__ import annotations

from collections.abc import Callable

from psycopg.conninfo import conninfo_to_dict

from drplan.clients import PgTarget, db_credentials, kube_client
from drplan.errors import DrplanError
from drplan.plan import Database, Plan
from tasks.k8s import read_database_url
from tasks.topology import discover


def application_target(plan: Plan, db: Database) -> Callable[[], PgTarget]:
    """The address in the DATABASE_URL of the plan's service of `db`, re-read from its Kubernetes Secret at each
    call (so a probe follows every cutover), with drplan's credentials for `db` (the application's own may not
    create tables); without such a service, the live primary discovered at each call. The URL's password is never
    kept."""
    credentials = db_credentials(plan, db)
    service = next((s for s in plan.services if s.database == db.name and s.cluster), None)
    if service is None:
        def live_primary() -> PgTarget:
            primary = discover(plan, [db.name]).databases[0].primary
            if primary is None:
                raise DrplanError(f"{db.name}: no single live primary; see drplan topology")
            return primary.target(db.dbname, credentials)
        return live_primary

    cluster = plan.cluster(service.cluster)
    api = kube_client(plan, cluster)

    def used_by_service() -> PgTarget:
        found = read_database_url(api, cluster.namespace, service.name)
        if found is None:
            raise DrplanError(f"deployment {service.name} not found in cluster {cluster.name}")
        secret, url = found
        parts = conninfo_to_dict(url)
        if not parts.get("host"):
            raise DrplanError(f"{secret} holds no database URL with a host")
        return PgTarget(f"{db.name} as {service.name} uses it", str(parts["host"]), int(parts.get("port") or 5432),
                        str(parts.get("dbname") or db.dbname), credentials)
    return used_by_service
