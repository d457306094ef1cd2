"""Fault injection against the real broker and `streamdqn run` as a subprocess.

Each test starts what it needs (a dedicated tansu broker where the broker itself is the fault),
bounds every wait, and stops everything it started. The table of faults, what the daemon did and
what was lost is in FAULTS.md next to this file.
"""

from __future__ import annotations

import asyncio
import errno
import json
import math
import os
import random
import resource
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import msgpack
import numpy as np
import onnxruntime as ort
import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from streamdqn.daemon.state import DaemonState, offsets_for_log
from streamdqn.kafka.broker import EmbeddedBroker, free_port
from streamdqn.learning.checkpoints import CheckpointStore
from streamdqn.snapshots.store import sha256_hex
from streamdqn.stream.wire import ACTION_NAMES, COUNT_FIELDS, FLAG_FIELDS, decode
from tests.factories import event_dict
from tests.integration.conftest import (
    FAST,
    DaemonProcess,
    Message,
    Topics,
    consume_all,
    encode_events,
    produce,
    sim_events,
)

pytestmark = pytest.mark.integration


# ---------------------------------------------------------------- helpers


def readyz(daemon: DaemonProcess) -> tuple[int, dict[str, object]]:
    """(status, checks) of /readyz; a 503 is an answer here, not an error."""
    try:
        with urllib.request.urlopen(daemon.url + "/readyz", timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


def events_named(daemon: DaemonProcess, name: str) -> list[dict[str, object]]:
    return [e for e in daemon.log_events() if e["event"] == name]


def new_topics(bootstrap: str) -> Topics:
    return Topics.fresh(bootstrap)


def shifted(episodes: int, seed: int, offset: int, sandboxes: int = 6) -> list[dict[str, object]]:
    """Simulated events whose episode ids start at `offset` (distinct from earlier batches)."""
    return [{**e, "episode_id": int(e["episode_id"]) + offset}  # type: ignore[call-overload]
            for e in sim_events(episodes, seed, sandboxes)]


def counted(daemon: DaemonProcess) -> float:
    """Events accounted for: consumed + rejected."""
    m = daemon.metrics()
    return m.get("streamdqn_events_consumed_total", 0.0) + sum(
        v for k, v in m.items() if k.startswith("streamdqn_events_rejected_total{"))


def assert_clean_log(daemon: DaemonProcess) -> None:
    """No traceback, no error-level line."""
    text = daemon.logs()
    assert "Traceback" not in text, text[-4000:]
    errors = [e for e in daemon.log_events() if e.get("level") in ("error", "critical")]
    assert not errors, errors


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[EmbeddedBroker]:
    """A broker for this test alone, so that stopping it harms no other test."""
    broker = EmbeddedBroker(log_file=tmp_path / "tansu.log").start()
    try:
        yield broker
    finally:
        broker.stop()


# ---------------------------------------------------------------- 1, 2b: broker absent, then lost with data


@pytest.mark.slow
def test_broker_absent_at_start_then_killed_and_restarted_empty(make_daemon, tmp_path: Path) -> None:
    port = free_port()
    topics = new_topics(f"127.0.0.1:{port}")  # nothing listens there yet
    daemon = make_daemon(topics, **FAST)
    broker = EmbeddedBroker(port=port, log_file=tmp_path / "tansu.log")
    try:
        daemon.start()
        daemon.wait_for(lambda: len(events_named(daemon, "broker unreachable")) >= 3, 30, "retries")
        status, checks = readyz(daemon)
        assert status == 503
        assert checks["broker_connected"] is False
        assert daemon.metric("streamdqn_broker_connected") == 0
        retries = [e["retry_in_seconds"] for e in events_named(daemon, "broker unreachable")]
        assert retries[:3] == [0.5, 1.0, 2.0]  # exponential backoff, capped by broker_retry_max_seconds (2)
        assert all(r <= 2.0 for r in retries)
        assert daemon.process is not None
        assert daemon.process.poll() is None

        broker.start()
        topics.create()
        first = sim_events(30, seed=21)
        produce(topics.bootstrap, topics.telemetry, encode_events(first))
        daemon.wait_for(lambda: counted(daemon) >= len(first), 60, "the first batch")
        daemon.wait_for(lambda: readyz(daemon)[1]["partitions_assigned"], 30, "assignment in /readyz")
        checks = readyz(daemon)[1]
        assert checks["broker_connected"] is True
        assert checks["learner_running"] is True
        assert daemon.metric("streamdqn_events_consumed_total") == len(first)
        daemon.wait_for(lambda: any(e["events_consumed"] == len(first)
                                    for e in events_named(daemon, "checkpoint written")), 30,
                        "a checkpoint of the first batch")

        # Kill the broker and start an empty one on the same port. tansu here keeps everything in
        # memory, so this is the worst case a real cluster never shows: the topics, the records not
        # yet consumed and the group's committed offsets are all gone, and the daemon's checkpointed
        # offsets point beyond the end of the new, empty logs. Kafka would answer a fetch there with
        # OFFSET_OUT_OF_RANGE; tansu returns nothing, so the daemon compares its position with the
        # fetch's high watermark and reads the new log from its beginning (logged as a warning).
        # Had a partition's new log grown past the old offset before the daemon fetched it, the
        # records below that offset would be skipped: with memory storage a broker restart can lose
        # data. The second batch is smaller per partition than the first, so each new event must be
        # counted exactly once.
        broker.stop()
        daemon.wait_for(lambda: daemon.metric("streamdqn_broker_connected") == 0, 30, "the disconnect")
        broker = EmbeddedBroker(port=port, log_file=tmp_path / "tansu-2.log").start()
        topics.create()
        second = shifted(8, seed=22, offset=10_000)
        produce(topics.bootstrap, topics.telemetry, encode_events(second))
        total = len(first) + len(second)
        daemon.wait_for(lambda: counted(daemon) >= total and daemon.caught_up(), 60,
                        "the second batch after the broker restart")
        assert daemon.metric("streamdqn_events_consumed_total") == total
        assert daemon.rejected_total() == 0
        daemon.wait_for(lambda: daemon.metric("streamdqn_broker_connected") == 1, 30, "the reconnect")
        names = [e["event"] for e in daemon.log_events()]
        assert "broker disconnected" in names
        assert "broker reconnected" in names
        assert any("beyond the end of the log" in name for name in names)
        assert_clean_log(daemon)

        # SIGTERM with the broker gone: the final checkpoint and snapshot do not wait for it.
        broker.stop()
        signalled = time.monotonic()
        daemon.signal(signal.SIGTERM)
        assert daemon.wait_exit(40) == 0
        took = time.monotonic() - signalled
        assert took < 30, f"exit took {took:.1f}s"  # lifecycle.stop_timeout_seconds
        logged = daemon.log_events()
        assert any(e["event"] == "checkpoint written" and e["final"] for e in logged)
        assert any(e["event"] == "snapshot published" and e["final"] for e in logged)
    finally:
        daemon.stop()
        broker.stop()


# ---------------------------------------------------------------- 2: broker hung for ~30 s mid-stream


@pytest.mark.slow
def test_broker_hung_mid_stream_learner_keeps_training_and_ingest_resumes(own_broker, make_daemon) -> None:
    topics = new_topics(own_broker.bootstrap_servers).create()
    first = sim_events(30, seed=31)
    produce(topics.bootstrap, topics.telemetry, encode_events(first))
    # The default learner process, updating as fast as it can: it must not need the broker to train.
    daemon = make_daemon(topics, learner={"hidden": [64, 64], "updates_per_transition": 0.0}).start()
    daemon.wait_for(lambda: counted(daemon) >= len(first), 60, "the first batch")
    daemon.wait_for(lambda: daemon.metric("streamdqn_learner_updates_total") > 0, 30, "learning")

    # A live stream: chunks of new episodes until the moment the broker hangs.
    produced = len(first)
    for i in range(4):
        chunk = shifted(6, seed=32 + i, offset=10_000 * (i + 1))
        produce(topics.bootstrap, topics.telemetry, encode_events(chunk))
        produced += len(chunk)
    own_broker.suspend()  # SIGSTOP: the socket stays open, nothing answers
    hung_at, hung_wall = time.monotonic(), time.time()
    try:
        daemon.wait_for(lambda: daemon.metric("streamdqn_broker_connected") == 0, 20, "the outage to show")
        updates_during = daemon.metric("streamdqn_learner_updates_total")
        time.sleep(max(0.0, 30 - (time.monotonic() - hung_at)))
        m = daemon.metrics()  # HTTP answers throughout
        assert m["streamdqn_learner_updates_total"] > updates_during, "the learner stopped with the broker"
        assert m["streamdqn_broker_connected"] == 0
        assert daemon.process is not None
        assert daemon.process.poll() is None
    finally:
        own_broker.resume()
    resumed_wall = time.time()
    # Checkpoints and snapshots go on without the broker (offset commits and announcements time out).
    during = [e for e in daemon.log_events() if hung_wall + 6 < e["ts"] < resumed_wall]  # type: ignore[operator]
    saved = [e["updates"] for e in during if e["event"] == "checkpoint written"]
    assert len(saved) >= 2 and saved == sorted(saved) and saved[-1] > saved[0], saved
    published = sum(1 for e in during if e["event"] == "snapshot published")
    assert published >= 1
    updates_after = m["streamdqn_learner_updates_total"]
    print(f"hung broker: learner updates {updates_during:.0f} -> {updates_after:.0f} while hung; "
          f"{len(saved)} checkpoints and {published} snapshots written meanwhile")

    daemon.wait_for(lambda: daemon.metric("streamdqn_broker_connected") == 1, 30, "the reconnect")
    after = shifted(6, seed=40, offset=90_000)
    produce(topics.bootstrap, topics.telemetry, encode_events(after))
    produced += len(after)
    daemon.wait_for(lambda: counted(daemon) >= produced and daemon.caught_up(), 60,
                    "every event after the outage")
    assert daemon.metric("streamdqn_events_consumed_total") == produced
    assert daemon.rejected_total() == 0
    names = [e["event"] for e in daemon.log_events()]
    assert names.index("broker disconnected") < names.index("broker reconnected")
    assert_clean_log(daemon)


# ---------------------------------------------------------------- 3: SIGKILL at random moments


def _new_temp(directory: Path, prefix: str, before: set[str]) -> bool:
    return any(p.name.startswith(prefix) and p.name not in before for p in directory.iterdir())


def _wait_then_kill(daemon: DaemonProcess, moment: str, rng: random.Random, consumed_before: int) -> str:
    """SIGKILL the daemon at `moment`; returns what was really hit (a write can be missed)."""
    checkpoints, snapshots = daemon.state_dir / "checkpoints", daemon.state_dir / "snapshots"
    written = len(events_named(daemon, "checkpoint written"))
    # atomic_write's temp file (.ckpt-*.tmp) and SnapshotStore's temp directory (.tmp-*) exist only
    # in the middle of a write; ignore those an earlier kill left behind.
    before = {p.name for p in checkpoints.iterdir()} | {p.name for p in snapshots.iterdir()}
    # Progress needs the group join after the restart (≈5 s, longer on a busy machine).
    deadline = time.monotonic() + (30 if moment == "right after a checkpoint with progress" else 15)
    hit = "timeout"
    while time.monotonic() < deadline:
        if moment == "during checkpoint write" and _new_temp(checkpoints, ".ckpt-", before):
            hit = moment
            break
        if moment == "during snapshot publish" and _new_temp(snapshots, ".tmp-", before):
            hit = moment
            break
        if moment == "right after a checkpoint with progress":
            done = events_named(daemon, "checkpoint written")[written:]
            if any(int(e["events_consumed"]) > consumed_before for e in done):  # type: ignore[call-overload]
                hit = moment
                break
            time.sleep(0.02)
        if moment == "random":
            time.sleep(rng.uniform(0.0, 2.0))
            hit = moment
            break
    daemon.signal(signal.SIGKILL)
    daemon.wait_exit(10)
    return hit


def _check_state(state_dir: Path) -> tuple[dict[str, int], int]:
    """What a restart will find: the newest checkpoint file loads, and `latest` is a valid snapshot."""
    store = CheckpointStore(state_dir / "checkpoints")
    loaded = store.load_latest()
    assert loaded is not None
    newest = max(int(p.name[5:15]) for p in store.root.glob("ckpt-*.pt"))
    assert loaded.sequence == newest, "the newest checkpoint file is unreadable"
    state = DaemonState.from_checkpoint(loaded.state, str(loaded.path))
    assert state.replay is not None

    latest = state_dir / "snapshots" / "latest"
    version = os.readlink(latest)
    manifest = json.loads((latest / "manifest.json").read_bytes())
    model = (latest / "model.onnx").read_bytes()
    assert manifest["version"] == int(version)
    assert manifest["sha256"] == sha256_hex(model)
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    q, actions = session.run(None, {"features": np.zeros((2, 30), np.float32)})
    assert q.shape == (2, 5)
    assert np.isfinite(q).all()
    assert actions.shape == (2,)
    return offsets_for_log(state.offsets), state.stream.counters.events_consumed


@pytest.mark.slow
def test_sigkill_at_random_moments_keeps_checkpoints_snapshots_and_counts(topics, make_daemon) -> None:
    rng = random.Random(20250611)
    produced = 0
    first = sim_events(25, seed=51)
    produce(topics.bootstrap, topics.telemetry, encode_events(first))
    produced += len(first)
    # Short intervals so that a kill often lands inside a checkpoint or a snapshot publish.
    daemon = make_daemon(topics, checkpoint={"interval_seconds": 0.5}, publish={"interval_seconds": 1.0},
                         **FAST).start()
    daemon.wait_for(lambda: daemon.metric("streamdqn_snapshot_version") >= 1, 60, "a first snapshot")

    # One kill at each moment: every restart waits for the group to hand the partitions back (5 s
    # and more on tansu), so each further kill costs ~10 s.
    moments = ["during checkpoint write", "during snapshot publish", "right after a checkpoint with progress",
               "random"]
    rng.shuffle(moments)
    hits = []
    consumed_before = 0
    for i, moment in enumerate(moments):
        chunk = shifted(5, seed=60 + i, offset=10_000 * (i + 1))  # new events: ingest is busy at the kill
        produce(topics.bootstrap, topics.telemetry, encode_events(chunk))
        produced += len(chunk)
        hits.append(_wait_then_kill(daemon, moment, rng, consumed_before))
        offsets, consumed_before = _check_state(daemon.state_dir)
        restored = len(events_named(daemon, "checkpoint restored"))
        daemon.start()
        daemon.wait_for(lambda n=restored: len(events_named(daemon, "checkpoint restored")) > n, 30,
                        "the restore")
        event = events_named(daemon, "checkpoint restored")[-1]
        assert event["offsets"] == offsets and event["events_consumed"] == consumed_before, (event, offsets)

    daemon.wait_for(lambda: counted(daemon) >= produced and daemon.caught_up(), 90,
                    "every event after the last kill")
    assert daemon.metric("streamdqn_events_consumed_total") == produced, hits
    assert daemon.rejected_total() == 0
    # At least one kill must have landed inside a write, or the test proved little.
    assert {"during checkpoint write", "during snapshot publish"} & set(hits), hits
    leftovers = [p.name for p in (daemon.state_dir / "checkpoints").iterdir() if p.suffix == ".tmp"]
    print(f"sigkill: kills at {hits}; checkpoint temp files left behind: {leftovers}")


# ---------------------------------------------------------------- 4: SIGTERM in the middle of a backlog


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def test_sigterm_mid_backlog_exits_0_with_final_checkpoint_and_snapshot(topics, make_daemon) -> None:
    backlog = sim_events(250, seed=71, sandboxes=16)
    produce(topics.bootstrap, topics.telemetry, encode_events(backlog))
    stop_timeout = 20.0
    # The default learner process; a replay ratio it cannot keep up with throttles ingest
    # (backpressure) on a fast idle machine too, so the backlog takes a while and the signal lands
    # mid-stream.
    daemon = make_daemon(topics, lifecycle={"stop_timeout_seconds": stop_timeout},
                         learner={"updates_per_transition": 2.0, "min_samples_per_insert": 64.0}).start()
    daemon.wait_for(lambda: daemon.metric("streamdqn_learner_updates_total") >= 20, 60, "learning")
    consumed = daemon.metric("streamdqn_events_consumed_total")
    assert 0 < consumed < len(backlog), "the backlog was gone before the signal; make it larger"
    assert daemon.process is not None
    # As systemd does (KillMode=control-group): SIGTERM to the daemon and its learner process at once.
    for pid in [daemon.process.pid, *_children(daemon.process.pid)]:
        os.kill(pid, signal.SIGTERM)
    signalled = time.monotonic()
    assert daemon.wait_exit(stop_timeout + 5) == 0
    took = time.monotonic() - signalled
    assert took < stop_timeout, f"exit took {took:.1f}s"

    logged = daemon.log_events()
    final_checkpoint = [e for e in logged if e["event"] == "checkpoint written" and e["final"]]
    final_snapshot = [e for e in logged if e["event"] == "snapshot published" and e["final"]]
    assert len(final_checkpoint) == 1
    assert len(final_snapshot) == 1
    assert final_checkpoint[0]["events_consumed"] >= consumed
    assert logged[-1]["event"] == "stopped"
    # The final checkpoint is the one a restart loads, and `latest` is the final snapshot.
    loaded = CheckpointStore(daemon.state_dir / "checkpoints").load_latest()
    assert loaded is not None
    assert loaded.path == Path(str(final_checkpoint[0]["path"]))
    state = DaemonState.from_checkpoint(loaded.state, str(loaded.path))
    assert state.stream.counters.events_consumed == final_checkpoint[0]["events_consumed"]
    assert os.readlink(daemon.state_dir / "snapshots" / "latest") == str(final_snapshot[0]["version"])
    assert_clean_log(daemon)


# ---------------------------------------------------------------- 5: poison input

MAX_EVENTS = 200  # ingest.max_events_per_message in the poison test
REASONS = {b"too_large", b"decode_error", b"not_an_event", b"too_many_events", b"validation_error",
           b"duplicate", b"out_of_order", b"episode_closed"}
PLACEHOLDER = "<sandbox>"

_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=6)
_int64 = st.integers(-(2**63), 2**63 - 1)


