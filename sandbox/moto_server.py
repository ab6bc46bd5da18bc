"""The sandbox's AWS: moto_server, plus the one RDS behaviour drplan relies on that moto 5 lacks. RDS clears
ReadReplicaSourceDBInstanceIdentifier when it promotes a read replica (that is how a caller sees the promotion is
done); moto only flips an internal flag. Run as `python -m sandbox.moto_server -H HOST -p PORT`."""

from __future__ import annotations

import sys
from typing import Any

from moto.rds.models import RDSBackend
from moto.server import main

_moto_promote = RDSBackend.promote_read_replica


def promote_read_replica(self: RDSBackend, db_kwargs: dict[str, Any]) -> Any:
    replica = self.databases[db_kwargs["db_instance_identifier"]]
    source_id = replica.source_db_instance_identifier
    promoted = _moto_promote(self, db_kwargs)
    if source_id:
        source = self.find_db_from_id(source_id)
        for ref in (replica.db_instance_arn, replica.db_instance_identifier):
            if ref in source.replicas:
                source.replicas.remove(ref)
        replica.source_db_instance_identifier = None
    return promoted


RDSBackend.promote_read_replica = promote_read_replica

if __name__ == "__main__":
    main(sys.argv[1:])
