"""The telemetry consumer: a Kafka consumer-group member that hands out raw records.

Decoding is streamdqn's own job (streamdqn.stream), never aiokafka's value_deserializer, since a
failing deserializer would redeliver the record forever.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.errors import KafkaError

from streamdqn.kafka.options import KafkaOptions, client_security, consumer_settings, stop_client
from streamdqn.stream.sources import Partition, PartitionsCallback, Record

log = logging.getLogger(__name__)


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, source: KafkaSource) -> None:
        self.source = source

    async def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        parts = {tp.partition for tp in revoked if tp.topic == self.source.options.topic}
        if parts and self.source.on_revoked is not None:
            await self.source.on_revoked(parts)

    async def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        await self.source._seek_assigned({(tp.topic, tp.partition) for tp in assigned})
        parts = {tp.partition for tp in assigned if tp.topic == self.source.options.topic}
        if self.source.on_assigned is not None:
            await self.source.on_assigned(parts)


class KafkaSource:
    """A consumer-group member on the telemetry topic and, when set, the verdicts topic.

    Both topics are assigned with the range assignor, so that with equal partition counts the same
    member owns partition p of both (co-partitioned by sandbox_id: an episode's telemetry and its
    verdict meet in one daemon). `start_offsets` ((topic, partition) -> next offset), set before or
    during a rebalance, decides where an assigned partition is read from: the largest of it, the
    group's committed offset and what `handed_over()` reports (the offsets other members' checkpoints
    cover, which may be ahead of their last successful commit).
    """

    def __init__(
        self,
        options: KafkaOptions,
        *,
        on_assigned: PartitionsCallback | None = None,
        on_revoked: PartitionsCallback | None = None,
        handed_over: Callable[[], Mapping[Partition, int]] | None = None,
    ) -> None:
        self.options = options
        self.on_assigned = on_assigned
        self.on_revoked = on_revoked
        self.handed_over = handed_over
        self.start_offsets: dict[Partition, int] = {}
        self._consumer: AIOKafkaConsumer | None = None
        self._paused = False
        self._unverified: dict[Partition, int] = {}  # offset seeked to, until a fetch confirms it

    @property
    def topics(self) -> list[str]:
        return [t for t in (self.options.topic, self.options.verdicts_topic) if t]

    async def start(self) -> None:
        o = self.options
        consumer = AIOKafkaConsumer(**consumer_settings(o), **client_security(o),
                                    partition_assignment_strategy=(RangePartitionAssignor,))
        try:
            await consumer.start()
        except BaseException:
            await consumer.stop()
            raise
        consumer.subscribe(self.topics, listener=_Rebalance(self))
        self._consumer = consumer

    async def stop(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await stop_client(consumer, "consumer")

    async def _seek_assigned(self, partitions: set[Partition]) -> None:
        consumer = self._consumer
        if consumer is None:  # a join that completes while stop() closes the consumer
            return
        handed: Mapping[Partition, int] = {}
        if self.handed_over is not None and partitions:
            handed = await asyncio.to_thread(self.handed_over)  # a few small files
            if self._consumer is None:
                return
        for topic, p in partitions:
            tp = TopicPartition(topic, p)
            known = [o for o in (self.start_offsets.get((topic, p)), handed.get((topic, p))) if o is not None]
            if not known:
                continue
            checkpointed = max(known)
            try:
                committed = await consumer.committed(tp)
            except KafkaError:
                committed = None
            offset = max(checkpointed, committed or 0)
            consumer.seek(tp, offset)
            self._unverified[(topic, p)] = offset
        if self._paused:
            self.pause()

    async def fetch(self, timeout_ms: int) -> list[Record]:
        assert self._consumer is not None, "KafkaSource.fetch before start"
        batches = await self._consumer.getmany(timeout_ms=timeout_ms)
        if self._unverified:
            await self._reset_beyond_the_end({(tp.topic, tp.partition) for tp in batches})
        return [
            Record(m.topic, m.partition, m.offset, m.value or b"", m.key, tuple(m.headers or ()))
            for messages in batches.values()
            for m in messages
        ]

    async def _reset_beyond_the_end(self, delivered: set[Partition]) -> None:
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
        for key, offset in list(self._unverified.items()):
            tp = TopicPartition(*key)
            if key in delivered or key not in assigned:
                del self._unverified[key]
                continue
            highwater = consumer.highwater(tp)
            if highwater is None:
                continue  # not fetched yet (or paused)
            del self._unverified[key]
            if offset <= highwater:
                continue
            try:
                begin = (await consumer.beginning_offsets([tp])).get(tp, 0)
            except KafkaError:
                begin = 0
            log.warning("%s partition %d: offset %d is beyond the end of the log (%d): the log was lost or "
                        "recreated; reading it from the beginning (%d)", key[0], key[1], offset, highwater,
                        begin)
            if key in self.assignment():
                consumer.seek(tp, begin)
                self.start_offsets[key] = begin

    def topic_partitions(self) -> int | None:
        """How many partitions the telemetry topic has, as the consumer's metadata knows (None: unknown)."""
        if self._consumer is None:
            return None
        parts = self._consumer.partitions_for_topic(self.options.topic)
        return len(parts) if parts else None

    def assignment(self) -> set[Partition]:
        if self._consumer is None:
            return set()
        return {(tp.topic, tp.partition) for tp in self._consumer.assignment() if tp.topic in self.topics}

    def highwater(self) -> dict[Partition, int]:
        """Per assigned partition, the high watermark seen in the last fetch response."""
        consumer = self._consumer
        if consumer is None:
            return {}
        marks = {(tp.topic, tp.partition): consumer.highwater(tp) for tp in consumer.assignment()}
        return {p: h for p, h in marks.items() if h is not None}

    def pause(self) -> None:
        self._paused = True
        if self._consumer is not None:
            self._consumer.pause(*self._consumer.assignment())

    def resume(self) -> None:
        self._paused = False
        if self._consumer is not None:
            self._consumer.resume(*self._consumer.assignment())

    async def commit(self, offsets: dict[Partition, int]) -> None:
        if self._consumer is None or not offsets:
            return
        mine = self.assignment()
        tps = {TopicPartition(*key): o for key, o in offsets.items() if key in mine}
        if tps:
            await self._consumer.commit(tps)