def _outside(low: float, high: float) -> st.SearchStrategy[float]:
    """Floats outside [low, high]: NaN and ±inf included."""
    return st.one_of(st.just(math.nan), st.sampled_from([math.inf, -math.inf]),
                     st.floats().filter(lambda x: not low <= x <= high))


# (field, a value that field must refuse): every draw is invalid by construction.
_bad_field = st.one_of(
    st.tuples(st.sampled_from(COUNT_FIELDS), st.one_of(
        st.integers(-(2**63), -1), st.integers(2**53 + 1, 2**63 - 1), st.floats(), _text, st.booleans(),
        st.none(), st.lists(st.integers(0, 9), max_size=3))),
    st.tuples(st.just("severity"), st.one_of(_outside(0.0, 1.0), _text, st.none())),
    st.tuples(st.just("cpu_usage"), st.one_of(_outside(0.0, 100.0), _text)),
    st.tuples(st.just("memory_usage"), _outside(0.0, 1e9)),
    st.tuples(st.sampled_from(("is_malicious", *FLAG_FIELDS)),
              st.one_of(_int64, _text, st.none(), st.floats())),
    st.tuples(st.just("action"), st.one_of(
        _int64.filter(lambda a: not 0 <= a <= 4), st.booleans(), st.floats(),
        _text.filter(lambda t: t.strip().lower() not in ACTION_NAMES))),
    st.tuples(st.just("step"), st.one_of(st.integers(-(2**63), -1), st.integers(10**9 + 1, 2**63 - 1),
                                         st.floats(), _text)),
    st.tuples(st.just("episode_id"), st.one_of(st.floats(), st.none(), st.just(""),
                                               st.text(min_size=257, max_size=260),
                                               st.lists(st.integers(0, 9), max_size=2))),
    st.tuples(st.just("reward"), _outside(-1e6, 1e6)),
)
_REQUIRED = ("episode_id", "step", "is_malicious", "severity", *COUNT_FIELDS, "cpu_usage", "memory_usage",
             *FLAG_FIELDS)


