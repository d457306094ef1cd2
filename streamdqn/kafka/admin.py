"""Topic administration: create what the daemon writes to when it does not exist yet."""

from __future__ import annotations

import contextlib

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from streamdqn.errors import ConfigError
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


async def ensure_copartitioned(options: KafkaOptions, telemetry: str, verdicts: str) -> None:
    """Create the verdicts topic with the telemetry topic's partition count if it does not exist;
    refuse to go on (ConfigError) when both exist with different counts.

    Verdicts are keyed by sandbox_id like telemetry, so with equal counts an episode's verdict lands in
    the partition number its telemetry does, which the range assignor gives to the same member.
    """
    admin = AIOKafkaAdminClient(
        bootstrap_servers=options.bootstrap_servers, client_id=options.client_id, **client_security(options)
    )
    await admin.start()
    try:
        counts = await _partition_counts(admin, [telemetry, verdicts])
        if verdicts not in counts and telemetry in counts:
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics([NewTopic(verdicts, counts[telemetry], 1)])
            counts = await _partition_counts(admin, [telemetry, verdicts])
    finally:
        await admin.close()
    if telemetry in counts and verdicts in counts and counts[telemetry] != counts[verdicts]:
        raise ConfigError(
            f"topic {telemetry!r} has {counts[telemetry]} partitions and {verdicts!r} {counts[verdicts]}: "
            f"verdicts must be co-partitioned with telemetry (both keyed by sandbox_id, the same number of "
            f"partitions) so that an episode and its verdict reach the same daemon; recreate {verdicts!r} "
            f"with {counts[telemetry]} partitions"
        )


async def _partition_counts(admin: AIOKafkaAdminClient, topics: list[str]) -> dict[str, int]:
    existing = set(await admin.list_topics())
    wanted = [t for t in topics if t in existing]
    if not wanted:
        return {}
    described = await admin.describe_topics(wanted)
    return {d["topic"]: len(d["partitions"]) for d in described if not d.get("error_code")}
