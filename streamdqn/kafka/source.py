"""Record sources: Kafka (aiokafka consumer group) for the daemon, memory for tests and tools.

A source hands out raw records: decoding is streamdqn's own job (telemetry.decode), never
aiokafka's value_deserializer, since a failing deserializer would redeliver the record forever.
Only this module imports aiokafka.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError
from aiokafka.helpers import create_ssl_context

from streamdqn.stream.sources import DeadLetter, PartitionsCallback, Record

log = logging.getLogger(__name__)

# Brokers refuse records above message.max.bytes (1 MB by default): a larger bad record is dead-lettered
# truncated, with its full size in a header; the original stays in the source topic at the offset named.
DLQ_MAX_VALUE_BYTES = 512 * 1024


@dataclass(frozen=True)
class KafkaOptions:
    """The values KafkaSource needs, as plain values (parsed from settings at the edge)."""

    bootstrap_servers: str
    topic: str
    group_id: str
    dlq_topic: str = ""
    snapshot_topic: str = ""
    client_id: str = "streamdqn"
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str = "PLAIN"
    sasl_plain_username: str = ""
    sasl_plain_password: str = field(default="", repr=False)
    ssl_cafile: str = ""
    ssl_certfile: str = ""
    ssl_keyfile: str = ""
    max_poll_records: int = 2000
    fetch_max_bytes: int = 8 * 1024 * 1024
    max_partition_fetch_bytes: int = 1024 * 1024
    request_timeout_ms: int = 15_000


def consumer_settings(o: KafkaOptions) -> dict[str, object]:
    """KafkaSource's consumer settings, security aside (bench/ingest.py's raw ceiling uses the same)."""
    return {
        "bootstrap_servers": o.bootstrap_servers,
        "group_id": o.group_id,
        "client_id": o.client_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "max_poll_records": o.max_poll_records,
        "fetch_max_bytes": o.fetch_max_bytes,
        "max_partition_fetch_bytes": o.max_partition_fetch_bytes,
        "request_timeout_ms": o.request_timeout_ms,
    }


def client_security(o: KafkaOptions) -> dict[str, object]:
    """aiokafka keyword arguments for TLS and SASL (shared by consumer, producer and admin client)."""
    kw: dict[str, object] = {"security_protocol": o.security_protocol}
    if o.security_protocol in ("SSL", "SASL_SSL"):
        kw["ssl_context"] = create_ssl_context(
            cafile=o.ssl_cafile or None, certfile=o.ssl_certfile or None, keyfile=o.ssl_keyfile or None
        )
    if o.security_protocol.startswith("SASL"):
        kw["sasl_mechanism"] = o.sasl_mechanism
        kw["sasl_plain_username"] = o.sasl_plain_username
        kw["sasl_plain_password"] = o.sasl_plain_password
    return kw


async def _stop_client(client: AIOKafkaConsumer | AIOKafkaProducer, what: str) -> None:
    """Stop an aiokafka client, also when the broker is gone.

    Then aiokafka 0.14's consumer.stop() raises the CancelledError of a fetch it cancelled itself
    (Fetcher.close awaits the tasks it has just cancelled): that must not turn a clean shutdown into
    a crash, but a cancellation of our own task must still propagate.
    """
    try:
        await client.stop()
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise
        log.warning("the Kafka %s did not stop cleanly (broker unreachable)", what)
    except (KafkaError, OSError) as exc:
        log.warning("the Kafka %s did not stop cleanly: %r", what, exc)


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, source: KafkaSource) -> None:
        self.source = source

    async def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        parts = {tp.partition for tp in revoked if tp.topic == self.source.options.topic}
        if parts and self.source.on_revoked is not None:
            await self.source.on_revoked(parts)

    async def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        parts = {tp.partition for tp in assigned if tp.topic == self.source.options.topic}
        await self.source._seek_assigned(parts)
        if self.source.on_assigned is not None:
            await self.source.on_assigned(parts)


class KafkaSource:
    """A consumer-group member on one topic, plus a producer for dead letters and announcements.

    `start_offsets` (partition -> next offset), set before or during a rebalance, decides where an
    assigned partition is read from: the larger of it and the group's committed offset.
    """

    def __init__(
        self,
        options: KafkaOptions,
        *,
        on_assigned: PartitionsCallback | None = None,
        on_revoked: PartitionsCallback | None = None,
    ) -> None:
        self.options = options
        self.on_assigned = on_assigned
        self.on_revoked = on_revoked
        self.start_offsets: dict[int, int] = {}
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._paused = False
        self._unverified: dict[int, int] = {}  # partition -> offset seeked to, until a fetch confirms it

    async def start(self) -> None:
        o = self.options
        security = client_security(o)
        consumer = AIOKafkaConsumer(**consumer_settings(o), **security)
        producer = AIOKafkaProducer(
            bootstrap_servers=o.bootstrap_servers, client_id=o.client_id, acks="all",
            request_timeout_ms=o.request_timeout_ms, max_request_size=16 * 1024 * 1024, **security,
        )
        try:
            await producer.start()
            await consumer.start()
        except BaseException:
            await producer.stop()
            await consumer.stop()
            raise
        consumer.subscribe([o.topic], listener=_Rebalance(self))
        self._consumer, self._producer = consumer, producer

    async def stop(self) -> None:
        consumer, producer = self._consumer, self._producer
        self._consumer = self._producer = None
        try:
            if consumer is not None:
                await _stop_client(consumer, "consumer")
        finally:
            if producer is not None:
                await _stop_client(producer, "producer")

    async def _seek_assigned(self, partitions: set[int]) -> None:
        assert self._consumer is not None
        for p in partitions:
            tp = TopicPartition(self.options.topic, p)
            checkpointed = self.start_offsets.get(p)
            if checkpointed is None:
                continue
            try:
                committed = await self._consumer.committed(tp)
            except KafkaError:
                committed = None
            offset = max(checkpointed, committed or 0)
            self._consumer.seek(tp, offset)
            self._unverified[p] = offset
        if self._paused:
            self.pause()

    async def fetch(self, timeout_ms: int) -> list[Record]:
        assert self._consumer is not None, "KafkaSource.fetch before start"
        batches = await self._consumer.getmany(timeout_ms=timeout_ms)
        if self._unverified:
            await self._reset_beyond_the_end({tp.partition for tp in batches})
        return [
            Record(m.topic, m.partition, m.offset, m.value or b"", m.key, tuple(m.headers or ()))
            for messages in batches.values()
            for m in messages
        ]

    async def _reset_beyond_the_end(self, delivered: set[int]) -> None:
        """Read from the beginning a partition whose seeked offset lies beyond the end of its log.

        That means the log was lost or recreated (a broker with memory storage restarted, a topic
        deleted and created again). Kafka answers such a fetch with OFFSET_OUT_OF_RANGE and the
        consumer resets by itself, but some brokers (tansu) return nothing and the high watermark,
        so the new records below the old offset would never be read. The offset is also reset in
        start_offsets, which the daemon checkpoints: a later restart must not seek back to the stale
        offset and skip the new records. (The high watermark of the fetch response is used, not
        end_offsets(): tansu's ListOffsets answers the last batch's base offset + 1.)
        """
        consumer = self._consumer
        assert consumer is not None
        assigned = self.assignment()
        for p, offset in list(self._unverified.items()):
            tp = TopicPartition(self.options.topic, p)
            if p in delivered or p not in assigned:
                del self._unverified[p]
                continue
            highwater = consumer.highwater(tp)
            if highwater is None:
                continue  # not fetched yet (or paused)
            del self._unverified[p]
            if offset <= highwater:
                continue
            try:
                begin = (await consumer.beginning_offsets([tp])).get(tp, 0)
            except KafkaError:
                begin = 0
            log.warning("partition %d: offset %d is beyond the end of the log (%d): the log was lost or "
                        "recreated; reading it from the beginning (%d)", p, offset, highwater, begin)
            if p in self.assignment():
                consumer.seek(tp, begin)
                self.start_offsets[p] = begin

    def assignment(self) -> set[int]:
        if self._consumer is None:
            return set()
        return {tp.partition for tp in self._consumer.assignment() if tp.topic == self.options.topic}

    def highwater(self) -> dict[int, int]:
        """Per assigned partition, the high watermark seen in the last fetch response."""
        consumer = self._consumer
        if consumer is None:
            return {}
        marks = {tp.partition: consumer.highwater(tp) for tp in consumer.assignment()}
        return {p: h for p, h in marks.items() if h is not None}

    def pause(self) -> None:
        self._paused = True
        if self._consumer is not None:
            self._consumer.pause(*self._consumer.assignment())

    def resume(self) -> None:
        self._paused = False
        if self._consumer is not None:
            self._consumer.resume(*self._consumer.assignment())

    async def commit(self, offsets: dict[int, int]) -> None:
        if self._consumer is None or not offsets:
            return
        mine = self.assignment()
        tps = {TopicPartition(self.options.topic, p): o for p, o in offsets.items() if p in mine}
        if tps:
            await self._consumer.commit(tps)

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
