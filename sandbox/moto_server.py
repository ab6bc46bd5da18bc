"""The sandbox's AWS: moto_server, with the RDS behaviour drplan relies on that moto 5 lacks, and (with
`--rds-data-plane DIR`) real PostgreSQL behind every RDS instance (`sandbox.rds_data_plane`).

- promote_read_replica clears ReadReplicaSourceDBInstanceIdentifier, as RDS does (moto flips a flag only);
  deleting a cross-region read replica works (moto looked it up in its source by the wrong name);
- with the data plane, the RDS calls it implements act on real servers (see there); every other mutating RDS
  action answers `InvalidAction` and is logged, so nothing in the sandbox pretends a success.

Run as `python -m sandbox.moto_server -H HOST -p PORT [--rds-data-plane DIR --os-user USER --archive-timeout S]`.
"""

from __future__ import annotations

import argparse
import contextvars
import logging
import sys
from pathlib import Path
from typing import Any

from moto.core.responses import ActionResult
from moto.rds.exceptions import RDSClientError
from moto.rds.models import DBInstance, DBInstanceAutomatedBackup, RDSBackend
from moto.rds.responses import RDSResponse
from moto.server import main

log = logging.getLogger("sandbox.rds")
_original = {name: getattr(RDSBackend, name) for name in (
    "create_db_instance", "create_db_instance_read_replica", "promote_read_replica", "stop_db_instance",
    "start_db_instance", "delete_db_instance", "modify_db_instance", "restore_db_instance_to_point_in_time",
    "create_db_snapshot")}
_address = DBInstance.address
_restoring = contextvars.ContextVar("restoring", default=False)

IMPLEMENTED = {
    "create_db_instance", "create_db_instance_read_replica", "promote_read_replica", "reboot_db_instance",
    "stop_db_instance", "start_db_instance", "delete_db_instance", "modify_db_instance",
    "restore_db_instance_to_point_in_time", "create_db_snapshot", "delete_db_snapshot",
    # control plane only, no effect on the servers:
    "add_tags_to_resource", "remove_tags_from_resource", "create_db_subnet_group", "delete_db_subnet_group",
    "create_db_parameter_group", "delete_db_parameter_group",
}
MODIFIABLE = {"db_instance_identifier", "vpc_security_group_ids", "apply_immediately"}


def promote_read_replica(self: RDSBackend, db_kwargs: dict[str, Any]) -> Any:
    replica = self.databases[db_kwargs["db_instance_identifier"]]
    source_id = replica.source_db_instance_identifier
    promoted = _original["promote_read_replica"](self, db_kwargs)
    if source_id:
        remove_replica(self.find_db_from_id(source_id), replica)
        replica.source_db_instance_identifier = None
    return promoted


def remove_replica(self: DBInstance, replica: DBInstance) -> None:
    """moto lists a cross-region replica by ARN but removes it by identifier (deleting it failed)."""
    for ref in (replica.db_instance_arn, replica.db_instance_identifier):
        if ref in self.replicas:
            self.replicas.remove(ref)


