"""Route 53: read the records a service answers on, switch them to another region's target, wait INSYNC."""

from __future__ import annotations

import time

from drplan.errors import DrplanError
from drplan.logs import run_logger
from drplan.plan import Dns

MAX_TTL = 60
"""A failover record's TTL is at most this many seconds, so clients follow the switch within a minute."""


def fqdn(name: str) -> str:
    return name.rstrip(".") + "."


def zone_id(r53, zone: str) -> str:
    zones = r53.list_hosted_zones_by_name(DNSName=fqdn(zone))["HostedZones"]
    found = [z for z in zones if z["Name"] == fqdn(zone)]
    if not found:
        raise DrplanError(f"hosted zone {zone} not found in Route 53; check dns.zone")
    return found[0]["Id"].rsplit("/", 1)[-1]


def read_record(r53, zone: str, name: str) -> tuple[str, int] | None:
    """(CNAME target, TTL) of a record, or None if it does not exist."""
    answer = r53.list_resource_record_sets(HostedZoneId=zone, StartRecordName=fqdn(name), StartRecordType="CNAME",
                                           MaxItems="1")["ResourceRecordSets"]
    record = next((r for r in answer if r["Name"] == fqdn(name) and r["Type"] == "CNAME"), None)
    if record is None:
        return None
    return record["ResourceRecords"][0]["Value"].rstrip("."), int(record["TTL"])


def failover_ttl(dns: Dns) -> int:
    return min(dns.ttl, MAX_TTL)


def read_records(r53, dns: Dns) -> dict[str, tuple[str, int] | None]:
    """(CNAME target, TTL) of each record of the plan, None for a missing one."""
    zone = zone_id(r53, dns.zone)
    return {name: read_record(r53, zone, name) for name in dns.records}


def switch_records(r53, dns: Dns, target: str, timeout: float = 300, interval: float = 2.0) -> list[str]:
    """UPSERT every record of the plan to CNAME `target` (TTL <= 60 s) and wait until the change is INSYNC.
    Returns the records that changed (none when all already pointed there)."""
    ttl, zone = failover_ttl(dns), zone_id(r53, dns.zone)
    stale = [name for name in dns.records if read_record(r53, zone, name) != (target, ttl)]
    if not stale:
        return []
    change = r53.change_resource_record_sets(HostedZoneId=zone, ChangeBatch={
        "Comment": f"drplan DNS failover to {target}",
        "Changes": [{"Action": "UPSERT", "ResourceRecordSet": {
            "Name": fqdn(name), "Type": "CNAME", "TTL": ttl, "ResourceRecords": [{"Value": target}]}}
            for name in stale]})["ChangeInfo"]
    deadline = time.monotonic() + timeout
    while change["Status"] != "INSYNC":
        if time.monotonic() > deadline:
            raise DrplanError(f"Route 53 change {change['Id']} still {change['Status']} after {timeout:g}s")
        time.sleep(interval)
        change = r53.get_change(Id=change["Id"])["ChangeInfo"]
    run_logger().warning("DNS %s -> %s (TTL %ds), change %s INSYNC", ", ".join(stale), target, ttl, change["Id"])
    return stale


def health_check_for(r53, target: str) -> str | None:
    """Id of a Route 53 health check watching `target`, if one exists."""
    for page in r53.get_paginator("list_health_checks").paginate():
        for check in page["HealthChecks"]:
            if check["HealthCheckConfig"].get("FullyQualifiedDomainName", "").rstrip(".") == target.rstrip("."):
                return check["Id"]
    return None
