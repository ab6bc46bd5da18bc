"""Bucket backup manifests: the layout, reading and writing them, and comparing a listing against one.

Layout: `<backup>/<YYYYMMDDTHHMMSSZ>/<key>` for the copies and, written last, `<backup>/<stamp>.manifest.json`;
a backup without its manifest is incomplete. A manifest lists every object of one backup (key relative to
the backup prefix, size, ETag of the backup copy, and the store's content checksum where it returned one)
and carries the SHA-256 of its own canonical JSON, so a truncated or edited manifest is detected.
"""

from __future__ import annotations

import json
import re

from botocore.exceptions import BotoCoreError, ClientError
from pydantic import AwareDatetime, BaseModel, ValidationError

from drplan.canonical import digest, seal
from drplan.errors import DrplanError
from drplan.s3store import S3Object, describe, error_code, fatal, parse_prefix

STAMP = "%Y%m%dT%H%M%SZ"
MANIFEST_SUFFIX = ".manifest.json"
_STAMP_DIR = re.compile(r"(?:^|/)(\d{8}T\d{6}Z)/$")
_MANIFEST_KEY = re.compile(r"(\d{8}T\d{6}Z)\.manifest\.json$")
FORMAT = "drplan-bucket-backup/1"
SAMPLE = 20
"""How many keys of each kind a summary line names."""


class ManifestEntry(BaseModel):
    key: str
    size: int
    etag: str
    checksum: str | None = None
    """`ALGORITHM:base64` as the store computed it for the copy (e.g. SHA256), when it returned one."""


class Manifest(BaseModel):
    format: str = FORMAT
    source: str
    backup: str
    taken_at: AwareDatetime
    completed_at: AwareDatetime
    objects: list[ManifestEntry]

    @property
    def bytes(self) -> int:
        return sum(entry.size for entry in self.objects)

    def expected(self) -> dict[str, S3Object]:
        return {entry.key: S3Object(entry.size, entry.etag) for entry in self.objects}

    def checksums(self) -> dict[str, str]:
        return {entry.key: entry.checksum for entry in self.objects if entry.checksum}

    def dump(self) -> bytes:
        """Canonical JSON with `sha256` (of the JSON without it) as the last field."""
        return seal(self.model_dump(mode="json"))

    @classmethod
    def load(cls, raw: bytes, where: str) -> Manifest:
        """Parse and check the self-checksum; a damaged manifest is a DrplanError naming `where`."""
        try:
            body = json.loads(raw)
            claimed = body.pop("sha256")
        except (ValueError, KeyError, TypeError, AttributeError):
            raise DrplanError(f"{where}: manifest is not valid JSON with a sha256 field; the backup is "
                              "unverifiable") from None
        if digest(body) != claimed:
            raise DrplanError(f"{where}: manifest checksum mismatch (damaged or edited); the backup is unverifiable")
        try:
            manifest = cls.model_validate(body)
        except ValidationError as exc:
            raise DrplanError(f"{where}: manifest does not match {FORMAT}: {exc.errors()[0]['msg']}") from None
        if manifest.format != FORMAT:
            raise DrplanError(f"{where}: unknown manifest format {manifest.format!r}; expected {FORMAT}")
        return manifest


class Verification(BaseModel):
    """A listing compared with what it should hold. `verified` is False when there was nothing to compare
    with (no manifest): then only what listing shows was checked."""

    location: str
    verified: bool
    objects: int
    bytes: int
    missing: list[str] = []
    corrupt: list[str] = []
    extra: list[str] = []
    unconfirmed: list[str] = []
    """Copied, but the store returned nothing comparable (ETag kinds differ and no checksum): size-only."""
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.verified and not (self.missing or self.corrupt or self.extra)

    @property
    def summary(self) -> str:
        if self.ok:
            size_only = f" ({len(self.unconfirmed)} by size only)" if self.unconfirmed else ""
            return f"{self.location}: verified, {self.objects} objects, {self.bytes} bytes{size_only}"
        status = "does not match its manifest" if self.verified else "UNVERIFIED"
        parts = [f"{len(keys)} {name} ({_sample(keys)})" for name, keys in
                 (("missing", self.missing), ("corrupt", self.corrupt), ("extra", self.extra),
                  ("unconfirmed", self.unconfirmed)) if keys]
        detail = "; ".join(parts + ([self.note] if self.note else []))
        return f"{self.location}: {status}" + (f": {detail}" if detail else "")