@st.composite
def _bad_record(draw: st.DrawFn) -> object:
    kind = draw(st.sampled_from(["field", "field", "field", "missing", "not a dict"]))
    if kind == "not a dict":
        return draw(st.one_of(_int64, _text, st.none(), st.lists(st.integers(0, 9), max_size=3)))
    event = event_dict(sandbox_id=PLACEHOLDER, episode_id="bad", step=0)
    if kind == "missing":
        del event[draw(st.sampled_from(_REQUIRED))]
    else:
        name, value = draw(_bad_field)
        event[name] = value
    return event


@st.composite
def _poison_message(draw: st.DrawFn) -> tuple[list[object], int, int, str]:
    """(records, good events, bad records, format): good riders of one fresh episode, in step order,
    with bad records mixed in at drawn positions. Extreme but valid values ride along too."""
    riders = draw(st.integers(0, 3))
    records: list[object] = []
    extremes = {"bytes_sent": 2**53, "memory_usage": 1e9, "cpu_usage": 100.0, "reward": 1e6}
    for step in range(riders):
        extreme = draw(st.booleans())
        records.append(event_dict(sandbox_id=PLACEHOLDER, episode_id="good", step=step,
                                  final=step == riders - 1, **(extremes if extreme else {})))
    bad = draw(st.integers(1, 3))
    for _ in range(bad):
        records.insert(draw(st.integers(0, len(records))), draw(_bad_record()))
    return records, riders, bad, draw(st.sampled_from(["json", "msgpack"]))


