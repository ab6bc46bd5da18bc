"""Live topology discovery: every member of a database (the plan's, recovery copies, RDS instances tagged for it or
replicating in its chain), one SQL probe of each, and the member each service's Deployment really uses.

Discovery never fails on a member: one that does not answer is `down` with the reason. Credentials come from the
plan (db_credentials); no password is logged or returned.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import psycopg
from botocore.exceptions import BotoCoreError, ClientError
from kubernetes.client.exceptions import ApiException
from prefect import task
from prefect.cache_policies import NO_CACHE
from psycopg.conninfo import conninfo_to_dict
from urllib3.exceptions import HTTPError

from drplan.clients import DbCredentials, aws_client, db_credentials, kube_client, kubeconfig_path
from drplan.errors import DrplanError, first_line
from drplan.logs import run_logger
from drplan.plan import Cluster, Database, DatabaseKind, Plan, Service, host_port
from drplan.timeutil import utcnow
from drplan.topology import Binding, DatabaseTopology, Member, State, Topology
from tasks.fencing import FENCED_FROM_TAG
from tasks.k8s import read_database_url
from tasks.rds import replica_source
from tasks.targets import DATABASE_TAG, DRILL_TAG, PLAN_TAG, PostgresArchive, instance_tag

PROBE_TIMEOUT = 3
"""Seconds to wait for a member to accept the connection, and then for its answer, before it counts as down."""

Address = tuple[str, int]

PROBE = """
SELECT pg_is_in_recovery(),
       current_setting('default_transaction_read_only') = 'on',
       current_setting('archive_mode') <> 'off'
         AND (current_setting('archive_command') NOT IN ('', '(disabled)')
              OR coalesce(current_setting('archive_library', true), '') <> ''),
       coalesce(a.last_failed_time > a.last_archived_time, a.last_failed_time IS NOT NULL),
       CASE WHEN pg_is_in_recovery() THEN w.received_tli
            ELSE ('x' || left(pg_walfile_name(pg_current_wal_lsn()), 8))::bit(32)::int END,
       w.sender_host, w.sender_port,
       CASE WHEN pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0
            ELSE extract(epoch FROM now() - pg_last_xact_replay_timestamp()) END
  FROM pg_stat_archiver a LEFT JOIN pg_stat_wal_receiver w ON true
