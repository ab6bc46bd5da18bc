"""The live topology of each database: which member really accepts writes, which replicate from it, which member
each service really uses, and every difference from the plan. Models and judgement only; discovery is
tasks/topology.py."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Literal

from pydantic import AwareDatetime, BaseModel, computed_field

from drplan.clients import DbCredentials, PgTarget
from drplan.errors import DrplanError
from drplan.results import markdown_table


class State(StrEnum):
    primary = "primary"
    """Accepts writes."""
    replica = "replica"
    """A standby in recovery, following an upstream."""
    fenced = "fenced"
    """Up but refusing writes (default_transaction_read_only on), or stopped on purpose (RDS stopped)."""
    down = "down"
    """Does not answer (or the probe failed); `detail` says why."""
    missing = "missing"
    """The plan names it, but it does not exist."""


MemberKind = Literal["plan", "replica-chain", "recovery-copy", "tagged"]
BINDING_COLUMNS = ["service", "cluster", "region", "secret", "address", "member"]
MEMBER_COLUMNS = ["member", "role", "kind", "region", "address", "state", "timeline", "upstream", "lag", "archiving"]


class Member(BaseModel):
    """One server holding a copy of the database, as found now."""

    database: str
    identifier: str
    role: str | None = None
    """The plan's role (primary, replica, dr_replica); None for a member found by discovery."""
    kind: MemberKind = "plan"
    region: str | None = None
    host: str | None = None
    port: int | None = None
    state: State = State.down
    detail: str = ""
    in_recovery: bool | None = None
    archiving: bool | None = None
    archive_failing: bool = False
    timeline: int | None = None
    upstream: str | None = None
    """The member it replicates from."""
    lag_seconds: float | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}" if self.host else "-"

    @property
    def row(self) -> dict[str, str]:
        """The member as MEMBER_COLUMNS -> cell."""
        lag = "-" if self.lag_seconds is None else f"{self.lag_seconds:.1f}s"
        archiving = "-" if self.archiving is None else "failing" if self.archive_failing else (
            "on" if self.archiving else "off")
        cells = [self.identifier, self.role or "-", self.kind, self.region or "-", self.address,
                 f"{self.state} ({self.detail})" if self.detail else str(self.state),
                 "-" if self.timeline is None else str(self.timeline), self.upstream or "-", lag, archiving]
        return dict(zip(MEMBER_COLUMNS, cells, strict=True))

    @property
    def accepts_writes(self) -> bool:
        return self.state is State.primary

    def target(self, dbname: str, credentials: DbCredentials) -> PgTarget:
        """Where to connect to it; a member without an address is refused."""
        if self.host is None or self.port is None:
            raise DrplanError(f"{self.database}/{self.identifier} has no address ({self.detail or self.state})")
        return PgTarget(f"{self.database}/{self.identifier}", self.host, self.port, dbname, credentials)


class Binding(BaseModel):
    """Which database a service's Deployment really uses, from the Secret holding its DATABASE_URL."""

    service: str
    cluster: str
    region: str
    secret: str | None = None
    """namespace/secret:key."""
    host: str | None = None
    port: int | None = None
    member: str | None = None
    """The member at host:port; None when it is no known member."""
    error: str | None = None
    """Why the binding could not be read."""

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}" if self.host else "-"

    @property
    def row(self) -> dict[str, str]:
        """The binding as BINDING_COLUMNS -> cell."""
        cells = [self.service, self.cluster, self.region, self.secret or "-", self.address,
                 self.member or self.error or "no known member"]
        return dict(zip(BINDING_COLUMNS, cells, strict=True))