def draw_poison(examples: int) -> list[tuple[Message, int, int]]:
    """`examples` poison messages drawn by hypothesis (derandomized: the same ones every run),
    each as (message, good events, rejected events); every message gets its own sandbox."""
    drawn: list[tuple[Message, int, int]] = []

    @settings(max_examples=examples, database=None, derandomize=True, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(_poison_message(), st.binary(max_size=300), st.integers(1, 10_000))
    def collect(message: tuple[list[object], int, int, str], noise: bytes, cut: int) -> None:
        records, good, bad, fmt = message
        sandbox = f"poison-{len(drawn)}"
        for r in records:
            if isinstance(r, dict) and r.get("sandbox_id") == PLACEHOLDER:
                r["sandbox_id"] = sandbox
        key = sandbox.encode()
        if fmt == "json":
            value, ct = json.dumps(records).encode(), b"application/json"
        else:
            value, ct = msgpack.packb(records), b"application/msgpack"
        drawn.append((Message(value, key, (("content-type", ct),)), good, bad))
        # Random bytes and a truncated msgpack message (no content type: the first byte decides).
        noise_rejects = len(decode(noise, max_events=MAX_EVENTS).rejects)
        drawn.append((Message(noise, key + b"-noise"), 0, noise_rejects))
        packed = msgpack.packb([event_dict(sandbox_id=sandbox + "-cut", step=0)])
        drawn.append((Message(packed[: cut % len(packed)], key + b"-cut"), 0, 1))

    collect()
    return drawn


def explicit_poison() -> list[tuple[Message, int, int]]:
    """The large and structural cases, and the episode-order ones: (message, good, rejected)."""
    nested_json = b"[" * 100_000 + b"]" * 100_000
    nested_msgpack = b"\x91" * 100_000 + b"\x90"
    too_many = json.dumps([event_dict(sandbox_id="many", episode_id=1, step=i)
                           for i in range(MAX_EVENTS + 1)])
    huge_header = b"\xdd\xff\xff\xff\xff"  # a msgpack array that claims 2**32 - 1 elements
    ten_mb = json.dumps([event_dict(sandbox_id="big", step=0, padding="x" * 1000)] * 10_300).encode()
    assert len(ten_mb) > 10 * 2**20
    nan_literal = json.dumps(event_dict(sandbox_id="nan", severity=0.5)).replace("0.5", "NaN").encode()
    out = [
        (Message(nested_json, b"nested-json"), 0, 1),
        (Message(nested_msgpack, b"nested-msgpack", (("content-type", b"application/msgpack"),)), 0, 1),
        (Message(too_many.encode(), b"many"), 0, 1),
        (Message(huge_header, b"huge-header"), 0, 1),
        (Message(ten_mb, b"big"), 0, 1),
        (Message(nan_literal, b"nan"), 0, 1),
    ]
    # One sandbox's episode: steps 0, 1, 2, then 1 again (out of order), 2 again (duplicate), 3 final;
    # then an event of that finished episode (episode_closed). One message per event, all keyed alike.
    steps = [(0, 1, 0), (1, 1, 0), (2, 1, 0), (1, 0, 1), (2, 0, 1), (3, 1, 0), (4, 0, 1)]
    for step, good, bad in steps:
        event = event_dict(sandbox_id="order", episode_id=7, step=step, final=step == 3)
        out.append((Message(json.dumps(event).encode(), b"order"), good, bad))
    return out


def vm_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


RSS_GROWTH_BOUND_MIB = 100


def test_poison_is_dead_lettered_good_events_kept_and_memory_bounded(topics, make_daemon) -> None:
    poison = draw_poison(40) + explicit_poison()
    order_cases = [p for p in poison if p[0].key == b"order"]
    poison = [p for p in poison if p[0].key != b"order"]
    for message, good, bad in poison:  # the decoder agrees with the construction
        decoded = decode(message.value, None if not message.headers else message.headers[0][1].decode(),
                         max_events=MAX_EVENTS)
        assert (len(decoded.events), len(decoded.rejects)) == (good, bad), message.value[:200]
    clean = sim_events(30, seed=81)
    produce(topics.bootstrap, topics.telemetry, encode_events(clean))
    daemon = make_daemon(topics, ingest={"max_events_per_message": MAX_EVENTS},
                         publish={"interval_seconds": 1.0}, **FAST).start()
    daemon.wait_for(lambda: daemon.metric("streamdqn_events_consumed_total") == len(clean), 60, "clean")
    daemon.wait_for(lambda: daemon.metric("streamdqn_snapshot_version") >= 1, 60, "a snapshot")
    assert daemon.process is not None
    rss_before = vm_rss_kib(daemon.process.pid)

    random.Random(5).shuffle(poison)
    poison += order_cases  # these keep their order (one key, so one partition)
    produce(topics.bootstrap, topics.telemetry, [m for m, _, _ in poison])
    good = len(clean) + sum(g for _, g, _ in poison)
    bad = sum(b for _, _, b in poison)
    letters = sum(1 for _, _, b in poison if b)
    daemon.wait_for(lambda: counted(daemon) >= good + bad and daemon.caught_up(), 60, "every poison message")
    m = daemon.metrics()
    assert m["streamdqn_events_consumed_total"] == good
    assert daemon.rejected_total() == bad
    assert m["streamdqn_events_dead_lettered_total"] == letters
    assert m['streamdqn_events_rejected_total{reason="too_large"}'] == 1
    assert m['streamdqn_events_rejected_total{reason="too_many_events"}'] == 1
    for reason in ("out_of_order", "duplicate", "episode_closed"):
        assert m[f'streamdqn_events_rejected_total{{reason="{reason}"}}'] == 1
    rss_after = vm_rss_kib(daemon.process.pid)
    growth_mib = (rss_after - rss_before) / 1024
    assert growth_mib < RSS_GROWTH_BOUND_MIB, f"RSS {rss_before // 1024} -> {rss_after // 1024} MiB"

    dead = consume_all(topics.bootstrap, topics.dlq, expected=letters, timeout=30)
    assert len(dead) == letters
    for letter in dead:
        headers = dict(letter.headers)  # type: ignore[attr-defined]
        assert headers["streamdqn-reason"] in REASONS
        assert headers["streamdqn-error"]
    big = [x for x in dead if dict(x.headers).get("streamdqn-truncated-from")]  # type: ignore[attr-defined]
    assert len(big) == 1
    assert int(dict(big[0].headers)["streamdqn-truncated-from"]) > 10 * 2**20

    # The normalizer never saw a non-finite value: the snapshot that learned every good event (so it
    # was taken after all of the poison had been read) has finite stats.
    def latest_learned() -> object:
        return json.loads(daemon.get("/snapshots/latest/manifest.json"))["events_learned"]

    daemon.wait_for(lambda: latest_learned() == good, 30, "a snapshot that learned every good event")
    manifest = json.loads(daemon.get("/snapshots/latest/manifest.json"))
    normalizer = manifest["normalizer"]
    assert np.isfinite(normalizer["mean"]).all()
    assert np.isfinite(normalizer["std"]).all()
    assert math.isfinite(m["streamdqn_learner_loss"])
    assert_clean_log(daemon)
    print(f"poison: {len(poison)} messages, {good} good / {bad} bad events; RSS {rss_before // 1024} -> "
          f"{rss_after // 1024} MiB")


# ---------------------------------------------------------------- 6: disk full, file-size limit


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs to fill up; skips where mounting is not permitted (needs root/CAP_SYS_ADMIN)."""
    mount_point = tmp_path / "state"
    mount_point.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount_point)],
                              capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot mount a tmpfs here: {exc}")
    if done.returncode != 0:
        why = done.stderr.decode().strip()
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {why}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True, timeout=10)


def fill_up(path: Path) -> None:
    """Write `path` until the file system is full (ENOSPC), down to the last 4 KiB page."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for chunk in (1 << 20, 1 << 16, 1 << 12):
            try:
                while True:
                    os.write(fd, b"\0" * chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
    finally:
        os.close(fd)


def served_latest(daemon: DaemonProcess) -> tuple[int, str]:
    """(version, model sha256) of what /snapshots/latest serves, the model checked against its manifest."""
    manifest = json.loads(daemon.get("/snapshots/latest/manifest.json"))
    model = daemon.get(f"/snapshots/{manifest['version']}/model.onnx")
    assert sha256_hex(model) == manifest["sha256"]
    return int(manifest["version"]), str(manifest["sha256"])


def no_temp_files(state_dir: Path) -> bool:
    return not [p for d in ("checkpoints", "snapshots") for p in (state_dir / d).iterdir()
                if p.name.startswith(".")]


def test_disk_full_keeps_the_previous_checkpoint_and_snapshot_and_recovers(topics, make_daemon,
                                                                           small_tmpfs: Path) -> None:
    produce(topics.bootstrap, topics.telemetry, encode_events(sim_events(30, seed=91)))
    daemon = make_daemon(topics, state_dir=small_tmpfs, checkpoint={"interval_seconds": 1.0},
                         publish={"interval_seconds": 1.0}, **FAST).start()
    daemon.wait_for(lambda: daemon.metric("streamdqn_snapshot_version") >= 1, 60, "a snapshot")
    daemon.wait_for(lambda: events_named(daemon, "checkpoint written"), 30, "a checkpoint")

    fill_up(small_tmpfs / "filler")
    full_since = time.time()
    version, sha = served_latest(daemon)
    more = shifted(10, seed=92, offset=10_000)
    produce(topics.bootstrap, topics.telemetry, encode_events(more))
    daemon.wait_for(lambda: daemon.metric("streamdqn_checkpoint_failures_total") >= 2
                    and daemon.metric("streamdqn_snapshot_failures_total") >= 2, 30, "failures while full")
    failures = [e for e in daemon.log_events() if e["ts"] > full_since  # type: ignore[operator]
                and e["event"] in ("checkpoint failed", "snapshot failed")]
    assert {e["event"] for e in failures} == {"checkpoint failed", "snapshot failed"}
    assert all("No space left" in str(e["error"]) for e in failures), failures
    # The previous `latest` is intact and still served; the previous checkpoint still loads.
    assert served_latest(daemon) == (version, sha)
    assert os.readlink(small_tmpfs / "snapshots" / "latest") == str(version)
    assert CheckpointStore(small_tmpfs / "checkpoints").load_latest() is not None
    assert daemon.metric("streamdqn_snapshot_version") == version
    daemon.wait_for(lambda: counted(daemon) >= 1, 5, "ingest")  # and ingest goes on
    assert no_temp_files(small_tmpfs)  # failed writes clean up after themselves

    (small_tmpfs / "filler").unlink()
    freed_at = time.time()
    daemon.wait_for(lambda: daemon.metric("streamdqn_snapshot_version") > version, 30, "a snapshot")
    daemon.wait_for(lambda: any(e["ts"] > freed_at for e in events_named(daemon, "checkpoint written")), 30,  # type: ignore[operator]
                    "a checkpoint once space returns")
    assert served_latest(daemon)[0] > version
    assert_clean_log(daemon)


def test_file_size_limit_fails_the_checkpoint_without_killing_the_daemon(topics, make_daemon) -> None:
    # systemd's LimitFSIZE= or `ulimit -f`. The kernel sends SIGXFSZ to a process writing past the limit,
    # and its default action kills; CPython ignores SIGXFSZ at startup, so the write fails with EFBIG
    # instead (checked: this test passes with no signal handling in the daemon).
    produce(topics.bootstrap, topics.telemetry, encode_events(sim_events(60, seed=95)))
    daemon = make_daemon(topics, checkpoint={"interval_seconds": 1.0}, **FAST).start()
    daemon.wait_for(lambda: events_named(daemon, "checkpoint written")
                    and events_named(daemon, "checkpoint written")[-1]["events_consumed"] > 0, 60,
                    "a checkpoint")
    checkpoint_size = Path(str(events_named(daemon, "checkpoint written")[-1]["path"])).stat().st_size
    limit = daemon.log_path.stat().st_size + 64 * 1024  # room for the log file (the child's stdout) to grow
    assert checkpoint_size > 1.5 * limit, (checkpoint_size, limit)
    assert daemon.process is not None
    pid = daemon.process.pid
    limited_at = time.time()
    _, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)
    # Only the soft limit: raising it back needs no privilege.
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (limit, hard))
    try:
        daemon.wait_for(lambda: daemon.metric("streamdqn_checkpoint_failures_total") >= 2, 30, "failures")
    finally:
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (hard, hard))
    failed = [e for e in events_named(daemon, "checkpoint failed") if e["ts"] > limited_at]  # type: ignore[operator]
    assert failed and all("File too large" in str(e["error"]) for e in failed), failed
    lifted_at = time.time()
    daemon.wait_for(lambda: any(e["ts"] > lifted_at for e in events_named(daemon, "checkpoint written")), 30,  # type: ignore[operator]
                    "a checkpoint once the limit is lifted")
    assert CheckpointStore(daemon.state_dir / "checkpoints").load_latest() is not None
    assert no_temp_files(daemon.state_dir)
    assert_clean_log(daemon)


