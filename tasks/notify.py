"""Sending to a Prefect notification block by name (Slack webhook, SMS, email, custom webhook: any block that can
notify). A notification never fails the run that sends it: the result says what went wrong."""

from __future__ import annotations

from prefect.blocks.core import Block

from drplan.errors import first_line
from drplan.notification_blocks import notification_blocks


def missing(blocks: dict[str, str]) -> dict[str, str]:
    """The entries of `blocks` (field -> block name) naming no notification block in the Prefect API."""
    existing = {d.name for d in notification_blocks()}
    return {field: name for field, name in blocks.items() if name not in existing}


def send(block_name: str, subject: str, body: str) -> str | None:
    """Notify through block `block_name`; None when sent, else why not (in one line)."""
    try:
        found = next((d for d in notification_blocks() if d.name == block_name and d.block_type), None)
        if found is None:
            return f"no notification block named {block_name!r}"
        block = Block.load(f"{found.block_type.slug}/{block_name}")
        block.notify(body, subject=subject)
    except Exception as exc:  # noqa: BLE001 - a channel that is down must not stop a recovery
        return first_line(exc)
    return None
