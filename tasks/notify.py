"""Sending to a Prefect notification block by name (Slack webhook, SMS, email, custom webhook: any block that can
notify). A notification never fails the run that sends it: the result says what went wrong."""

from __future__ import annotations

from prefect.blocks.core import Block
from prefect.client.orchestration import get_client

from drplan.errors import first_line


def _notification_blocks() -> dict[str, str]:
    """Name -> block type slug of every block that can notify."""
    with get_client(sync_client=True) as client:
        return {d.name: d.block_type.slug for d in client.read_block_documents(include_secrets=False)
                if d.name and d.block_type and "notify" in (d.block_schema.capabilities if d.block_schema else [])}


def missing(blocks: dict[str, str]) -> dict[str, str]:
    """The entries of `blocks` (field -> block name) naming no notification block in the Prefect API."""
    existing = _notification_blocks()
    return {field: name for field, name in blocks.items() if name not in existing}


def send(block_name: str, subject: str, body: str) -> str | None:
    """Notify through block `block_name`; None when sent, else why not (in one line)."""
    try:
        slug = _notification_blocks().get(block_name)
        if slug is None:
            return f"no notification block named {block_name!r}"
        block = Block.load(f"{slug}/{block_name}")
        block.notify(body, subject=subject)
    except Exception as exc:  # noqa: BLE001 - a channel that is down must not stop a recovery
        return first_line(exc)
    return None
