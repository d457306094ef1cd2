"""The daemon in-process: real telemetry bytes through an in-memory source and sink, the real pipeline,
learner thread, publisher and checkpointer, with waits on conditions (never fixed sleeps).

The subprocess tests in tests/integration keep what only a real process can show (signals, SIGKILL,
the real broker and client); everything about counts, joins and publishing is here, where it is fast.
"""

from __future__ import annotations

import asyncio
import json
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest

from streamdqn.config import Settings, load_settings
from streamdqn.daemon import EXIT_OK, Server, build
from streamdqn.offline.simulator import simulate
from streamdqn.serve.metrics import MetricsSnapshot
from streamdqn.snapshots.layout import LATEST, MANIFEST_FILE
from streamdqn.snapshots.manifest import parse_manifest
from streamdqn.stream.sources import MemorySink, MemorySource, Record

TELEMETRY, VERDICTS = "telemetry", "verdicts"


def settings_for(state: Path, **sections: dict[str, Any]) -> Settings:
    base: dict[str, dict[str, Any]] = {
        "state": {"dir": state},
        "http": {"port": 0},
        "kafka": {"topic": TELEMETRY, "verdicts_topic": VERDICTS},
        "learner": {"mode": "thread", "hidden": [16], "device": "cpu", "updates_per_transition": 0.5,
                    "seed": 0},
        "replay": {"capacity": 20_000, "min_size": 32},
        "publish": {"interval_seconds": 0.5, "min_updates": 10, "gate": False},
        "checkpoint": {"interval_seconds": 0.5},
        "episodes": {"idle_timeout_seconds": 1.0},
        "lifecycle": {"stop_timeout_seconds": 20},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return load_settings(None, **base)


def records_of(events: Sequence[dict[str, Any]], topic: str = TELEMETRY, partitions: int = 2,
               first_offsets: dict[int, int] | None = None) -> list[Record]:
    """One record per event, keyed and partitioned by sandbox_id, alternating JSON and msgpack."""
    offsets = dict(first_offsets or {})
    out = []
    for i, event in enumerate(events):
        key = str(event["sandbox_id"]).encode()
        partition = zlib.crc32(key) % partitions
        offset = offsets.get(partition, 0)
        offsets[partition] = offset + 1
        if i % 2:
            out.append(Record(topic, partition, offset, msgpack.packb(event), key,
                              (("content-type", b"application/msgpack"),)))
        else:
            out.append(Record(topic, partition, offset, json.dumps(event).encode(), key))
    return out


@dataclass
class Running:
    server: Server
    task: asyncio.Task[int]
    source: MemorySource
    sink: MemorySink

    def metrics(self) -> MetricsSnapshot:
        return self.server.health.metrics()

    async def stop(self) -> int:
        self.server.stop()
        return await asyncio.wait_for(self.task, 30)


async def start(settings: Settings, records: Sequence[Record]) -> Running:
    source, sink = MemorySource(records), MemorySink()
    server = await asyncio.to_thread(build, settings, source, sink)
    # Waits expire in a pass every 5 s (not a setting); more often here, so that a test sees an expiry
    # without waiting seconds for it.
    server.ingestor.expire_every_seconds = 0.5
    return Running(server, asyncio.create_task(server.serve()), source, sink)


async def until(condition: Callable[[], bool], what: str, timeout: float = 30.0,
                show: Callable[[], object] = lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what} {show()}"
        await asyncio.sleep(0.02)


def sim(episodes: int, seed: int, *, offset: int = 0) -> list[dict[str, Any]]:
    return [{**e, "episode_id": int(e["episode_id"]) + offset}  # type: ignore[call-overload]
            for e in simulate(episodes, seed, sandboxes=4)]


def test_counts_dead_letters_and_a_snapshot_are_exact_and_a_restart_resumes(tmp_path: Path) -> None:
    settings = settings_for(tmp_path / "state")
    events = sim(12, seed=3)
    # On a partition of their own, so that the new events of the restart follow on from the old ones.
    bad = [Record(TELEMETRY, 2, 0, b"\xc1 not telemetry"),
           Record(TELEMETRY, 2, 1, json.dumps({**events[0], "episode_id": "x", "severity": 3.0}).encode())]

    async def first() -> tuple[MetricsSnapshot, int, int]:
        run = await start(settings, [*records_of(events), *bad])
        await until(lambda: run.metrics().events_consumed == len(events), "every valid event")
        await until(lambda: run.metrics().snapshot_version >= 1, "a snapshot")
        await until(lambda: sum(run.metrics().rejected.values()) == 2, "the rejects")
        code = await run.stop()
        return run.metrics(), code, len(run.sink.dead_letters)

    metrics, code, letters = asyncio.run(first())
    assert code == EXIT_OK
    assert metrics.rejected == {"decode_error": 1, "validation_error": 1}
    assert letters == metrics.dead_lettered == 2
    assert metrics.transitions == len(events)  # one row per step of the 12 episodes
    assert metrics.labelled == {"inline": 12, "verdict": 0}

    # The restart: the same records again plus new ones; only the new ones count.
    more = sim(6, seed=4, offset=1000)
    old = records_of(events)
    tail = {p: max(r.offset for r in old if r.partition == p) + 1 for p in {r.partition for r in old}}

    async def second() -> MetricsSnapshot:
        run = await start(settings, [*old, *bad, *records_of(more, first_offsets=tail)])
        assert run.metrics().events_consumed == len(events)  # restored before anything is read
        await until(lambda: run.metrics().events_consumed == len(events) + len(more), "the new events")
        await until(lambda: run.source.delivered == len(run.source._records), "everything read")
        assert await run.stop() == EXIT_OK
        return run.metrics()

    after = asyncio.run(second())
    assert after.events_consumed == len(events) + len(more)
    assert sum(after.rejected.values()) == 2  # the bad records were behind the checkpoint's offsets


def test_the_verdict_join_counts_exactly(tmp_path: Path) -> None:
    settings = settings_for(tmp_path / "state", verdicts={"wait_seconds": 30.0})
    events = sim(8, seed=5)
    labels = {e["episode_id"]: (e["is_malicious"], e["severity"]) for e in events}
    telemetry = [{k: v for k, v in e.items() if k not in ("is_malicious", "severity")} for e in events]
    sandbox_of = {e["episode_id"]: e["sandbox_id"] for e in events}
    ids = sorted(labels)

    def verdict(episode: int, **extra: Any) -> dict[str, Any]:
        malicious, severity = labels[episode]
        return {"sandbox_id": sandbox_of[episode], "episode_id": episode, "is_malicious": malicious,
                "severity": severity, **extra}

    last_time = max(float(e["timestamp"]) for e in events)
    early = [verdict(ids[0]), verdict(ids[1])]  # before their telemetry
    late = [verdict(i) for i in ids[2:6]]  # after it (ids[6], ids[7]: never)
    revision = [verdict(ids[2], is_malicious=not labels[ids[2]][0], severity=0.0, revision=1)]
    malformed = [{"sandbox_id": "sbx-00", "episode_id": 1, "is_malicious": "yes", "severity": 0.5}]
    # Timestamped, so that it waits by the records' clock (without one it would wait by the wall clock).
    orphan = [{"sandbox_id": "nobody", "episode_id": 424242, "is_malicious": True, "severity": 0.9,
               "timestamp": last_time}]
    # A verdict far in the future of the records' own clock: everything still waiting then expires.
    clock = [{**verdict(ids[3]), "revision": 0, "timestamp": last_time + 3600}]
    records = [*records_of(early, VERDICTS), *records_of(telemetry),
               *records_of(late, VERDICTS, first_offsets={0: 50, 1: 50}),
               *records_of(revision + malformed + orphan, VERDICTS, first_offsets={0: 100, 1: 100}),
               *records_of(clock, VERDICTS, first_offsets={0: 200, 1: 200})]

    async def scenario() -> MetricsSnapshot:
        run = await start(settings, records)
        await until(lambda: run.metrics().events_consumed == len(events), "the telemetry")
        await until(lambda: run.metrics().labelled.get("verdict", 0) == 6, "six joined episodes")
        await until(lambda: run.metrics().unlabelled_expired == 2 and run.metrics().verdicts_orphaned == 1,
                    "the never-labelled episodes and the orphan to expire", show=run.metrics)
        assert await run.stop() == EXIT_OK
        return run.metrics()

    m = asyncio.run(scenario())
    # early, late, revision, orphan, clock (not the malformed one)
    assert m.verdicts_consumed == 2 + 4 + 1 + 1 + 1
    assert m.verdicts_rejected == {"validation_error": 1}
    assert m.labelled == {"inline": 0, "verdict": 6}
    assert m.verdicts_revised == {"before_join": 0, "after_join": 1}
    assert m.rows_relabelled > 0  # the revised episode's rows were still in replay
    assert m.unlabelled_expired == 2
    assert m.verdicts_orphaned == 1
    assert m.pending_episodes == 0
    assert m.waiting_verdicts == 0
    joined_steps = sum(1 for e in events if e["episode_id"] in ids[:6])
    assert m.transitions == joined_steps  # never-labelled episodes are not learned


def test_an_idle_stream_exports_nothing_new(tmp_path: Path) -> None:
    settings = settings_for(tmp_path / "state")
    events = sim(6, seed=8)

    async def scenario() -> tuple[list[int], int]:
        run = await start(settings, records_of(events))
        await until(lambda: run.metrics().events_consumed == len(events), "the events")
        target = int(settings.learner.updates_per_transition * len(events))
        await until(lambda: run.metrics().updates >= target, "the learner to reach its target")
        await until(lambda: run.metrics().snapshot_version >= 1, "a snapshot")
        await asyncio.sleep(2 * settings.publish.interval_seconds)  # a publish that started has finished
        versions = []
        for _ in range(4):  # several publish intervals with nothing new
            versions.append(run.metrics().snapshot_version)
            await asyncio.sleep(settings.publish.interval_seconds)
        code = await run.stop()
        return versions, code

    versions, code = asyncio.run(scenario())
    assert code == EXIT_OK
    assert len(set(versions)) == 1, versions


def test_pausing_for_the_learner_holds_ingest_until_its_ratio_recovers(tmp_path: Path) -> None:
    # A ratio the thread learner cannot meet between two polls: ingest must pause, and still finish.
    settings = settings_for(tmp_path / "state", learner={"min_samples_per_insert": 2.0},
                            kafka={"max_poll_records": 50})
    events = sim(20, seed=9)

    async def scenario() -> tuple[bool, MetricsSnapshot]:
        run = await start(settings, records_of(events))
        run.source.batch = 40
        paused = False
        deadline = time.monotonic() + 60
        while run.metrics().events_consumed < len(events):
            paused |= run.metrics().ingest_paused
            assert time.monotonic() < deadline, "ingest never finished"
            await asyncio.sleep(0.01)
        assert await run.stop() == EXIT_OK
        return paused, run.metrics()

    paused, m = asyncio.run(scenario())
    assert paused
    assert m.events_consumed == len(events)


def test_the_daemons_and_offline_trainings_manifests_validate_against_one_schema(tmp_path: Path) -> None:
    from streamdqn.offline.simulator import write_events
    from streamdqn.offline.train import train

    settings = settings_for(tmp_path / "daemon")

    async def daemon() -> None:
        run = await start(settings, records_of(sim(6, seed=10)))
        await until(lambda: run.metrics().snapshot_version >= 1, "a snapshot")
        assert await run.stop() == EXIT_OK

    asyncio.run(daemon())
    events = tmp_path / "events.jsonl"
    write_events(events, simulate(8, 11))
    train(events, 8, state_dir=tmp_path / "offline", progress=False, hidden=(16,), learning_starts=16)
    for state in (tmp_path / "daemon", tmp_path / "offline"):
        path = state / "snapshots" / LATEST / MANIFEST_FILE
        manifest = parse_manifest(path.read_bytes(), str(path))
        assert manifest.normalizer.count > 0
        assert len(manifest.normalizer.mean) == len(manifest.normalizer.std) == 30


@pytest.fixture(autouse=True)
def _quiet_torch() -> None:
    import torch

    torch.set_num_threads(1)


def test_a_lone_daemon_assigned_part_of_its_topic_warns(caplog: pytest.LogCaptureFixture) -> None:
    from streamdqn.daemon.build import warn_if_sharing

    with caplog.at_level("WARNING", logger="streamdqn.daemon"):
        assert not warn_if_sharing({0, 1, 2, 3}, 4, TELEMETRY, "g")
        assert not warn_if_sharing({0}, None, TELEMETRY, "g")  # metadata not known yet
        assert warn_if_sharing({0, 1}, 4, TELEMETRY, "streamdqn")
    assert [r.getMessage() for r in caplog.records] == [
        "only 2 of the 4 partitions of telemetry are assigned to this daemon: another consumer is in group "
        "'streamdqn'. If a second streamdqn runs with this group id, stop it or give it another "
        "kafka.group_id; a daemon learns from, checkpoints and publishes only what it is assigned."
    ]