"""
"""Role, fence, archiving, timeline (a primary's from its current WAL file name), upstream address, replay lag."""


def discover(plan: Plan, databases: list[str] | None = None) -> Topology:
    """The live topology of the named databases of the plan (all by default); an unknown name is refused."""
    chosen = [plan.database(name) for name in databases] if databases else plan.databases
    described = _describe_regions(plan) if any(db.kind is DatabaseKind.rds for db in chosen) else None
    return Topology(plan=plan.name, discovered_at=utcnow(),
                    databases=[discover_database(plan, db, described) for db in chosen])


discover_topology = task(discover, name="discover-topology", cache_policy=NO_CACHE)


Described = tuple[dict[str, tuple[dict, str]], dict[str, str]]
"""`_describe_regions`' answer: read once per discovery, shared by its RDS databases."""
PROBE_WORKERS = 8
"""Members probed at once."""


def discover_database(plan: Plan, db: Database, described: Described | None = None) -> DatabaseTopology:
    """Members found, probed (PROBE_WORKERS at a time) and linked to the member they replicate from; then which
    member each service uses."""
    found = rds_members(plan, db, described) if db.kind is DatabaseKind.rds else postgres_members(plan, db)
    credentials, unreadable = None, ""
    try:
        credentials = db_credentials(plan, db)
    except DrplanError as exc:  # nothing can be probed: every member is down, with the reason
        unreadable = first_line(exc)

    def probed_member(m: Member) -> tuple[Member, Address | None]:
        return ((m, None) if not (m.host and m.state is State.down) else
                probe(m, db, credentials) if credentials is not None else
                (m.model_copy(update={"detail": unreadable}), None))
    with ThreadPoolExecutor(PROBE_WORKERS, thread_name_prefix="probe") as pool:
        probed = list(pool.map(probed_member, found))
    members_at = {(m.host, m.port): m.identifier for m, _ in probed if m.host}
    members = [_follow(m, sender, members_at) for m, sender in probed]
    topology = DatabaseTopology(database=db.name, members=members, bindings=bindings(plan, db, members_at),
                                home_region=plan.aws.region, wants_replica=db.replica is not None,
                                dr_region=db.dr_replica.region if db.dr_replica else None)
    run_logger().info("topology of %s: %s; %d difference(s)", db.name,
                      ", ".join(f"{m.identifier} {m.state}" for m in members), len(topology.differences))
    return topology


def postgres_members(plan: Plan, db: Database) -> list[Member]:
    """The plan's members at their endpoints, and the recovery copies restored on this machine."""
    members = []
    for role, identifier in db.members.items():
        host, port = host_port(db.endpoints[identifier])
        members.append(Member(database=db.name, identifier=identifier, role=role, region=plan.member_region(db, role),
                              host=host, port=port))
    return members + [Member(database=db.name, identifier=copy.name, kind="recovery-copy", host=copy.host,
                             port=copy.port) for copy in PostgresArchive(plan, db).copies()]


def rds_members(plan: Plan, db: Database, described: Described | None = None) -> list[Member]:
    """The plan's instances, instances tagged for the database (restored copies among them) and every instance
    replicating from one of those or feeding one, in both regions (`described`, or read now). Stopped instances
    are fenced."""
    found, errors = described or _describe_regions(plan)
    kinds = {identifier: "plan" for identifier in db.members.values()}
    for identifier, (instance, _) in found.items():
        if identifier not in kinds and instance_tag(instance, DATABASE_TAG) == db.name and \
                instance_tag(instance, PLAN_TAG) in (None, plan.name):
            kinds[identifier] = "recovery-copy" if instance_tag(instance, DRILL_TAG) == "true" else "tagged"
    while chained := _chained(found, kinds):
        kinds |= chained
    roles = {identifier: role for role, identifier in db.members.items()}
    members = []
    for identifier, kind in kinds.items():
        role = roles.get(identifier)
        host, port = host_port(db.endpoints[identifier]) if identifier in db.endpoints else (None, None)
        member = Member(database=db.name, identifier=identifier, role=role, kind=kind, host=host, port=port)
        if identifier in found:
            members.append(_rds_member(member, *found[identifier]))
        else:
            region = plan.member_region(db, role)
            error = errors.get(region)
            members.append(member.model_copy(update={
                "region": region, "state": State.down if error else State.missing, "detail": error or ""}))
    return members


def _describe_regions(plan: Plan) -> tuple[dict[str, tuple[dict, str]], dict[str, str]]:
    """Every RDS instance of both regions as identifier -> (instance, region), and region -> why it is unreadable."""
    found, errors = {}, {}
    for region in (plan.aws.region, plan.aws.dr_region):
        try:
            for page in aws_client(plan, "rds", region).get_paginator("describe_db_instances").paginate():
                found |= {i["DBInstanceIdentifier"]: (i, region) for i in page["DBInstances"]}
        except (BotoCoreError, ClientError) as exc:
            errors[region] = f"RDS in {region} unreadable: {first_line(exc)}"
    return found, errors


def _chained(found: dict[str, tuple[dict, str]], kinds: dict[str, str]) -> dict[str, str]:
    """Instances not yet members that replicate from a member, or that a member replicates from."""
    feeding = {replica_source(found[identifier][0]) for identifier in kinds if identifier in found}
    return {identifier: "replica-chain" for identifier, (instance, _) in found.items()
            if identifier not in kinds and (replica_source(instance) in kinds or identifier in feeding)}


def _rds_member(member: Member, instance: dict, region: str) -> Member:
    """What RDS says of a member: region, address (unless the plan overrides it), archiving, source; stopped or cut
    off by a fence is fenced (not probed), an instance without an address yet is down."""
    status = instance["DBInstanceStatus"]
    endpoint = instance.get("Endpoint") or {}
    update = {"region": region, "archiving": instance.get("BackupRetentionPeriod", 0) > 0,
              "upstream": replica_source(instance)}
    if member.host is None and "Address" in endpoint:
        update |= {"host": endpoint["Address"], "port": int(endpoint["Port"])}
    if status in ("stopped", "stopping"):
        update |= {"state": State.fenced, "detail": f"RDS status {status}"}
    elif instance_tag(instance, FENCED_FROM_TAG) is not None:
        update |= {"state": State.fenced, "detail": "cut off (security group drplan-fence)"}
    elif "host" not in update and member.host is None:
        update["detail"] = f"RDS status {status}, no address yet"
    return member.model_copy(update=update)


def probe(member: Member, db: Database, credentials: DbCredentials) -> tuple[Member, Address | None]:
    """One query of the member: its state, archiving, timeline and replay lag, and the address its WAL receiver
    streams from. A member that does not answer (or cannot be queried) is down, with the reason."""
    target = member.target(db.dbname, credentials)
    try:
        with target.connect(timeout=PROBE_TIMEOUT, options=f"-c statement_timeout={PROBE_TIMEOUT * 1000}") as conn:
            row = conn.execute(PROBE).fetchone()
            configured = _configured_upstream(conn) if row[0] and not row[5] else None
    except (DrplanError, psycopg.Error) as exc:
        return member.model_copy(update={"state": State.down, "detail": first_line(exc)}), None
    in_recovery, read_only, archiving, failing, timeline, sender_host, sender_port, lag = row
    state = State.replica if in_recovery else State.fenced if read_only else State.primary
    update = {
        "state": state, "detail": "default_transaction_read_only = on" if state is State.fenced else "",
        "in_recovery": in_recovery, "archive_failing": failing, "timeline": timeline,
        "lag_seconds": float(lag) if in_recovery and lag is not None else None,
        "archiving": archiving if member.archiving is None else member.archiving,  # RDS: its backup retention
    }
    sender = (sender_host, sender_port) if sender_host else configured
    return member.model_copy(update=update), sender


def _configured_upstream(conn: psycopg.Connection) -> Address | None:
    """Where a standby that is not streaming (its primary is down) is set to stream from: host and port of its
    primary_conninfo (readable by superusers only; nothing else of it is kept)."""
    try:
        conninfo = conn.execute("SELECT current_setting('primary_conninfo')").fetchone()[0]
        fields = conninfo_to_dict(conninfo)
    except psycopg.Error:
        conn.rollback()
        return None
    host = fields.get("host") or fields.get("hostaddr")
    return (str(host), int(fields.get("port") or 5432)) if host else None


def _follow(member: Member, sender: Address | None, members_at: dict[Address, str]) -> Member:
    """The member's upstream from the address it streams from: the member there, else what RDS said, else the
    address itself."""
    if sender is None:
        return member
    upstream = members_at.get(sender) or member.upstream or f"{sender[0]}:{sender[1]}"
    return member.model_copy(update={"upstream": upstream})


def bindings(plan: Plan, db: Database, members_at: dict[Address, str]) -> list[Binding]:
    """Which member each service using the database really uses, in its cluster and its DR cluster. A cluster
    without a kubeconfig here, or not running the service (a pilot-light DR region), has no binding."""
    found = []
    for service in plan.services:
        if service.database != db.name:
            continue
        clusters = [name for name in (service.cluster, service.dr.cluster if service.dr else None) if name]
        found += [b for name in clusters if (b := _binding(plan, service, plan.cluster(name), members_at))]
    return found


def _binding(plan: Plan, service: Service, cluster: Cluster, members_at: dict[Address, str]) -> Binding | None:
    if not kubeconfig_path(plan, cluster).is_file():
        return None
    binding = Binding(service=service.name, cluster=cluster.name, region=plan.region_of(cluster))
    try:
        found = read_database_url(kube_client(plan, cluster), cluster.namespace, service.name)
    except (DrplanError, ApiException, HTTPError) as exc:
        return binding.model_copy(update={"error": first_line(exc)})
    if found is None:
        return None
    secret, url = found
    address = _address(url)
    if address is None:
        return binding.model_copy(update={"secret": secret, "error": f"{secret} holds no URL with a host"})
    return binding.model_copy(update={"secret": secret, "host": address[0], "port": address[1],
                                      "member": members_at.get(address)})


def _address(url: str) -> Address | None:
    """host, port of a database URL (port 5432 unless it names one); None when it has no host."""
    try:
        parts = urlsplit(url)
        return (parts.hostname, parts.port or 5432) if parts.hostname else None
    except ValueError:
        return None
