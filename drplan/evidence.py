"""Evidence history: every DR test report kept in the plan's evidence location (an S3 prefix or a local
directory) as an append-only hash chain.

Record n is `<location>/<n:08d>.json`, canonical JSON: the report, the sequence number n, when it was recorded,
`previous` (the SHA-256 of record n-1; null for record 1) and `sha256`, the hash of the record itself (its JSON
without that field, drplan/canonical.py). A record is never overwritten and never half visible: on S3 it is one
PUT with `If-None-Match: *`; in a directory it is written to a hidden temporary file, synced, then hard-linked to
its name (which fails if the name exists). `verify` walks the chain from record 1 and names the first record that
is missing, altered or not linked to the one before. Removing the newest records leaves a shorter intact chain:
compare the head hash with one kept elsewhere (each DR test report names its record and hash).
"""

from __future__ import annotations

import json
import os
import re
import secrets
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from botocore.exceptions import BotoCoreError, ClientError
from pydantic import AwareDatetime, BaseModel

from drplan.canonical import digest, seal
from drplan.clients import aws_client
from drplan.errors import DrplanError
from drplan.plan import Plan
from drplan.s3store import describe, error_code, fatal, parse_prefix
from drplan.timeutil import utcnow

FORMAT = "drplan-evidence/1"
QUARTER = timedelta(days=92)
"""A DR test is due every quarter; readiness allows the plan's `evidence.grace` on top."""
_NAME = re.compile(r"^(\d{8})\.json$")


def record_name(sequence: int) -> str:
    return f"{sequence:08d}.json"


class Record(BaseModel):
    format: str = FORMAT
    sequence: int
    recorded_at: AwareDatetime
    previous: str | None
    report: dict[str, Any]
    sha256: str


class Store(Protocol):
    location: str

    def names(self) -> list[str]:
        """Every name directly in the location."""

    def read(self, name: str) -> bytes | None:
        """A record's bytes, None when there is none of that name."""

    def create(self, name: str, data: bytes) -> None:
        """Write a new record; DrplanError when the name exists (a record is never overwritten)."""

    def where(self, name: str) -> str:
        """The full location of one record, for messages."""


class DirStore:
    """A local directory (the sandbox)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.location = str(path)

    def names(self) -> list[str]:
        return [p.name for p in self.path.iterdir()] if self.path.is_dir() else []

    def read(self, name: str) -> bytes | None:
        try:
            return (self.path / name).read_bytes()
        except FileNotFoundError:
            return None

    def create(self, name: str, data: bytes) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        temporary = self.path / f".{name}.{secrets.token_hex(4)}.tmp"
        try:
            with temporary.open("xb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.link(temporary, self.path / name)  # atomic, and refuses an existing name
        except FileExistsError:
            raise DrplanError(f"{self.where(name)} already exists: another DR test appended it; rerun") from None
        finally:
            temporary.unlink(missing_ok=True)
        directory = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    def where(self, name: str) -> str:
        return str(self.path / name)


class S3Store:
    """An S3 prefix: records are written with If-None-Match: * (S3 refuses to overwrite one)."""

    def __init__(self, s3, uri: str) -> None:
        self.s3 = s3
        self.bucket, self.prefix = parse_prefix(uri)
        self.location = f"s3://{self.bucket}/{self.prefix}"

    def names(self) -> list[str]:
        try:
            pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix,
                                                                      Delimiter="/")
            return [obj["Key"][len(self.prefix):] for page in pages for obj in page.get("Contents", [])]
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, "listing", self.location) from None

    def read(self, name: str) -> bytes | None:
        try:
            return self.s3.get_object(Bucket=self.bucket, Key=self.prefix + name)["Body"].read()
        except ClientError as exc:
            if error_code(exc) in ("NoSuchKey", "404"):
                return None
            raise self._error(exc, "reading", self.where(name)) from None
        except BotoCoreError as exc:
            raise self._error(exc, "reading", self.where(name)) from None

    def create(self, name: str, data: bytes) -> None:
        try:
            self.s3.put_object(Bucket=self.bucket, Key=self.prefix + name, Body=data, IfNoneMatch="*",
                               ContentType="application/json")
        except ClientError as exc:
            if error_code(exc) in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                raise DrplanError(f"{self.where(name)} already exists: another DR test appended it; rerun") from None
            raise self._error(exc, "writing", self.where(name)) from None
        except BotoCoreError as exc:
            raise self._error(exc, "writing", self.where(name)) from None

    def where(self, name: str) -> str:
        return f"{self.location}{name}"

    @staticmethod
    def _error(exc: Exception, action: str, uri: str) -> DrplanError:
        return fatal(exc, action, uri) or DrplanError(f"{action} {uri}: {describe(exc)}")


def open_store(plan: Plan) -> Store:
    """The store of the plan's `evidence.location`."""
    if plan.evidence is None:
        raise DrplanError(f"plan {plan.name} has no evidence: section; add evidence: {{location: "
                          "s3://bucket/prefix/}} (or a directory)")
    location = plan.evidence.location
    if location.startswith("s3://"):
        return S3Store(aws_client(plan, "s3"), location)
    return DirStore(plan.resolve_path(location))


