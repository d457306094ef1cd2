"""The checkpoint component: capture state and offsets together, write them atomically, then commit.

A checkpoint holds the Kafka offsets its state corresponds to, so after a crash the events since the
last checkpoint are read again: nothing lost, nothing learned twice. Offsets are committed to the
group only after the checkpoint that covers them is on disk; a rank of a group also writes them to its
handover record (streamdqn.daemon.handover) for the rank that takes over one of its partitions.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from pathlib import Path

from streamdqn.daemon.handover import write_handover
from streamdqn.daemon.ingestor import Ingestor
from streamdqn.daemon.state import DaemonState, offsets_for_log
from streamdqn.history import HistoryPoint, append_history
from streamdqn.learning.checkpoints import CheckpointStore
from streamdqn.learning.replay.buffer import ReplayBuffer
from streamdqn.learning.runners import LearnerRunner
from streamdqn.logs import log_event
from streamdqn.stream.sources import Partition


class Checkpointer:
    def __init__(
        self,
        store: CheckpointStore,
        ingestor: Ingestor,
        runner: LearnerRunner,
        replay: ReplayBuffer,
        *,
        interval_seconds: float,
        include_replay: bool,
        history_dir: Path,
        batch_size: int,
        snapshot_version: Callable[[], int],
        observe_seconds: Callable[[float], None] = lambda s: None,
        handover: Path | None = None,
    ) -> None:
        self.store = store
        self.ingestor = ingestor
        self.runner = runner
        self.replay = replay
        self.interval_seconds = interval_seconds
        self.include_replay = include_replay
        self.history_dir = history_dir
        self.batch_size = batch_size
        self.snapshot_version = snapshot_version
        self.observe_seconds = observe_seconds
        self.handover = handover  # a rank of a group: where the other ranks read this one's offsets
        self.failures = 0

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.sleep(self.interval_seconds)
            await self.save()

    async def save(self, *, final: bool = False, revoked: set[int] | None = None) -> bool:
        """Capture state + offsets consistently (ingest paused), write off the loop, then commit."""
        started = time.perf_counter()
        try:
            async with self.ingestor.lock:
                if self.ingestor.resume_from_last_checkpoint:
                    return False  # the state holds a batch whose offsets must not be saved as done
                pipeline = self.ingestor.pipeline
                offsets = dict(self.ingestor.offsets)
                state = DaemonState(
                    pipeline.state(), offsets, await asyncio.to_thread(self.runner.learner_state),
                    await asyncio.to_thread(self.replay.state_dict) if self.include_replay else None,
                )
                returns = [f.logged_return for f in pipeline.take_finished() if not f.holdout]
            path = await asyncio.to_thread(self.store.save, state.to_checkpoint())
        except Exception as exc:  # noqa: BLE001 - a failed write is counted and logged; the daemon goes on
            self.failures += 1
            log_event("checkpoint failed", error=repr(exc)[:500])
            return False
        if self.handover is not None:
            await self._write_handover(self.handover, offsets)
        seconds = time.perf_counter() - started
        self.observe_seconds(seconds)
        events, updates = state.stream.counters.events_consumed, int(state.learner["updates"])
        self._append_history(events, updates, returns, state.stream.counters.transitions)
        log_event("checkpoint written", path=str(path), seconds=round(seconds, 3),
                  offsets=offsets_for_log(offsets), events_consumed=events, updates=updates, final=final)
        if revoked is not None:  # the partitions of both topics that moved to another member
            offsets = {key: o for key, o in offsets.items() if key[1] in revoked}
        await self.ingestor.commit(offsets)
        return True

    async def _write_handover(self, path: Path, offsets: dict[Partition, int]) -> None:
        try:
            await asyncio.to_thread(write_handover, path, offsets)
        except OSError as exc:  # the committed offsets still cover this checkpoint, once committed
            log_event("handover record failed", path=str(path), error=repr(exc)[:300])

    def _append_history(self, events: int, updates: int, returns: list[float], rows: int) -> None:
        mean_return = sum(returns) / len(returns) if returns else math.nan
        samples_per_insert = updates * self.batch_size / rows if rows else 0.0
        point = HistoryPoint(time.time(), events, updates, mean_return, self.runner.stats().loss,
                             samples_per_insert, self.snapshot_version())
        try:
            append_history(self.history_dir, point)
        except OSError as exc:
            log_event("history append failed", error=repr(exc)[:300])
