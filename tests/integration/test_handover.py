"""A partition that moves to another member resumes at its previous owner's checkpoint, not at the group's
older committed offset: the previous owner's last commit failed, as it does when a rebalance is under
way, but its checkpoint (and so its counts) already holds the events. Real broker, real consumers."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from streamdqn.daemon.handover import read_handovers, write_handover
from streamdqn.kafka.options import KafkaOptions
from streamdqn.kafka.source import KafkaSource
from streamdqn.stream.sources import Partition, Record
from tests.integration.conftest import Topics, encode_events, produce, sim_events

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


async def read_until(source: KafkaSource, want: int, seconds: float) -> list[Record]:
    """Records until `want` have come (or `seconds` passed), then one more second for any extra."""
    records: list[Record] = []
    deadline = time.monotonic() + seconds
    while len(records) < want and time.monotonic() < deadline:
        records += await source.fetch(200)
    records += await source.fetch(1000)
    return records


def test_the_next_owner_resumes_at_the_previous_owners_handover_record_not_its_failed_commit(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    topics = Topics.fresh(kafka_bootstrap).create(partitions=2)
    events, later = sim_events(8, seed=7, sandboxes=4), sim_events(2, seed=8, sandboxes=4)
    produce(topics.bootstrap, topics.telemetry, encode_events(events))
    # The next member's join waited out the first one's session timeout here (18 s at 10 s, 11 s at 6 s).
    options = KafkaOptions(topics.bootstrap, topics.telemetry, topics.group, session_timeout_ms=6_000)
    record = tmp_path / "rank-1" / "offsets.json"

    async def run() -> tuple[dict[Partition, int], list[Record], list[Record]]:
        first = KafkaSource(options)
        await first.start()
        try:
            read = await read_until(first, len(events), 60)
            assert len(read) == len(events)
            ends: dict[Partition, int] = {}
            for r in read:
                ends[(r.topic, r.partition)] = max(r.offset + 1, ends.get((r.topic, r.partition), 0))
            # The checkpoint covers everything read; only the first 5 per partition made it to the group.
            write_handover(record, ends)
            await first.commit({key: 5 for key in ends})
        finally:
            await first.stop()
        await asyncio.to_thread(produce, topics.bootstrap, topics.telemetry, encode_events(later))

        async def resumed(handed: bool, want: int) -> list[Record]:
            source = KafkaSource(options, handed_over=(lambda: read_handovers([record])) if handed else None)
            await source.start()
            try:
                return await read_until(source, want, 60)
            finally:
                await source.stop()

        double = len(events) - 5 * len(ends)
        return ends, await resumed(True, len(later)), await resumed(False, len(later) + double)

    ends, taken_over, from_commit = asyncio.run(run())
    assert len(ends) == 2
    assert len(taken_over) == len(later)
    assert all(r.offset >= ends[(r.topic, r.partition)] for r in taken_over)
    # Without the record the group's committed offset decides: what the first member counted comes again.
    assert len(from_commit) == len(events) + len(later) - 5 * len(ends)
