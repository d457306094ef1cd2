"""Where records come from and where bad ones go: the typed records that cross the broker boundary,
the protocol a record source fulfils, and an in-memory source for tests and tools.

No broker client here: the Kafka implementation is streamdqn.kafka; the stream stage, the offline
mode and the tests only see these types.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Record:
    topic: str
    partition: int
    offset: int
    value: bytes
    key: bytes | None = None
    headers: tuple[tuple[str, bytes], ...] = ()

    def header(self, name: str) -> bytes | None:
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    record: Record
    reason: str
    detail: str


Partition = tuple[str, int]
"""(topic, partition)."""
PartitionsCallback = Callable[[set[int]], Awaitable[None]]
"""Called with the telemetry topic's partition numbers assigned or revoked (the verdicts topic's partitions
of the same numbers move with them)."""


class RecordSource(Protocol):
    """Where telemetry records come from: a consumer with offsets it can pause, resume and commit.

    `start_offsets` ((topic, partition) -> next offset), set before start, is where reading resumes
    (a checkpoint's offsets)."""

    start_offsets: dict[Partition, int]

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def fetch(self, timeout_ms: int) -> list[Record]: ...
    def assignment(self) -> set[Partition]: ...
    def highwater(self) -> dict[Partition, int]: ...
    def pause(self) -> None: ...
    def resume(self) -> None: ...
    async def commit(self, offsets: dict[Partition, int]) -> None: ...


class RecordSink(Protocol):
    """Where bad records and snapshot announcements go."""

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def dead_letter(self, letters: Sequence[DeadLetter]) -> None: ...
    async def announce(self, payload: bytes) -> None: ...
    async def broker_reachable(self) -> bool: ...


class MemorySource:
    """Records from a list: the daemon run without a broker (tests, tools); batches of `batch` records."""

    def __init__(self, records: Sequence[Record] = (), *, topic: str = "telemetry", batch: int = 500) -> None:
        self._records = list(records)
        self._next = 0
        self.topic = topic
        self.batch = batch
        self.committed: dict[Partition, int] = {}
        self.start_offsets: dict[Partition, int] = {}
        self.paused = False

    def add(self, records: Sequence[Record]) -> None:
        self._records.extend(records)

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def fetch(self, timeout_ms: int) -> list[Record]:
        if self.paused or self._next >= len(self._records):
            await asyncio.sleep(min(timeout_ms, 50) / 1000)
            return []
        batch = self._records[self._next : self._next + self.batch]
        self._next += len(batch)
        # Resume where a checkpoint left off, as a Kafka consumer seeks to it.
        return [r for r in batch if r.offset >= self.start_offsets.get((r.topic, r.partition), 0)]

    @property
    def delivered(self) -> int:
        """Records handed out by fetch so far."""
        return self._next

    def assignment(self) -> set[Partition]:
        return {(r.topic, r.partition) for r in self._records} or {(self.topic, 0)}

    def highwater(self) -> dict[Partition, int]:
        marks: dict[Partition, int] = {}
        for r in self._records:
            key = (r.topic, r.partition)
            marks[key] = max(marks.get(key, 0), r.offset + 1)
        return marks

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False

    async def commit(self, offsets: dict[Partition, int]) -> None:
        self.committed.update(offsets)



class MemorySink:
    """Keeps dead letters and announcements in lists (tests, tools)."""

    def __init__(self) -> None:
        self.dead_letters: list[DeadLetter] = []
        self.announcements: list[bytes] = []

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def dead_letter(self, letters: Sequence[DeadLetter]) -> None:
        self.dead_letters.extend(letters)

    async def announce(self, payload: bytes) -> None:
        self.announcements.append(payload)

    async def broker_reachable(self) -> bool:
        return True


def file_records(path: Path, *, topic: str = "file") -> list[Record]:
    """A telemetry file as records: one per line of JSON Lines (offset = line index), or one per element
    of a JSON array (offset = element index); a file that is neither is one record, rejected downstream."""
    data = Path(path).read_bytes()
    if data.lstrip()[:1] == b"[":
        try:
            elements = json.loads(data)
        except (ValueError, RecursionError):
            return [Record(topic, 0, 0, data)]
        if isinstance(elements, list):
            return [Record(topic, 0, i, json.dumps(e).encode()) for i, e in enumerate(elements)]
    return [Record(topic, 0, i, line) for i, line in enumerate(data.splitlines()) if line.strip()]