class DatabaseTopology(BaseModel):
    database: str
    members: list[Member] = []
    bindings: list[Binding] = []
    home_region: str | None = None
    """The plan's primary region: where a member of no known region (a copy restored on this machine) counts."""
    wants_replica: bool = False
    """The plan keeps a replica in the primary's region."""
    dr_region: str | None = None
    """The plan keeps a replica in this other region (None: no DR replica)."""

    def member(self, identifier: str | None) -> Member | None:
        return next((m for m in self.members if m.identifier == identifier), None)

    @property
    def used(self) -> list[Member]:
        """Members some service's binding points at."""
        names = {b.member for b in self.bindings}
        return [m for m in self.members if m.identifier in names]

    @property
    def writable(self) -> list[Member]:
        """Members that accept writes, except recovery copies no service uses (a drill's scratch copy)."""
        used = {m.identifier for m in self.used}
        return [m for m in self.members
                if m.accepts_writes and (m.kind != "recovery-copy" or m.identifier in used)]

    @property
    def primary(self) -> Member | None:
        """The live primary: the one writable member, or among several the one that services use (the others
        are split brain, reported as a difference); None when that does not name exactly one."""
        writable = self.writable
        if len(writable) == 1:
            return writable[0]
        used = {m.identifier for m in self.used}
        serving = [m for m in writable if m.identifier in used]
        return serving[0] if len(serving) == 1 else None

    @property
    def last_primary(self) -> Member | None:
        """The live primary; when none accepts writes (it failed), the member the services use, else the one every
        replica follows."""
        if self.primary is not None:
            return self.primary
        used = self.used
        if len(used) == 1:
            return used[0]
        followed = {m.upstream for m in self.members if m.state is State.replica and m.upstream}
        return self.member(followed.pop()) if len(followed) == 1 else None

    def replicas_of(self, member: Member) -> list[Member]:
        """Members streaming from `member` now."""
        return [m for m in self.members if m.state is State.replica and m.upstream == member.identifier]

    def region_of(self, member: Member) -> str | None:
        return member.region or self.home_region

    def in_region_replica(self, member: Member) -> Member | None:
        """A replica of `member` in its own region."""
        return next((r for r in self.replicas_of(member) if self.region_of(r) == self.region_of(member)), None)

    def other_region(self, member: Member) -> str | None:
        """Where the DR replica of `member` belongs: the plan's DR region, or home when `member` is in the DR region."""
        if self.dr_region is None:
            return None
        return self.home_region if self.region_of(member) == self.dr_region else self.dr_region

    def dr_replica(self, member: Member) -> Member | None:
        """A replica of `member` in the other region."""
        other = self.other_region(member)
        return next((r for r in self.replicas_of(member) if other and self.region_of(r) == other), None)

    def unprotected_regions(self, member: Member) -> list[str]:
        """Regions where `member`, as the primary, lacks the replica the plan requires: its own (in the primary
        region only: the plan keeps one member in the DR region), then the other."""
        regions = []
        home = self.home_region is None or self.region_of(member) == self.home_region
        if self.wants_replica and home and self.in_region_replica(member) is None:
            regions.append(self.region_of(member) or "its region")
        if self.dr_region and self.dr_replica(member) is None:
            regions.append(self.other_region(member))
        return regions

    def protection_gaps(self, member: Member) -> list[str]:
        """What `member`, as the primary, lacks of the protection the plan requires: WAL archiving (RDS: automated
        backups), a replica in its region (in the primary region only: the plan keeps one member in the DR region),
        a replica in the other region."""
        gaps = []
        if member.archiving is False:
            gaps.append(f"live primary {member.identifier} does not archive WAL")
        elif member.archive_failing:
            gaps.append(f"live primary {member.identifier}: WAL archiving is failing")
        return gaps + [f"live primary {member.identifier} has no replica in {region}"
                       for region in self.unprotected_regions(member)]

    @property
    def plan_primary(self) -> Member | None:
        return next((m for m in self.members if m.role == "primary"), None)

    @computed_field
    @property
    def differences(self) -> list[str]:
        """One line per way the live topology differs from the plan."""
        return self._writers() + self._plan_members() + self._replication() + self._bindings() + self._protection()

    def _writers(self) -> list[str]:
        writable, planned = self.writable, self.plan_primary
        if not writable:
            return ["no member accepts writes"]
        if len(writable) > 1:
            return [f"split brain: {len(writable)} members accept writes: {', '.join(m.identifier for m in writable)}"]
        if planned is not None and writable[0] is not planned:
            return [f"the writable primary is {writable[0].identifier}, not the plan's primary {planned.identifier}"]
        return []

    def _plan_members(self) -> list[str]:
        return [f"plan member {m.role} {m.identifier} is {m.state}" + (f": {m.detail}" if m.detail else "")
                for m in self.members if m.role and m.state in (State.fenced, State.down, State.missing)]

    def _replication(self) -> list[str]:
        writers = {m.identifier for m in self.writable}
        if not writers:
            return []
        return [f"replica {m.identifier} replicates from {m.upstream or 'no known member'}, not from the live "
                f"primary {' or '.join(sorted(writers))}"
                for m in self.members
                if m.state is State.replica and m.kind != "recovery-copy" and m.upstream not in writers]

    def _bindings(self) -> list[str]:
        planned = self.plan_primary.identifier if self.plan_primary else None
        lines = []
        for b in self.bindings:
            where = f"service {b.service} in {b.cluster}"
            used = self.member(b.member)
            if b.error:
                lines.append(f"{where}: cannot tell which database it uses: {b.error}")
            elif used is None:
                lines.append(f"{where} uses {b.address}, which is no known member, not the plan's primary {planned}")
            elif used.identifier != planned:
                what = "recovery copy" if used.kind == "recovery-copy" else "member"
                lines.append(f"{where} uses {what} {used.identifier}, not the plan's primary {planned}")
            elif not used.accepts_writes:
                lines.append(f"{where} uses {used.identifier}, which is {used.state}")
        return lines

    def _protection(self) -> list[str]:
        return [gap for m in self.writable for gap in self.protection_gaps(m)]

    def markdown(self) -> str:
        members = markdown_table(MEMBER_COLUMNS, (m.row.values() for m in self.members))
        bindings = markdown_table(BINDING_COLUMNS, (b.row.values() for b in self.bindings)) if self.bindings else (
            "No service of the plan uses it.")
        differences = "\n".join(f"- {line}" for line in self.differences) or "No differences from the plan."
        return f"### {self.database}\n\n{members}\n\n{bindings}\n\n{differences}"


class Topology(BaseModel):
    plan: str
    discovered_at: AwareDatetime
    databases: list[DatabaseTopology] = []

    @computed_field
    @property
    def differences(self) -> list[str]:
        return [f"{db.database}: {line}" for db in self.databases for line in db.differences]

    def markdown(self) -> str:
        parts = [f"## Live topology of {self.plan} at {_stamp(self.discovered_at)}"]
        return "\n\n".join(parts + [db.markdown() for db in self.databases])


def _stamp(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")