def sequences(store: Store) -> list[int]:
    """The sequence numbers of the records present, ascending (other names, e.g. temporary files, ignored)."""
    return sorted(int(m.group(1)) for name in store.names() if (m := _NAME.match(name)))


def _read(store: Store, sequence: int) -> Record | str:
    """Record `sequence` with its own hash checked, else the problem as one line naming it."""
    where = store.where(record_name(sequence))
    raw = store.read(record_name(sequence))
    if raw is None:
        return f"record {sequence} ({where}) is missing"
    try:
        body = json.loads(raw)
        claimed = body.pop("sha256")
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"record {sequence} ({where}) is altered: not JSON with a sha256 field"
    if digest(body) != claimed:
        return f"record {sequence} ({where}) is altered: its SHA-256 does not match its content"
    try:
        record = Record.model_validate(body | {"sha256": claimed})
    except ValueError:
        return f"record {sequence} ({where}) is not a {FORMAT} record"
    if record.format != FORMAT or record.sequence != sequence:
        return f"record {sequence} ({where}) is altered: it says it is record {record.sequence} of {record.format}"
    return record


def newest(store: Store) -> Record | None:
    """The newest record (its own hash checked), None when the chain is empty."""
    present = sequences(store)
    if not present:
        return None
    record = _read(store, present[-1])
    if isinstance(record, str):
        raise DrplanError(f"{record}; run drplan evidence verify")
    return record


def append(store: Store, report: dict[str, Any], at: datetime | None = None) -> Record:
    """Add `report` as the next record, linked to the newest one (refused when that one is damaged)."""
    head = newest(store)
    body = {"format": FORMAT, "sequence": head.sequence + 1 if head else 1,
            "recorded_at": (at or utcnow()).isoformat(), "previous": head.sha256 if head else None,
            "report": report}
    record = Record.model_validate(body | {"sha256": digest(body)})  # a naive time is refused before writing
    store.create(record_name(record.sequence), seal(body))
    return record


class ChainCheck(BaseModel):
    location: str
    records: int
    """Records verified (up to the first problem)."""
    head: str | None = None
    """The hash of the last verified record."""
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None

    @property
    def summary(self) -> str:
        if self.ok:
            return f"{self.location}: chain intact, {self.records} records, head {self.head or '(empty)'}"
        return f"{self.location}: chain BROKEN after {self.records} intact records: {self.problem}"


def verify(store: Store) -> ChainCheck:
    """Walk the chain from record 1: the first record missing (a gap in the sequence), altered (its hash) or not
    linked to the one before is the problem."""
    present = sequences(store)
    check = ChainCheck(location=store.location, records=0)
    for sequence in range(1, (present[-1] if present else 0) + 1):
        record = _read(store, sequence)
        if isinstance(record, str):
            check.problem = record + ("" if sequence in present else _gap(sequence, present))
            return check
        if record.previous != check.head:
            check.problem = (f"record {sequence} ({store.where(record_name(sequence))}) does not link to record "
                             f"{sequence - 1}: it names previous {record.previous}, record {sequence - 1} has "
                             f"{check.head}")
            return check
        check.records, check.head = sequence, record.sha256
    return check


def _gap(missing: int, present: list[int]) -> str:
    after = next(s for s in present if s > missing)
    return f": after record {missing - 1} comes record {after}" if missing > 1 else \
        f": the first record present is {after}"


def history(store: Store) -> list[Record | str]:
    """Every record present, oldest first: as read (its own hash checked), or the line saying what is wrong."""
    return [_read(store, sequence) for sequence in sequences(store)]
