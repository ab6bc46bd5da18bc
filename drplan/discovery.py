"""Plans that discover (pure: an inventory in, a plan or a drift out). A plan's `discover:` selectors take in
buckets and RDS databases by tag or name pattern; drift is what the live inventory and the plan disagree on:
resources tagged `drplan:protect` that the plan does not cover, and plan entries whose resources no longer exist.

The inventory (`tasks/inventory.py`) is every bucket and every RDS instance of the plan's regions with its tags.
An RDS read replica is covered through its source: the plan (or discovery) names databases by their primary, and
the live topology follows the replica chain.
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Literal

from pydantic import BaseModel, Field

from drplan.plan import PROTECT_TAG, Bucket, Database, DatabaseKind, Plan, Selector, Tier
from drplan.results import markdown_table


class Resource(BaseModel):
    """A live bucket or RDS instance."""

    kind: Literal["bucket", "rds"]
    name: str
    region: str | None = None
    tags: dict[str, str] = Field(default_factory=dict)
    source: str | None = None
    """rds: the instance it replicates from."""

    @property
    def label(self) -> str:
        return f"{'bucket' if self.kind == 'bucket' else 'RDS instance'} {self.name}" + (
            f" ({self.region})" if self.kind == "rds" and self.region else "")


def matches(selector: Selector, resource: Resource) -> bool:
    """The resource is of the selector's kind, carries its tag (with its value, when given) and fits its pattern."""
    if selector.kind != resource.kind:
        return False
    if selector.tag_key is not None and (selector.tag_key not in resource.tags or (
            selector.tag_value is not None and resource.tags[selector.tag_key] != selector.tag_value)):
        return False
    return selector.name is None or fnmatchcase(resource.name, selector.name)


def _bucket_of(uri: str) -> str:
    return uri.removeprefix("s3://").split("/", 1)[0]


def listed(plan: Plan) -> dict[str, set[str]]:
    """What the plan names itself: live buckets, and the RDS members of its rds databases."""
    return {"bucket": {_bucket_of(b.live) for b in plan.buckets},
            "rds": {i for db in plan.databases if db.kind is DatabaseKind.rds for i in db.members.values()}}


def selected(plan: Plan, inventory: list[Resource]) -> list[tuple[Selector, Resource]]:
    """Resources a selector takes in that the plan does not list (the first matching selector decides; RDS read
    replicas are never databases of their own)."""
    named = listed(plan)
    found = []
    for resource in inventory:
        if resource.name in named[resource.kind] or (resource.kind == "rds" and resource.source):
            continue
        selector = next((s for s in plan.discover if matches(s, resource)), None)
        if selector is not None:
            found.append((selector, resource))
    return found


def expand(plan: Plan, inventory: list[Resource]) -> Plan:
    """The plan with a bucket or an rds database for every resource its selectors take in (named as the resource;
    one whose name an entry already uses is left out)."""
    buckets, databases = list(plan.buckets), list(plan.databases)
    names = {"bucket": {b.name for b in buckets}, "rds": {d.name for d in databases}}
    for selector, resource in selected(plan, inventory):
        if resource.name in names[resource.kind]:
            continue
        names[resource.kind].add(resource.name)
        if resource.kind == "bucket":
            buckets.append(Bucket(name=resource.name, live=f"s3://{resource.name}/",
                                  backup=selector.backup.replace("{name}", resource.name)))
        else:
            databases.append(Database(name=resource.name, tier=selector.tier or Tier(selector.tag_value),
                                      kind=DatabaseKind.rds, primary=resource.name, dbname=selector.dbname,
                                      credentials_secret=selector.credentials_secret))
    expanded = plan.model_copy(update={"buckets": buckets, "databases": databases})
    expanded._base_dir = plan._base_dir
    return expanded


class Drift(BaseModel):
    """Where the plan and the live inventory disagree."""

    plan: str
    uncovered: list[Resource] = Field(default_factory=list)
    """Tagged `drplan:protect`, yet neither listed, selected, nor a replica of either."""
    gone: list[str] = Field(default_factory=list)
    """Plan entries whose resource does not exist, one line each."""
    selected: list[Resource] = Field(default_factory=list)
    """Taken in by the plan's selectors (not drift: shown for completeness)."""

    @property
    def drifted(self) -> bool:
        return bool(self.uncovered or self.gone)

    @property
    def summary(self) -> str:
        return (f"{len(self.uncovered)} tagged {PROTECT_TAG} but not in the plan, {len(self.gone)} plan entries "
                f"gone, {len(self.selected)} taken in by discover:")

    def markdown(self) -> str:
        rows = [["not covered", r.label, f"{PROTECT_TAG}={r.tags.get(PROTECT_TAG, '')}"] for r in self.uncovered]
        rows += [["gone", line, ""] for line in self.gone]
        rows += [["discovered", r.label, ""] for r in self.selected]
        return "\n".join([f"# Plan drift: {self.plan}", self.summary, "",
                          markdown_table(["drift", "resource", "detail"], rows)])


def drift(plan: Plan, inventory: list[Resource]) -> Drift:
    """Tagged resources the plan does not cover, and plan entries (buckets, their backup buckets, RDS members)
    whose resource is not in the inventory."""
    taken = selected(plan, inventory)
    covered = {(r.kind, r.name) for _, r in taken} | {(kind, name) for kind, names in listed(plan).items()
                                                      for name in names}
    by_name = {(r.kind, r.name): r for r in inventory}

    def covered_rds(resource: Resource, seen: int = 0) -> bool:
        """Listed or selected, or replicating (through a chain) from one that is."""
        if ("rds", resource.name) in covered:
            return True
        source = by_name.get(("rds", resource.source or ""))
        return source is not None and seen < 10 and covered_rds(source, seen + 1)

    uncovered = [r for r in inventory if PROTECT_TAG in r.tags and not (
        covered_rds(r) if r.kind == "rds" else ("bucket", r.name) in covered)]
    gone = []
    for index, bucket in enumerate(plan.buckets):
        for field, uri in (("live", bucket.live), ("backup", bucket.backup)):
            if ("bucket", _bucket_of(uri)) not in by_name:
                gone.append(f"buckets[{index}] {bucket.name}: {field} bucket {_bucket_of(uri)} does not exist")
    for db in plan.databases:
        if db.kind is DatabaseKind.rds:
            for role, identifier in db.members.items():
                if ("rds", identifier) not in by_name:
                    gone.append(f"databases {db.name}: {role} {identifier} is no RDS instance of "
                                f"{plan.member_region(db, role)}")
    return Drift(plan=plan.name, uncovered=uncovered, gone=gone, selected=[r for _, r in taken])
