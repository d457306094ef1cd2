"""Fixtures for tests against a real Kafka-compatible broker and the daemon as a subprocess.

The broker is, in order of preference: STREAMDQN_TEST_KAFKA=host:port when set; testcontainers'
Kafka module when STREAMDQN_TEST_TESTCONTAINERS=1 and Docker answers; else the embedded tansu
broker on a free loopback port (what CI uses).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from streamdqn.kafka.admin import ensure_topics
from streamdqn.kafka.broker import EmbeddedBroker, free_port
from streamdqn.kafka.options import KafkaOptions
from streamdqn.offline.simulator import simulate

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    explicit = os.environ.get("STREAMDQN_TEST_KAFKA")
    if explicit:
        yield explicit
        return
    if os.environ.get("STREAMDQN_TEST_TESTCONTAINERS") == "1" and shutil.which("docker"):
        kafka = pytest.importorskip("testcontainers.kafka")
        with kafka.KafkaContainer() as container:
            yield container.get_bootstrap_server()
        return
    log = tmp_path_factory.mktemp("broker") / "tansu.log"
    with EmbeddedBroker(log_file=log) as broker:
        yield broker.bootstrap_servers


@dataclass
class Topics:
    bootstrap: str
    telemetry: str
    dlq: str
    snapshots: str
    group: str
    verdicts: str

    @staticmethod
    def fresh(bootstrap: str) -> Topics:
        """Names no other test uses (not created yet)."""
        tag = uuid.uuid4().hex[:10]
        return Topics(bootstrap, f"telemetry-{tag}", f"dlq-{tag}", f"snapshots-{tag}", f"group-{tag}",
                      f"verdicts-{tag}")

    def create(self, partitions: int = 4) -> Topics:
        # The verdicts topic is co-partitioned with the telemetry, as the daemon requires.
        asyncio.run(ensure_topics(KafkaOptions(self.bootstrap, self.telemetry, self.group),
                                  {self.telemetry: partitions, self.verdicts: partitions, self.dlq: 1,
                                   self.snapshots: 1}))
        return self


@pytest.fixture
def topics(kafka_bootstrap: str) -> Topics:
    return Topics.fresh(kafka_bootstrap).create()


# ---------------------------------------------------------------- producing


@dataclass(frozen=True)
class Message:
    value: bytes
    key: bytes | None = None
    headers: tuple[tuple[str, bytes], ...] = ()


def encode_events(events: Sequence[dict[str, object]], *, msgpack_every: int = 2) -> list[Message]:
    """One message per event, keyed by sandbox_id; every `msgpack_every`-th one as msgpack."""
    out = []
    for i, event in enumerate(events):
        key = str(event["sandbox_id"]).encode()
        if msgpack_every and i % msgpack_every == 1:
            out.append(Message(msgpack.packb(event), key, (("content-type", b"application/msgpack"),)))
        else:
            out.append(Message(json.dumps(event).encode(), key, (("content-type", b"application/json"),)))
    return out


def produce(bootstrap: str, topic: str, messages: Sequence[Message]) -> None:
    async def run() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5,
                                    max_request_size=16 * 1024 * 1024)
        await producer.start()
        try:
            futures = [await producer.send(topic, m.value, key=m.key, headers=list(m.headers))
                       for m in messages]
            await asyncio.gather(*futures)
        finally:
            await producer.stop()

    asyncio.run(run())


def consume_all(bootstrap: str, topic: str, expected: int, timeout: float = 30.0) -> list[object]:
    """Every record of `topic` from its beginning: until `expected` have come, then a second longer."""

    async def run() -> list[object]:
        # No consumer group: the consumer is given every partition at once, instead of waiting for a
        # group join (5 s on tansu, half of aiokafka's session timeout).
        consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None,
                                    auto_offset_reset="earliest", enable_auto_commit=False)
        await consumer.start()
        out: list[object] = []
        try:
            deadline = time.monotonic() + timeout
            while len(out) < expected and time.monotonic() < deadline:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    out.extend(records)
            # A little longer, to see records beyond the expected count if there are any.
            for records in (await consumer.getmany(timeout_ms=1000)).values():
                out.extend(records)
        finally:
            await consumer.stop()
        return out

    return asyncio.run(run())


def sim_events(episodes: int, seed: int, sandboxes: int = 6) -> list[dict[str, object]]:
    return list(simulate(episodes, seed, sandboxes=sandboxes))


# ---------------------------------------------------------------- the daemon as a subprocess


@dataclass
class DaemonProcess:
    """`streamdqn run --config FILE` as systemd would run it; logs go to a file."""

    config: Path
    state_dir: Path
    port: int
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> DaemonProcess:
        inherited = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
        env = {**inherited, "PYTHONUNBUFFERED": "1", **self.env}
        self.env_used = env
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it
        self.process = subprocess.Popen(
            [sys.executable, "-m", "streamdqn", "run", "--config", str(self.config)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            cwd=self.state_dir.parent,
        )
        log.close()
        self.wait_http()
        return self

    def wait_http(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"daemon exited with {self.process.returncode}:\n{self.logs()[-3000:]}")
            try:
                self.get("/healthz", timeout=1)
                return
            except OSError:
                time.sleep(0.2)
        raise AssertionError(f"daemon HTTP did not come up in {timeout}s:\n{self.logs()[-3000:]}")

    def get(self, path: str, timeout: float = 5.0) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
            return bytes(response.read())

    def metrics(self) -> dict[str, float]:
        """Samples of /metrics as {'name{labels}': value}."""
        out = {}
        for line in self.get("/metrics").decode().splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def metric(self, name: str, default: float = 0.0) -> float:
        return self.metrics().get(name, default)

    def rejected_total(self) -> float:
        return sum(v for k, v in self.metrics().items() if k.startswith("streamdqn_events_rejected_total{"))

    def caught_up(self) -> bool:
        """Whether the daemon has read to the end of every partition it is assigned: each has a
        consumer-lag sample (a fetch has answered for it) and all are 0. Then nothing is left that it
        could still count, and a count can be checked without waiting a while to see it go on."""
        m = self.metrics()
        lags = [v for k, v in m.items() if k.startswith("streamdqn_consumer_lag{")]
        assigned = m.get("streamdqn_partitions_assigned", 0.0)
        return assigned > 0 and len(lags) >= assigned and not any(lags)

    def wait_for(self, predicate: object, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"daemon exited ({self.process.returncode}) waiting for {what}:\n"
                                     f"{self.logs()[-4000:]}")
            try:
                last = predicate()  # type: ignore[operator]
                if last:
                    return
            except OSError as exc:
                last = exc
            time.sleep(0.3)
        raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r}):\n"
                             f"{self.logs()[-4000:]}")

    def signal(self, sig: int) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def wait_exit(self, timeout: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout=timeout)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_events(self) -> list[dict[str, object]]:
        out = []
        for line in self.logs().splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
        return out

# Small and fast daemon settings for fault and security tests: thread learner (no second torch
# import competing for the 2 cores), tiny network, small replay.
FAST: dict[str, dict[str, object]] = {
    "learner": {"mode": "thread", "hidden": [64, 64], "updates_per_transition": 0.5},
    "replay": {"capacity": 50_000, "min_size": 50},
}


def write_config(
    path: Path, topics: Topics, state_dir: Path, port: int, **sections: dict[str, object]
) -> Path:
    base: dict[str, dict[str, object]] = {
        "kafka": {"bootstrap_servers": topics.bootstrap, "topic": topics.telemetry, "group_id": topics.group,
                  "dlq_topic": topics.dlq, "snapshot_topic": topics.snapshots,
                  "verdicts_topic": topics.verdicts, "poll_timeout_ms": 100},
        "http": {"host": "127.0.0.1", "port": port},
        "state": {"dir": str(state_dir)},
        "publish": {"interval_seconds": 3.0, "min_updates": 20, "keep": 50},
        "checkpoint": {"interval_seconds": 2.0},
        "lifecycle": {"stop_timeout_seconds": 30.0, "progress_timeout_seconds": 60.0,
                      "broker_retry_max_seconds": 2.0},
        "learner": {"hidden": [64, 64], "updates_per_transition": 0.5},
        "replay": {"capacity": 50_000, "min_size": 100},
        "log": {"json": True, "level": "INFO"},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    lines = []
    for section, values in base.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {json.dumps(value)}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def make_daemon(tmp_path: Path) -> Iterator[object]:
    started: list[DaemonProcess] = []

    def make(topics: Topics, *, state_dir: Path | None = None, env: dict[str, str] | None = None,
             **sections: dict[str, object]) -> DaemonProcess:
        state = state_dir or tmp_path / "state"
        port = free_port()
        config = write_config(tmp_path / f"streamdqn-{len(started)}.toml", topics, state, port, **sections)
        daemon = DaemonProcess(config, state, port, tmp_path / "daemon.log", env or {})
        started.append(daemon)
        return daemon

    yield make
    for daemon in started:
        daemon.stop()


# ---------------------------------------------------------------- a daemon that has learned and published


# Publish intervals of the live daemon: short, so that test_an_idle_stream_exports_nothing_new can
# watch a few of them go by without a new snapshot.
LIVE_PUBLISH_INTERVAL = 1.0


@pytest.fixture(scope="session")
def live_daemon(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    tmp = tmp_path_factory.mktemp("live")
    t = Topics.fresh(kafka_bootstrap).create()
    # Half of the sandboxes say which policy they acted with, so per-version outcomes have samples.
    events = [{**e, "policy_version": "1"} if i % 2 else e for i, e in enumerate(sim_events(40, seed=11))]
    produce(t.bootstrap, t.telemetry, [*encode_events(events), Message(b"\x00not telemetry")])
    port = free_port()
    config = write_config(tmp / "streamdqn.toml", t, tmp / "state", port,
                          publish={"interval_seconds": LIVE_PUBLISH_INTERVAL})
    daemon = DaemonProcess(config, tmp / "state", port, tmp / "daemon.log").start()
    try:
        daemon.wait_for(lambda: daemon.metric("streamdqn_snapshot_version") >= 1, 120, "a published snapshot")
        daemon.wait_for(lambda: daemon.metric("streamdqn_events_consumed_total") >= len(events), 60,
                        "all events consumed")
        daemon.wait_for(lambda: any(k.startswith("streamdqn_policy_action_share{") for k in daemon.metrics()),
                        30, "the rollout's first drift measurement")
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture(scope="session")
def daemon_metrics_text(live_daemon: DaemonProcess) -> str:
    return live_daemon.get("/metrics").decode()
