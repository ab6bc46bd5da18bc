"""The Prefect blocks that can notify (Slack webhook, SMS, email, custom webhook: any type whose schema has the
`notify` capability), as the notifications and the automations find them."""

from __future__ import annotations

from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import BlockDocument


def notification_blocks() -> list[BlockDocument]:
    """Every named block document in the Prefect API that can notify; secrets are not read."""
    with get_client(sync_client=True) as client:
        return [d for d in client.read_block_documents(include_secrets=False)
                if d.name and "notify" in (d.block_schema.capabilities if d.block_schema else [])]