# ---------------------------------------------------------------- 7: partition reassignment


class SecondMember:
    """A plain aiokafka consumer in the daemon's group, in a thread of its own. It never commits."""

    def __init__(self, topics: Topics) -> None:
        self.topics = topics
        self.assignment: set[int] = set()
        self.read = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), name="second-member")
        self.error: BaseException | None = None

    async def _run(self) -> None:
        # As another daemon would join: both topics, the same (range) assignor, which keeps a
        # sandbox's telemetry and verdicts on one member.
        consumer = AIOKafkaConsumer(self.topics.telemetry, self.topics.verdicts,
                                    bootstrap_servers=self.topics.bootstrap, group_id=self.topics.group,
                                    enable_auto_commit=False, auto_offset_reset="earliest",
                                    partition_assignment_strategy=(RangePartitionAssignor,))
        try:
            await consumer.start()
            try:
                while not self._stop.is_set():
                    batches = await consumer.getmany(timeout_ms=200)
                    self.read += sum(len(records) for records in batches.values())
                    self.assignment = {tp.partition for tp in consumer.assignment()
                                       if tp.topic == self.topics.telemetry}
            finally:
                await consumer.stop()  # leaves the group; auto-commit is off, so nothing is committed
        except BaseException as exc:  # noqa: BLE001 - reported to the test's thread, which fails on it
            self.error = exc

    def __enter__(self) -> SecondMember:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


