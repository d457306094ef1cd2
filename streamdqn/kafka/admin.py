"""Topic administration: create what the daemon writes to when it does not exist yet."""

from __future__ import annotations

import contextlib

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from streamdqn.kafka.options import KafkaOptions, client_security


async def ensure_topics(options: KafkaOptions, topics: dict[str, int]) -> None:
    """Create topics (name -> partitions) that do not exist yet."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=options.bootstrap_servers, client_id=options.client_id, **client_security(options)
    )
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        new = [NewTopic(name, parts, 1) for name, parts in topics.items() if name and name not in existing]
        if new:
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(new)
    finally:
        await admin.close()