def install_data_plane(plane: Any) -> None:
    """Hook the data plane into moto's RDS backend and responses."""
    from sandbox.rds_data_plane import DataPlane

    assert isinstance(plane, DataPlane)

    def refuse(action: str, why: str) -> RDSClientError:
        log.error("refused RDS %s: %s", action, why)
        return RDSClientError("InvalidAction", f"{action}: {why}")

    def create_db_instance(self: RDSBackend, db_kwargs: dict[str, Any]) -> Any:
        if _restoring.get():
            return _original["create_db_instance"](self, db_kwargs)
        if str(db_kwargs.get("engine", "")).lower() != "postgres":
            raise refuse("CreateDBInstance", "the sandbox's RDS data plane runs engine postgres only")
        if not db_kwargs.get("master_user_password"):
            raise refuse("CreateDBInstance", "the sandbox's RDS data plane needs MasterUserPassword "
                         "(ManageMasterUserPassword is not implemented)")
        instance = _original["create_db_instance"](self, db_kwargs)
        plane.create(instance)
        return instance

    def create_db_instance_read_replica(self: RDSBackend, db_kwargs: dict[str, Any]) -> Any:
        source = self.find_db_from_id(db_kwargs["source_db_instance_identifier"])
        if source.status != "available":
            raise RDSClientError("InvalidDBInstanceState", f"{source.db_instance_identifier} is {source.status}")
        replica = _original["create_db_instance_read_replica"](self, db_kwargs)
        plane.replicate(replica, source)
        return replica

    def promote(self: RDSBackend, db_kwargs: dict[str, Any]) -> Any:
        instance = self.databases[db_kwargs["db_instance_identifier"]]
        was_replica = bool(instance.source_db_instance_identifier)
        promoted = promote_read_replica(self, db_kwargs)
        if was_replica:
            plane.promote(promoted, db_kwargs.get("backup_retention_period"))
        return promoted

    def stop_db_instance(self: RDSBackend, db_instance_identifier: str, db_snapshot_identifier: str | None = None
                         ) -> Any:
        instance = _original["stop_db_instance"](self, db_instance_identifier, db_snapshot_identifier)
        plane.stop(instance)
        return instance

    def start_db_instance(self: RDSBackend, db_instance_identifier: str) -> Any:
        instance = _original["start_db_instance"](self, db_instance_identifier)
        plane.start(instance)
        return instance

    def delete_db_instance(self: RDSBackend, db_instance_identifier: str, *args: Any, **kwargs: Any) -> Any:
        instance = _original["delete_db_instance"](self, db_instance_identifier, *args, **kwargs)
        plane.delete(instance)
        return instance

    def modify_db_instance(self: RDSBackend, db_instance_identifier: str, db_kwargs: dict[str, Any]) -> Any:
        unsupported = sorted(k for k, v in db_kwargs.items() if v is not None and k not in MODIFIABLE)
        if unsupported:
            raise refuse("ModifyDBInstance", f"the sandbox's RDS data plane cannot change {', '.join(unsupported)}; "
                         f"it implements: VpcSecurityGroupIds")
        instance = _original["modify_db_instance"](self, db_instance_identifier, db_kwargs)
        if db_kwargs.get("vpc_security_group_ids") is not None:
            plane.set_security_groups(instance, _open_to_clients(instance))
        return instance

    def restore(self: RDSBackend, source_id: str, target_id: str, overrides: dict[str, Any]) -> Any:
        source = self.describe_db_instances(source_id)[0]
        try:
            when = plane.check_restore_time(source, overrides.get("restore_time"),
                                            bool(overrides.get("use_latest_restorable_time")))
        except ValueError as exc:
            raise RDSClientError("InvalidRestoreFault", str(exc)) from None
        token = _restoring.set(True)
        try:
            instance = _original["restore_db_instance_to_point_in_time"](self, source_id, target_id, overrides)
        finally:
            _restoring.reset(token)
        plane.restore(instance, source, when)
        return instance

    def create_db_snapshot(self: RDSBackend, db_instance_identifier: str, db_snapshot_identifier: str,
                           snapshot_type: str = "manual", **kwargs: Any) -> Any:
        snapshot = _original["create_db_snapshot"](self, db_instance_identifier, db_snapshot_identifier,
                                                   snapshot_type, **kwargs)
        if snapshot_type == "manual":
            plane.snapshot(self.describe_db_instances(db_instance_identifier)[0], snapshot)
        return snapshot

    def reboot_db_instance(self: RDSResponse) -> ActionResult:
        instance = self.backend.describe_db_instances(self.params.get("DBInstanceIdentifier"))[0]
        force = str(self.params.get("ForceFailover", False)).lower() == "true"
        if instance.status != "available":
            raise RDSClientError("InvalidDBInstanceState", f"Database instance is {instance.status}, not available.")
        if force and not instance.multi_az:
            raise RDSClientError("InvalidParameterCombination",
                                 "ForceFailover is only valid for a Multi-AZ DB instance")
        plane.reboot(instance, force)
        return ActionResult({"DBInstance": instance})

    for name, hook in (("create_db_instance", create_db_instance),
                       ("create_db_instance_read_replica", create_db_instance_read_replica),
                       ("promote_read_replica", promote), ("stop_db_instance", stop_db_instance),
                       ("start_db_instance", start_db_instance), ("delete_db_instance", delete_db_instance),
                       ("modify_db_instance", modify_db_instance),
                       ("restore_db_instance_to_point_in_time", restore), ("create_db_snapshot", create_db_snapshot)):
        setattr(RDSBackend, name, hook)
    RDSResponse.reboot_db_instance = reboot_db_instance
    DBInstance.save_automated_backup = lambda self: None  # the data plane records them after real base backups
    DBInstance.address = property(lambda self: "127.0.0.1" if plane.backing(self) else _address.fget(self))
    DBInstance.latest_restorable_time = property(plane.latest_restorable_time)
    DBInstanceAutomatedBackup.restore_window = property(
        lambda self: plane.restore_window(self.backend.databases.get(self.db_instance_identifier)))
    for name in dir(RDSResponse):
        if _mutating(name) and name not in IMPLEMENTED:
            setattr(RDSResponse, name, _refusing(name, refuse))


def _mutating(name: str) -> bool:
    attribute = getattr(RDSResponse, name, None)
    return (callable(attribute) and not name.startswith(("_", "describe_", "list_", "get_"))
            and attribute.__module__ == "moto.rds.responses")


def _refusing(name: str, refuse: Any) -> Any:
    action = "".join(part.capitalize() for part in name.split("_")).replace("Db", "DB")

    def refused(self: RDSResponse) -> ActionResult:
        raise refuse(action, "not implemented by the sandbox's RDS data plane")
    return refused


def _open_to_clients(instance: DBInstance) -> bool:
    """Whether any of the instance's security groups lets anything in (a group without ingress rules is a fence)."""
    from moto.ec2.models import ec2_backends

    ec2 = ec2_backends[instance.account_id][instance.region]
    groups = [ec2.get_security_group_by_name_or_id(g, None) for g in instance.vpc_security_group_ids]
    return any(g is not None and g.ingress_rules for g in groups)


def run(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--rds-data-plane", type=Path)
    parser.add_argument("--os-user", default="drplan-pg")
    parser.add_argument("--archive-timeout", type=int, default=60)
    args, moto_args = parser.parse_known_args(argv)
    RDSBackend.promote_read_replica = promote_read_replica
    DBInstance.remove_replica = remove_replica
    if args.rds_data_plane:
        from sandbox.rds_data_plane import DataPlane

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        host = moto_args[moto_args.index("-H") + 1] if "-H" in moto_args else "127.0.0.1"
        port = moto_args[moto_args.index("-p") + 1] if "-p" in moto_args else "5000"
        install_data_plane(DataPlane(args.rds_data_plane, args.os_user, f"http://{host}:{port}",
                                     args.archive_timeout))
    main(moto_args)


if __name__ == "__main__":
    run(sys.argv[1:])
