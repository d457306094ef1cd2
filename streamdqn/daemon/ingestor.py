"""The ingest component: connect to the broker, fetch, run the stream pipeline, dead letters, offsets.

The loop owns the pipeline: everything that changes its state (a batch, idle-episode expiry, a
revoked partition) happens under `lock`, which the checkpointer also takes, so a checkpoint's state
and offsets always belong together.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from streamdqn.errors import StreamDQNError
from streamdqn.learning.runners import LearnerRunner
from streamdqn.logs import last_kafka_error, log_event
from streamdqn.stream.pipeline import IngestPipeline
from streamdqn.stream.sources import DeadLetter, Partition, RecordSink, RecordSource

log = logging.getLogger("streamdqn.daemon")

# Bound on an offset commit, a snapshot announcement or the last dead-letter attempt. aiokafka waits
# for a hung or restarting coordinator indefinitely, and commits and announcements are only
# informational (the offsets that count are in the checkpoint), so they must not hold up the next
# checkpoint, publish or the shutdown.
BROKER_CALL_TIMEOUT_SECONDS = 5.0


def describe_broker_error(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer from the broker within {BROKER_CALL_TIMEOUT_SECONDS:g} s"
    return repr(exc)[:300]


class DeadLettersPending(Exception):
    """A stop was requested while dead letters still waited for the broker."""

    def __init__(self, count: int) -> None:
        super().__init__(f"{count} dead letters unacknowledged")
        self.count = count


class Clients(Protocol):
    """Opens the broker clients (raises while the broker is unreachable)."""

    bootstrap_servers: str

    async def open(self) -> tuple[RecordSource, RecordSink]: ...


@dataclass(frozen=True)
class Backpressure:
    """Pause fetching while the learner's achieved samples per inserted row are below a minimum.

    Off by default (min_samples_per_insert 0): the learner never throttles the stream, it learns from
    fewer samples per row when it cannot keep up. The replay ring always accepts (it overwrites its
    oldest rows), so it never needs to hold ingest back itself.
    """

    min_samples_per_insert: float
    batch_size: int
    min_replay_size: int

    def should_pause(self, inserted: int, updates: int, replay_size: int) -> bool:
        if self.min_samples_per_insert <= 0 or replay_size < self.min_replay_size or inserted == 0:
            return False
        return updates * self.batch_size / inserted < self.min_samples_per_insert


async def sleep_unless(stop: asyncio.Event, seconds: float) -> None:
    """A backoff that a stop request cuts short."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)


