"""Canonical JSON and the self-checksum sealed into it: bucket backup manifests and evidence records both carry
the SHA-256 of their own canonical JSON (the document without that field) as their last field, `sha256`."""

from __future__ import annotations

import hashlib
import json


def canonical(body: dict) -> bytes:
    """Keys sorted, no whitespace: the same document always gives the same bytes."""
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def digest(body: dict) -> str:
    """SHA-256 (hex) of the canonical JSON of `body`."""
    return hashlib.sha256(canonical(body)).hexdigest()


def seal(body: dict) -> bytes:
    """Canonical JSON of `body` with `sha256` (its digest) added."""
    return canonical(body | {"sha256": digest(body)})
