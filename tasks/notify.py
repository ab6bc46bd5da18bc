"""Sending to a Prefect notification block by name (Slack webhook, SMS, email, custom webhook: any block that can
notify). A notification never fails the run that sends it: the result says what went wrong."""

from __future__ import annotations

from prefect.blocks.core import Block
from prefect.client.orchestration import get_client

from drplan.errors import first_line


def send(block_name: str, subject: str, body: str) -> str | None:
    """Notify through block `block_name`; None when sent, else why not (in one line)."""
    try:
        with get_client(sync_client=True) as client:
            found = [d for d in client.read_block_documents(include_secrets=False)
                     if d.name == block_name and d.block_type
                     and "notify" in (d.block_schema.capabilities if d.block_schema else [])]
        if not found:
            return f"no notification block named {block_name!r}"
        block = Block.load(f"{found[0].block_type.slug}/{block_name}")
        block.notify(body, subject=subject)
    except Exception as exc:  # noqa: BLE001 - a channel that is down must not stop a recovery
        return first_line(exc)
    return None