class Ingestor:
    def __init__(
        self,
        pipeline: IngestPipeline,
        clients: Clients,
        runner: LearnerRunner,
        backpressure: Backpressure,
        replay_size: Callable[[], int],
        *,
        offsets: dict[Partition, int],
        poll_timeout_ms: int,
        broker_retry_max_seconds: float,
        topic: str,
        observe_batch_seconds: Callable[[float], None] = lambda s: None,
        observe_verdict_delay: Callable[[float], None] = lambda s: None,
        expire_every_seconds: float = 5.0,
        refresh_every_seconds: float = 0.5,
    ) -> None:
        self.pipeline = pipeline
        self.clients = clients
        self.runner = runner
        self.backpressure = backpressure
        self.replay_size = replay_size
        self.poll_timeout_ms = poll_timeout_ms
        self.broker_retry_max_seconds = broker_retry_max_seconds
        self.topic = topic
        self.observe_batch_seconds = observe_batch_seconds
        self.observe_verdict_delay = observe_verdict_delay
        self.expire_every_seconds = expire_every_seconds
        self.refresh_every_seconds = refresh_every_seconds
        self.lock = asyncio.Lock()
        self.offsets = offsets  # shared with a Kafka source, which resets it for a recreated log
        self.source: RecordSource | None = None
        self.sink: RecordSink | None = None
        self.last_progress = time.monotonic()
        self.paused = False
        # Set when a stop left a batch unacknowledged: no later checkpoint may claim its offsets.
        self.resume_from_last_checkpoint = False
        self._commit_task: asyncio.Task[None] | None = None

    # ---------------------------------------------------------------- connection
    async def connect(self, stop: asyncio.Event) -> bool:
        """Open the clients, retrying with backoff until they work; False if told to stop first."""
        delay = 0.5
        while not stop.is_set():
            try:
                self.source, self.sink = await self.clients.open()
            except StreamDQNError:
                raise  # a configuration the broker cannot serve: retrying would not help
            except Exception as exc:  # noqa: BLE001 - every failure to reach the broker is retried
                log_event("broker unreachable", bootstrap_servers=self.clients.bootstrap_servers,
                          error=repr(exc)[:300], cause=last_kafka_error(), retry_in_seconds=delay)
                await sleep_unless(stop, delay)
                delay = min(delay * 2, self.broker_retry_max_seconds)
                continue
            log_event("broker connected", bootstrap_servers=self.clients.bootstrap_servers, topic=self.topic)
            return True
        return False

    async def close(self) -> None:
        for client in (self.source, self.sink):
            if client is not None:
                await client.stop()

    # ---------------------------------------------------------------- the loop
    async def run(self, stop: asyncio.Event) -> None:
        """Fetch and process until `stop`; the batch in hand is finished first."""
        assert self.source is not None
        last_expire = last_refresh = time.monotonic()
        while not stop.is_set():
            self._apply_backpressure()
            records = await self.source.fetch(self.poll_timeout_ms)
            now = time.monotonic()
            if now - last_refresh >= self.refresh_every_seconds:
                last_refresh = now
                self._refresh_learner_link()
            if now - last_expire >= self.expire_every_seconds:
                last_expire = now
                async with self.lock:
                    self.pipeline.expire(now)
            if records and not await self._process(records, stop):
                return

    async def _process(self, records: list[Any], stop: asyncio.Event) -> bool:
        """One batch; False when a stop left its dead letters unacknowledged."""
        async with self.lock:
            started = time.perf_counter()
            outcome = self.pipeline.process(records)
            try:
                await self._dead_letter(outcome.dead_letters, stop)
            except DeadLettersPending as pending:
                # The batch is in the learner's replay but not acknowledged: the last periodic
                # checkpoint stays the one to resume from, and a restart reads the batch again.
                self.resume_from_last_checkpoint = True
                log_event("stopping with dead letters unacknowledged", records=pending.count,
                          note="final checkpoint skipped; the batch is read again after a restart")
                return False
            counters = self.pipeline.counters
            counters.dead_lettered += len(outcome.dead_letters)
            self.offsets.update(outcome.next_offsets)
            self.runner.note_ingested(counters.transitions, counters.events_consumed)
            self.observe_batch_seconds(time.perf_counter() - started)
            if self.pipeline.join is not None:
                for delay in self.pipeline.join.take_delays():
                    self.observe_verdict_delay(delay)
            self.last_progress = time.monotonic()
        return True

    def _apply_backpressure(self) -> None:
        assert self.source is not None
        lagging = self.learner_lagging()
        if lagging != self.paused:
            self.source.pause() if lagging else self.source.resume()
            self.paused = lagging
            log_event("backpressure", paused=lagging)

    def learner_lagging(self) -> bool:
        return self.backpressure.should_pause(self.pipeline.counters.transitions, self.runner.stats().updates,
                                              self.replay_size())

    def _refresh_learner_link(self) -> None:
        """The normalizer's statistics to the learner."""
        n = self.pipeline.normalizer
        self.runner.set_normalization(n.mean, n.std, n.count)

    async def _dead_letter(self, letters: list[DeadLetter], stop: asyncio.Event) -> None:
        """A bad record counts as done only once its dead letter is acknowledged: retry until it is.

        Once a stop is requested, one last attempt is bounded by BROKER_CALL_TIMEOUT_SECONDS; if it
        fails, DeadLettersPending tells the loop to leave the batch unacknowledged.
        """
        assert self.sink is not None
        delay = 0.5
        while letters:
            stopping = stop.is_set()
            try:
                write = self.sink.dead_letter(letters)
                await (asyncio.wait_for(write, BROKER_CALL_TIMEOUT_SECONDS) if stopping else write)
                return
            except Exception as exc:  # any failed write is retried; the batch waits for it
                if stopping:
                    raise DeadLettersPending(len(letters)) from exc
                log_event("dead-letter write failed", error=repr(exc)[:300], records=len(letters),
                          retry_in_seconds=delay)
                await sleep_unless(stop, delay)
                delay = min(delay * 2, 10.0)

    # ---------------------------------------------------------------- offsets
    def lag(self) -> dict[Partition, int]:
        if self.source is None:
            return {}
        return {p: max(0, h - self.offsets.get(p, 0)) for p, h in self.source.highwater().items()}

    def partitions_assigned(self) -> int:
        """Partitions of the telemetry topic assigned to this member."""
        if self.source is None:
            return 0
        return sum(1 for topic, _ in self.source.assignment() if topic == self.topic)

    async def drop_partitions(self, partitions: set[int]) -> int:
        async with self.lock:
            return self.pipeline.drop_partitions(partitions)

    async def commit(self, offsets: dict[Partition, int]) -> None:
        """Commit offsets to the group, waiting at most BROKER_CALL_TIMEOUT_SECONDS.

        A commit still waiting after that goes on in the background (cancelling it would leave the
        error of aiokafka's shielded request unretrieved) and later commits are skipped until it ends.
        """
        if self.source is None:
            return
        pending = self._commit_task
        if pending is not None and not pending.done():
            log_event("offset commit skipped", reason="the previous commit still waits for the broker")
            return
        task = asyncio.create_task(self.source.commit(offsets), name="commit")
        task.add_done_callback(_log_commit_failure)
        self._commit_task = task
        await asyncio.wait({task}, timeout=BROKER_CALL_TIMEOUT_SECONDS)
        if not task.done():
            log_event("offset commit failed", error=f"no answer from the broker within "
                      f"{BROKER_CALL_TIMEOUT_SECONDS:g} s; still trying in the background")


def _log_commit_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        log_event("offset commit failed", error=describe_broker_error(exc))