def wait_until(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.mark.slow
def test_partition_reassignment_drops_open_episodes_and_counts_each_event_once(topics, make_daemon) -> None:
    first = sim_events(20, seed=101, sandboxes=8)
    produce(topics.bootstrap, topics.telemetry, encode_events(first))
    daemon = make_daemon(topics, **FAST).start()
    daemon.wait_for(lambda: daemon.metric("streamdqn_events_consumed_total") == len(first), 60, "a batch")
    # Open episodes to drop: the first steps of new episodes, their ends produced later.
    later = shifted(12, seed=102, offset=10_000, sandboxes=8)
    half = len(later) // 2
    produce(topics.bootstrap, topics.telemetry, encode_events(later[:half]))
    daemon.wait_for(lambda: daemon.metric("streamdqn_events_consumed_total") == len(first) + half, 30, "half")
    assert daemon.metric("streamdqn_partitions_assigned") == 4

    with SecondMember(topics) as second:
        daemon.wait_for(lambda: second.assignment and daemon.metric("streamdqn_partitions_assigned") < 4, 60,
                        "the group to split the partitions")
        assert second.error is None
        mine = daemon.metric("streamdqn_partitions_assigned")
        assert mine + len(second.assignment) == 4
        produce(topics.bootstrap, topics.telemetry, encode_events(later[half:]))
        wait_until(lambda: second.read > 0, 30, "the second member to read what it was given")
    assert second.error is None
    daemon.wait_for(lambda: daemon.metric("streamdqn_partitions_assigned") == 4, 60, "the partitions back")
    total = len(first) + len(later)
    daemon.wait_for(lambda: counted(daemon) >= total and daemon.caught_up(), 60, "every event")
    assert daemon.metric("streamdqn_events_consumed_total") == total
    assert daemon.rejected_total() == 0

    logged = daemon.log_events()
    names = [e["event"] for e in logged]
    revoked = [i for i, name in enumerate(names) if name == "partitions revoked"]
    assert len(revoked) >= 2
    assert sum(int(logged[i]["open_episodes_dropped"]) for i in revoked) > 0
    assert names.count("partitions assigned") >= 3
    for i in revoked:  # each revocation writes a checkpoint before the partitions move
        assert "checkpoint written" in names[i + 1 : i + 3], names[i : i + 3]
    assert_clean_log(daemon)
