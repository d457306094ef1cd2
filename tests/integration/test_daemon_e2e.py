"""The daemon end to end: a real broker, `streamdqn run` as a subprocess, a real producer."""

from __future__ import annotations

import json
import signal
import statistics
import time
import urllib.request
from pathlib import Path

import msgpack
import numpy as np
import onnxruntime as ort
import pytest

from streamdqn.client.pull import pull
from tests.integration.conftest import (
    LIVE_PUBLISH_INTERVAL,
    DaemonProcess,
    Message,
    consume_all,
    encode_events,
    produce,
    sim_events,
)

pytestmark = pytest.mark.integration


def _event(**overrides: object) -> dict[str, object]:
    event: dict[str, object] = {
        "sandbox_id": "sbx-extra", "episode_id": "extra-1", "step": 0, "final": True, "is_malicious": True,
        "severity": 0.5, "syscall_count": 10, "file_read_count": 1, "file_write_count": 2,
        "network_connections": 0, "bytes_sent": 0, "bytes_received": 0, "child_processes": 0,
        "cpu_usage": 5.0, "memory_usage": 100.0, "registry_modification": False,
        "privilege_escalation_attempt": False, "code_injection_detected": False,
    }
    event.update(overrides)
    return event


def bad_messages() -> tuple[list[Message], int, int]:
    """Bad messages, how many bad events they hold, and how many good events ride along."""
    nan = json.dumps(_event(episode_id="nan-1")).replace('"severity": 0.5', '"severity": NaN').encode()
    assert b"NaN" in nan
    messages = [
        Message(b"\xc1\xc1 definitely not telemetry", b"sbx-bad-1"),
        Message(nan, b"sbx-bad-2", (("content-type", b"application/json"),)),
        Message(json.dumps(_event(episode_id="neg", file_read_count=-3)).encode(), b"sbx-bad-3"),
        Message(msgpack.packb(_event(episode_id="act", action="detonate")), b"sbx-bad-4"),
        # One good event and one bad event in one message: the good one is kept.
        Message(json.dumps([_event(), _event(episode_id="arr-bad", severity=3.0)]).encode(), b"sbx-extra"),
    ]
    return messages, 5, 1


def with_duplicate(messages: list[Message]) -> list[Message]:
    """Send a copy of one non-final event right after the original: rejected as a duplicate."""
    for i, m in enumerate(messages):
        payload = json.loads(m.value) if m.value.startswith(b"{") else msgpack.unpackb(m.value)
        if not payload["final"] and payload["step"] > 0:
            return [*messages[: i + 1], m, *messages[i + 1 :]]
    raise AssertionError("no non-final event to duplicate")


def shift_episodes(events: list[dict[str, object]], offset: int) -> list[dict[str, object]]:
    return [{**e, "episode_id": int(e["episode_id"]) + offset} for e in events]  # type: ignore[call-overload]


