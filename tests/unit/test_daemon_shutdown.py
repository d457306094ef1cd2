"""A stop while dead letters wait for an unreachable broker: the daemon stops within its timeout and
leaves the unacknowledged batch to be read again, so nothing is lost and nothing is counted twice.

The daemon runs in-process on real telemetry bytes over an in-memory record source whose dead-letter
writes fail, as they do while the broker is down (a real broker cannot be taken down between a fetch
and its dead-letter write on cue; the broker outages themselves are in tests/integration/test_faults.py).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from pathlib import Path

from streamdqn.config import load_settings
from streamdqn.daemon.build import build
from streamdqn.daemon.exits import EXIT_OK
from streamdqn.daemon.state import DaemonState
from streamdqn.learning.checkpoints import CheckpointStore
from streamdqn.stream.sources import DeadLetter, MemorySink, MemorySource, Record
from tests.factories import event_dict

TOPIC = "telemetry"


class DeadLetterBrokerDown(MemorySink):
    """No dead-letter write is ever acknowledged."""

    def __init__(self) -> None:
        super().__init__()
        self.attempts = 0

    async def dead_letter(self, letters: Sequence[DeadLetter]) -> None:
        self.attempts += 1
        await asyncio.sleep(0.05)
        raise ConnectionError("broker unreachable")


def records(first: int, count: int, *, bad: bool = False) -> list[Record]:
    out = []
    for offset in range(first, first + count):
        event = event_dict(episode_id=offset // 10, step=offset % 10, sandbox_id=f"s{offset // 10}")
        value = b"{broken" if bad else json.dumps(event).encode()
        out.append(Record(TOPIC, 0, offset, value))
    return out


def test_stop_with_dead_letters_pending_resumes_from_the_last_checkpoint(tmp_path: Path) -> None:
    settings = load_settings(
        None,
        state={"dir": tmp_path / "state"},
        http={"port": 0},
        learner={"mode": "thread", "hidden": [16], "device": "cpu"},
        replay={"capacity": 10_000, "min_size": 10},
        checkpoint={"interval_seconds": 0.2},
        publish={"interval_seconds": 3600},
        lifecycle={"stop_timeout_seconds": 10},
    )
    source = MemorySource(records(0, 40))
    sink = DeadLetterBrokerDown()

    async def scenario() -> tuple[int, float]:
        daemon = await asyncio.to_thread(build, settings, source, sink)
        serving = asyncio.create_task(daemon.serve())
        checkpoints = CheckpointStore(tmp_path / "state" / "checkpoints")
        deadline = time.monotonic() + 30
        while not _offset_in_checkpoint(checkpoints, 40):  # the good records are checkpointed
            assert time.monotonic() < deadline, "no checkpoint of the first 40 records"
            await asyncio.sleep(0.05)
        source.add(records(40, 5, bad=True))
        while sink.attempts < 2:  # their dead letters are being retried
            assert time.monotonic() < deadline, "dead letters were never tried"
            await asyncio.sleep(0.05)
        daemon.stop()
        started = time.monotonic()
        code = await asyncio.wait_for(serving, 20)
        return code, time.monotonic() - started

    code, seconds = asyncio.run(scenario())
    assert code == EXIT_OK
    assert seconds < 10  # BROKER_CALL_TIMEOUT_SECONDS bounds the last attempt, not the retry loop
    latest = CheckpointStore(tmp_path / "state" / "checkpoints").load_latest()
    assert latest is not None
    state = DaemonState.from_checkpoint(latest.state, str(latest.path))
    assert state.offsets == {(TOPIC, 0): 40}  # the bad batch is read again after a restart
    assert state.stream.counters.records == 40
    assert not state.stream.counters.rejected  # and its rejects were never counted


def _offset_in_checkpoint(checkpoints: CheckpointStore, offset: int) -> bool:
    latest = checkpoints.load_latest()
    if latest is None:
        return False
    return DaemonState.from_checkpoint(latest.state, str(latest.path)).offsets.get((TOPIC, 0)) == offset
