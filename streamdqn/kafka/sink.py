"""The producer side: dead letters (original bytes plus why and where from) and snapshot announcements."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from streamdqn.kafka.options import KafkaOptions, client_security, stop_client
from streamdqn.stream.sources import DeadLetter

# Brokers refuse records above message.max.bytes (1 MB by default): a larger bad record is dead-lettered
# truncated, with its full size in a header; the original stays in the source topic at the offset named.
DLQ_MAX_VALUE_BYTES = 512 * 1024


class KafkaSink:
    """Writes dead letters to `dlq_topic` and announcements to `snapshot_topic` (either may be off)."""

    def __init__(self, options: KafkaOptions) -> None:
        self.options = options
        self._producer: AIOKafkaProducer | None = None

    async def start(self) -> None:
        o = self.options
        producer = AIOKafkaProducer(
            bootstrap_servers=o.bootstrap_servers, client_id=o.client_id, acks="all",
            request_timeout_ms=o.request_timeout_ms, max_request_size=16 * 1024 * 1024,
            **client_security(o),
        )
        try:
            await producer.start()
        except BaseException:
            await producer.stop()
            raise
        self._producer = producer

    async def stop(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            await stop_client(producer, "producer")

    async def dead_letter(self, letters: Sequence[DeadLetter]) -> None:
        """Write dead letters and wait for every acknowledgement (raises if one fails)."""
        if not letters or not self.options.dlq_topic:
            return
        assert self._producer is not None
        futures = []
        for letter in letters:
            r = letter.record
            headers = [
                *r.headers,
                ("streamdqn-reason", letter.reason.encode()),
                ("streamdqn-error", letter.detail.encode()[:2000]),
                ("streamdqn-source-topic", r.topic.encode()),
                ("streamdqn-source-partition", str(r.partition).encode()),
                ("streamdqn-source-offset", str(r.offset).encode()),
            ]
            value = r.value
            if len(value) > DLQ_MAX_VALUE_BYTES:
                headers.append(("streamdqn-truncated-from", str(len(value)).encode()))
                value = value[:DLQ_MAX_VALUE_BYTES]
            futures.append(await self._producer.send(self.options.dlq_topic, value, key=r.key,
                                                     headers=headers))
        await asyncio.gather(*futures)

    async def announce(self, payload: bytes) -> None:
        if self.options.snapshot_topic and self._producer is not None:
            await self._producer.send_and_wait(self.options.snapshot_topic, payload)

    async def broker_reachable(self) -> bool:
        producer = self._producer
        if producer is None:
            return False
        try:
            await asyncio.wait_for(producer.client.fetch_all_metadata(), timeout=5)
            return True
        except (KafkaError, TimeoutError, OSError):
            return False