def test_learns_dead_letters_publishes_stops_and_resumes(topics, make_daemon, tmp_path: Path) -> None:
    events = sim_events(40, seed=3)
    bad, bad_events, good_riders = bad_messages()
    messages = with_duplicate(encode_events(events)) + bad
    produce(topics.bootstrap, topics.telemetry, messages)
    valid = len(events) + good_riders
    rejected = bad_events + 1  # + the duplicate

    daemon = make_daemon(topics).start()
    daemon.wait_for(lambda: daemon.metric("streamdqn_events_consumed_total") == valid, 90, "all valid events")
    daemon.wait_for(lambda: daemon.rejected_total() == rejected, 30, "all rejections")
    daemon.wait_for(lambda: daemon.metric("streamdqn_snapshot_version") >= 1, 90, "a snapshot")
    m = daemon.metrics()
    assert m['streamdqn_events_rejected_total{reason="decode_error"}'] == 1
    assert m['streamdqn_events_rejected_total{reason="validation_error"}'] == 4
    assert m['streamdqn_events_rejected_total{reason="duplicate"}'] == 1
    assert m["streamdqn_events_dead_lettered_total"] == 6
    assert m["streamdqn_transitions_total"] > 0
    assert m["streamdqn_learner_updates_total"] >= 20

    # Every bad message sits in the dead-letter topic with its original bytes and where it came from.
    letters = consume_all(topics.bootstrap, topics.dlq, expected=6)
    assert len(letters) == 6
    originals = {msg.value for msg in [*bad, *messages]}
    for letter in letters:
        headers = dict(letter.headers)
        assert letter.value in originals
        assert headers["streamdqn-reason"] in (b"decode_error", b"validation_error", b"duplicate")
        assert headers["streamdqn-source-topic"] == topics.telemetry.encode()
        assert int(headers["streamdqn-source-offset"]) >= 0
        assert headers["streamdqn-error"]
    nan_letter = next(x for x in letters if b"NaN" in x.value)
    assert b"severity" in dict(nan_letter.headers)["streamdqn-error"]

    # Published snapshots are announced, pulled with their sha256 checked, and run in onnxruntime.
    announcement = json.loads(consume_all(topics.bootstrap, topics.snapshots, expected=1)[0].value)
    assert {"version", "sha256", "url"} <= set(announcement)
    result = pull(daemon.url, tmp_path / "policy")
    session = ort.InferenceSession(str(tmp_path / "policy" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    q, action = session.run(None, {"features": np.zeros((3, 30), np.float32)})
    assert q.shape == (3, 5)
    assert action.dtype == np.int64
    assert result.changed

    # SIGTERM: clean exit within the stop timeout, with a final checkpoint and snapshot.
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit(35) == 0
    logged = daemon.log_events()
    final_checkpoint = [e for e in logged if e["event"] == "checkpoint written" and e["final"]]
    assert final_checkpoint
    assert final_checkpoint[-1]["events_consumed"] == valid
    assert any(e["event"] == "snapshot published" and e["final"] for e in logged)

    # Restart: the restored count is exact, nothing is read twice, and new events are counted once.
    daemon.start()
    daemon.wait_for(daemon.caught_up, 60, "assignment and a read to the end of each partition")
    assert daemon.metric("streamdqn_events_consumed_total") == valid
    assert daemon.rejected_total() == rejected
    more = shift_episodes(sim_events(10, seed=4), 10_000)
    produce(topics.bootstrap, topics.telemetry, encode_events(more))
    daemon.wait_for(lambda: daemon.metric("streamdqn_events_consumed_total") >= valid + len(more)
                    and daemon.caught_up(), 60, "the second batch")
    assert daemon.metric("streamdqn_events_consumed_total") == valid + len(more)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit(35) == 0


def test_sigkill_resumes_from_checkpointed_offsets(topics, make_daemon) -> None:
    events = sim_events(60, seed=5)
    produce(topics.bootstrap, topics.telemetry, encode_events(events))
    daemon = make_daemon(topics, checkpoint={"interval_seconds": 1.0}).start()
    daemon.wait_for(lambda: daemon.metric("streamdqn_events_consumed_total") > 0, 60, "ingest to start")
    daemon.wait_for(lambda: any(e["event"] == "checkpoint written" for e in daemon.log_events()), 30,
                    "a checkpoint")
    daemon.signal(signal.SIGKILL)
    daemon.wait_exit(10)
    more = shift_episodes(sim_events(20, seed=6), 50_000)
    produce(topics.bootstrap, topics.telemetry, encode_events(more))
    daemon.start()
    total = len(events) + len(more)
    daemon.wait_for(lambda: daemon.metric("streamdqn_events_consumed_total") >= total and daemon.caught_up(),
                    90, "every event")
    assert daemon.metric("streamdqn_events_consumed_total") == total
    assert daemon.rejected_total() == 0


def test_http_stays_responsive_under_full_speed_ingest(topics, make_daemon) -> None:
    events = sim_events(1500, seed=7, sandboxes=32)
    produce(topics.bootstrap, topics.telemetry, encode_events(events))
    daemon = make_daemon(topics, learner={"hidden": [256, 256], "updates_per_transition": 0.0,
                                          "mode": "thread"}).start()
    daemon.wait_for(lambda: daemon.metric("streamdqn_events_consumed_total") > 0, 60, "ingest to start")
    # Ten seconds of polling while ingest and an unbounded learner thread compete for the GIL.
    updates_before = daemon.metric("streamdqn_learner_updates_total")
    latencies = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        started = time.perf_counter()
        with urllib.request.urlopen(daemon.url + "/healthz", timeout=10) as response:
            assert response.status == 200
        latencies.append(time.perf_counter() - started)
        time.sleep(0.02)
    assert daemon.metric("streamdqn_learner_updates_total") > updates_before, "the learner was not running"
    p95 = statistics.quantiles(latencies, n=20)[-1]
    # Loose bounds on a shared 2-core machine: what matters is that the loop is never blocked for long.
    assert p95 < 0.5, f"/healthz p95 {p95:.3f}s under load"
    assert max(latencies) < 5.0, f"/healthz max {max(latencies):.3f}s under load"


def test_an_idle_stream_exports_nothing_new(live_daemon: DaemonProcess) -> None:
    """Once nothing new is consumed or learned, publish intervals neither export nor gate the same
    weights again: the snapshot version and the gate's refusals stay where they are."""
    d = live_daemon

    def progress() -> tuple[float, float]:
        m = d.metrics()
        return m["streamdqn_learner_updates_total"], m["streamdqn_events_consumed_total"]

    interval = LIVE_PUBLISH_INTERVAL
    previous, deadline = progress(), time.monotonic() + 90
    while True:  # until the learner has caught up with what was consumed
        time.sleep(interval + 1)
        current = progress()
        if current == previous:
            break
        previous = current
        assert time.monotonic() < deadline, "the learner never went idle"
    time.sleep(interval + 1)  # a publish that started before the last check has finished

    def published() -> tuple[float, float, float]:
        m = d.metrics()
        return (m["streamdqn_snapshot_version"], m["streamdqn_snapshot_rejected_total"],
                m["streamdqn_snapshot_published_timestamp_seconds"])

    before = published()
    time.sleep(2 * interval + 1)
    assert progress() == previous
    assert published() == before