def _sample(keys: list[str]) -> str:
    shown = ", ".join(keys[:SAMPLE])
    return shown + (f", ... {len(keys) - SAMPLE} more" if len(keys) > SAMPLE else "")


def compare(location: str, expected: dict[str, S3Object], actual: dict[str, S3Object], *, verified: bool = True,
            ignore_extra: bool = False, note: str = "") -> Verification:
    """Every expected key present with the same size and ETag; with `ignore_extra`, more keys are fine."""
    return Verification(
        location=location, verified=verified,
        objects=sum(1 for key in expected if key in actual),
        bytes=sum(obj.size for key, obj in expected.items() if key in actual),
        missing=sorted(expected.keys() - actual.keys()),
        corrupt=sorted(key for key, obj in expected.items() if key in actual and actual[key] != obj),
        extra=[] if ignore_extra else sorted(actual.keys() - expected.keys()),
        note=note,
    )


def manifest_uri(backup_dir: str) -> str:
    """s3://b/data/20260101T000000Z/ -> s3://b/data/20260101T000000Z.manifest.json"""
    bucket, prefix = parse_prefix(backup_dir)
    return f"s3://{bucket}/{prefix.rstrip('/')}{MANIFEST_SUFFIX}"


def read_manifest(s3, backup_dir: str) -> Manifest | None:
    """The manifest of one backup, None when there is none (the backup is incomplete or not ours)."""
    uri = manifest_uri(backup_dir)
    bucket, _, key = uri[5:].partition("/")
    try:
        raw = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as exc:
        if error_code(exc) in ("NoSuchKey", "404"):
            return None
        raise fatal(exc, "reading", uri) or DrplanError(f"reading {uri}: {describe(exc)}") from None
    except BotoCoreError as exc:
        raise DrplanError(f"reading {uri}: {describe(exc)}") from None
    return Manifest.load(raw, uri)


def write_manifest(s3, backup_dir: str, manifest: Manifest) -> str:
    uri = manifest_uri(backup_dir)
    bucket, _, key = uri[5:].partition("/")
    s3.put_object(Bucket=bucket, Key=key, Body=manifest.dump(), ContentType="application/json")
    return uri


def stamp_of(uri: str) -> str | None:
    """The backup stamp a URI names (s3://b/data/20260101T000000Z/ -> 20260101T000000Z), else None."""
    match = _STAMP_DIR.search(parse_prefix(uri)[1])
    return match.group(1) if match else None


def backups(s3, backup_root: str) -> tuple[list[str], list[str]]:
    """(complete, all) backup stamps directly under `backup_root`, oldest first; complete = manifest written."""
    bucket, prefix = parse_prefix(backup_root)
    complete, directories = [], []
    try:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
            complete += [m.group(1) for obj in page.get("Contents", []) if (m := _MANIFEST_KEY.search(obj["Key"]))]
            directories += [m.group(1) for p in page.get("CommonPrefixes", []) if (m := _STAMP_DIR.search(p["Prefix"]))]
    except (ClientError, BotoCoreError) as exc:
        raise fatal(exc, "listing", backup_root) or DrplanError(f"listing {backup_root}: {describe(exc)}") from None
    return sorted(complete), sorted(set(directories) | set(complete))


def resolve_backup(s3, uri: str) -> str:
    """The directory to restore from: `uri` itself when it names a stamp or holds no backups, else the newest
    complete backup under it, so that a backup root is never restored wholesale."""
    bucket, prefix = parse_prefix(uri)
    if stamp_of(uri):
        return f"s3://{bucket}/{prefix}"
    complete, every = backups(s3, uri)
    if complete:
        return f"s3://{bucket}/{prefix}{complete[-1]}/"
    if every:
        raise DrplanError(f"{uri} holds {len(every)} backups but none is complete (no manifest); name one "
                          f"explicitly, e.g. s3://{bucket}/{prefix}{every[-1]}/")
    return f"s3://{bucket}/{prefix}"
