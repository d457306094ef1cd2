"""Freshness: from an event produced to a published snapshot whose manifest has learned it.

Runs the real daemon (`python -m streamdqn run --config FILE`, a subprocess, with the settings of
`daemon.demo.demo_settings`, publish gate off) against an embedded tansu broker, with simulated sandboxes
producing in the background. For each sample, the background producer pauses (so that the count
of events before the marker is known), one marked event with a unique episode_id is produced, and
this process polls the daemon's HTTP server every 20 ms:

    ingested    /metrics streamdqn_events_consumed_total covers the marker
    published   /snapshots/latest/manifest.json has events_learned covering the marker

`events_learned` is the ingest counter at the moment the snapshot's weights were taken: the marker
has been decoded, featurized and pushed into replay, and the learner has been updating on that
replay since. At the default publish interval (300 s) freshness is dominated by the interval:

    freshness ~= ingest latency + U(0, interval) + publish time      (mean: + interval / 2)

so it is measured at a short interval (5 s; smoke: 2 s) and the formula gives the default's.

    python bench/freshness.py [--smoke] [--interval S] [--samples N]
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
from _common import emit, header, table
from aiokafka import AIOKafkaProducer

from streamdqn.daemon.demo import demo_settings
from streamdqn.kafka.admin import ensure_topics
from streamdqn.kafka.broker import EmbeddedBroker, free_port
from streamdqn.kafka.options import KafkaOptions
from streamdqn.offline.simulator import simulate

DEFAULT_INTERVAL = 300.0
POLL_S = 0.02
CT = [("content-type", b"application/json")]


def write_config(
    path: Path, bootstrap: str, state_dir: Path, port: int, interval: float, tag: str, learner_mode: str
) -> dict[str, dict[str, object]]:
    """The demo's settings as a TOML file for `streamdqn run` (fresh topics and group)."""
    s = demo_settings(bootstrap, state_dir, port, interval)
    config: dict[str, dict[str, object]] = {
        "kafka": {
            "bootstrap_servers": s.kafka.bootstrap_servers,
            "topic": f"telemetry-{tag}",
            "group_id": f"group-{tag}",
            "dlq_topic": f"dlq-{tag}",
            "snapshot_topic": f"snapshots-{tag}",
        },
        "http": {"host": s.http.host, "port": s.http.port},
        "state": {"dir": str(s.state.dir)},
        # The publish gate is off: with it, a rejected candidate waits for the next interval, and how
        # often that happens depends on how well the model has learned, not on the pipeline.
        "publish": {
            "interval_seconds": s.publish.interval_seconds,
            "min_updates": s.publish.min_updates,
            "gate": False,
        },
        "checkpoint": {"interval_seconds": s.checkpoint.interval_seconds},
        "replay": {"capacity": s.replay.capacity, "min_size": s.replay.min_size},
        "learner": {"mode": learner_mode},
        "log": {"json": True},
    }
    lines = []
    for section, values in config.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return config


class Producer:
    """Simulated sandboxes at about `rate` events/s; pausable, counting acknowledged events."""

    def __init__(self, bootstrap: str, topic: str, rate: float, burst: int = 0) -> None:
        self.bootstrap, self.topic, self.rate, self.burst = bootstrap, topic, rate, burst
        self.acked = 0
        self.running = asyncio.Event()
        self._producer: AIOKafkaProducer | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, linger_ms=5, acks="all")
        await self._producer.start()
        self.running.set()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        assert self._producer is not None
        started, sent = time.monotonic(), 0
        for event in simulate(1_000_000, seed=5):
            await self.running.wait()
            future = await self._producer.send(
                self.topic, json.dumps(event).encode(), key=str(event["sandbox_id"]).encode(), headers=CT
            )
            future.add_done_callback(self._count)
            sent += 1
            # The first `burst` events go out at once: a backlog that fills replay before the first publish.
            ahead = (sent - self.burst) / self.rate - (time.monotonic() - started)
            if ahead > 0:
                await asyncio.sleep(ahead)
            elif ahead < -1:  # after a pause: do not burst to catch up
                started, sent, self.burst = time.monotonic(), 0, 0

    def _count(self, future: asyncio.Future[Any]) -> None:
        if not future.cancelled() and future.exception() is None:
            self.acked += 1

    async def pause(self) -> int:
        """Stop sending and wait until everything sent is acknowledged; returns the count."""
        assert self._producer is not None
        self.running.clear()
        await asyncio.sleep(0.05)  # let a send in flight be enqueued
        await self._producer.flush()
        await asyncio.sleep(0.05)  # acknowledgement callbacks
        return self.acked

    async def send_marker(self, marker: dict[str, object]) -> None:
        assert self._producer is not None
        await self._producer.send_and_wait(
            self.topic, json.dumps(marker).encode(), key=str(marker["sandbox_id"]).encode(), headers=CT
        )

    def resume(self) -> None:
        self.running.set()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._producer is not None:
            await self._producer.stop()


def marker_event(tag: str, n: int) -> dict[str, object]:
    return {
        "sandbox_id": f"bench-freshness-{tag}",
        "episode_id": f"marker-{tag}-{n}",
        "step": 0,
        "final": True,
        "is_malicious": False,
        "severity": 0.0,
        "syscall_count": 100,
        "file_read_count": 1,
        "file_write_count": 1,
        "network_connections": 0,
        "bytes_sent": 0,
        "bytes_received": 0,
        "child_processes": 0,
        "cpu_usage": 1.0,
        "memory_usage": 50.0,
        "registry_modification": False,
        "privilege_escalation_attempt": False,
        "code_injection_detected": False,
    }


async def metric(session: aiohttp.ClientSession, base: str, name: str) -> float:
    async with session.get(base + "/metrics") as response:
        for line in (await response.text()).splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
    return 0.0


async def manifest(session: aiohttp.ClientSession, base: str) -> dict[str, Any] | None:
    async with session.get(base + "/snapshots/latest/manifest.json") as response:
        if response.status != 200:
            return None
        return dict(await response.json())


async def wait_until(predicate: Any, timeout: float, what: str, daemon: subprocess.Popen[bytes]) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            raise RuntimeError(f"the daemon exited with {daemon.returncode} while waiting for {what}")
        try:
            value = await predicate()
            if value:
                return value
        except (aiohttp.ClientError, OSError, ValueError):
            pass
        await asyncio.sleep(POLL_S)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


async def measure(
    interval: float, samples: int, rate: float, backlog: int, learner_mode: str, workdir: Path
) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:8]
    with EmbeddedBroker() as broker:
        port = free_port()
        config = write_config(
            workdir / "streamdqn.toml",
            broker.bootstrap_servers,
            workdir / "state",
            port,
            interval,
            tag,
            learner_mode,
        )
        k = config["kafka"]
        await ensure_topics(
            KafkaOptions(broker.bootstrap_servers, str(k["topic"]), "unused"),
            {str(k["topic"]): 4, str(k["dlq_topic"]): 1, str(k["snapshot_topic"]): 1},
        )
        # The backlog goes in before the daemon starts, so that replay holds min_size rows at once.
        producer = Producer(broker.bootstrap_servers, str(k["topic"]), rate, burst=backlog)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("NOTIFY_SOCKET", None)
        base = f"http://127.0.0.1:{port}"
        results: list[dict[str, float]] = []
        daemon: subprocess.Popen[bytes] | None = None
        try:
            await producer.start()
            started = time.monotonic()
            # Once, before anything is measured: a blocking open and spawn cost nothing that counts.
            with open(workdir / "daemon.log", "wb") as log:  # noqa: ASYNC230
                daemon = subprocess.Popen(  # noqa: ASYNC220
                    [sys.executable, "-m", "streamdqn", "run", "--config", str(workdir / "streamdqn.toml")],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=env,
                )
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
                first = await wait_until(lambda: manifest(session, base), 180, "the first snapshot", daemon)
                startup = time.monotonic() - started
                for i in range(samples):
                    # Run under load for a while: a different phase of the publish interval each time.
                    await asyncio.sleep(0.5 + (i * 0.37 * interval) % interval)
                    before = await producer.pause()
                    t0 = time.monotonic()
                    await producer.send_marker(marker_event(tag, i))
                    sent = time.monotonic()
                    covered = before + 1

                    async def ingested(covered: int = covered) -> bool:
                        return await metric(session, base, "streamdqn_events_consumed_total") >= covered

                    async def published(covered: int = covered) -> dict[str, Any] | None:
                        m = await manifest(session, base)
                        return m if m is not None and m.get("events_learned", 0) >= covered else None

                    await wait_until(ingested, 60, "the marker to be ingested", daemon)
                    t_ingested = time.monotonic()
                    # Every event up to the marker is in; from here any snapshot with events_learned >=
                    # covered has learned the marker, so the load can go on (and the learner with it).
                    producer.resume()
                    snap = await wait_until(
                        published, 3 * interval + 60, "a snapshot that learned the marker", daemon
                    )
                    t_published = time.monotonic()
                    results.append(
                        {
                            "produce_s": sent - t0,
                            "ingested_s": t_ingested - t0,
                            "published_s": t_published - t0,
                            "version": snap["version"],
                            "events_learned": snap["events_learned"],
                            "marker_index": covered,
                        }
                    )
                    print(
                        f"  sample {i + 1}/{samples}: ingested after {t_ingested - t0:.3f} s, in snapshot "
                        f"{snap['version']} after {t_published - t0:.2f} s",
                        flush=True,
                    )
                info = {"startup_to_first_snapshot_s": startup, "first_version": first["version"]}
        finally:
            await producer.stop()
            if daemon is not None and daemon.poll() is None:
                daemon.send_signal(signal.SIGTERM)  # the daemon's ordered shutdown: checkpoint, publish, exit
                try:
                    await asyncio.to_thread(daemon.wait, 60)
                except subprocess.TimeoutExpired:
                    daemon.kill()
                    daemon.wait(timeout=10)
        exports = export_seconds(workdir / "daemon.log")
    return {**info, "samples": results, "export_seconds": exports, "daemon_exit_code": daemon.returncode}


def export_seconds(log_path: Path) -> list[float]:
    """Durations the daemon logged for each 'snapshot published'."""
    out = []
    for line in log_path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if record.get("event") == "snapshot published" and "seconds" in record:
                    out.append(float(record["seconds"]))
    return out


def run(smoke: bool, interval: float | None, samples: int | None) -> dict[str, Any]:
    interval = interval or (2.0 if smoke else 5.0)
    samples = samples or (1 if smoke else 6)
    # Smoke: light load, a backlog just over replay's min_size; full: a steady 500 events/s.
    rate, backlog = (100.0, 1200) if smoke else (500.0, 3000)
    # Smoke: the thread learner spares a second interpreter start; the full run uses the default (process).
    mode = "thread" if smoke else "process"
    print(
        f"daemon: streamdqn run, demo settings with the publish gate off, publish interval {interval:g} s, "
        f"learner {mode}; "
        f"a backlog of {backlog} events, then {rate:.0f} events/s"
    )
    with tempfile.TemporaryDirectory(prefix="bench-freshness-") as tmp:
        try:
            r = asyncio.run(measure(interval, samples, rate, backlog, mode, Path(tmp)))
        except BaseException:
            log = Path(tmp) / "daemon.log"
            if log.exists():
                print(
                    "the daemon's last log lines:\n"
                    + "\n".join(log.read_text(errors="replace").splitlines()[-40:])
                )
            raise
    rows = r["samples"]
    ingest = [s["ingested_s"] for s in rows]
    fresh = [s["published_s"] for s in rows]
    publish_s = statistics.median(r["export_seconds"]) if r["export_seconds"] else float("nan")
    ingest_med = statistics.median(ingest)
    table(
        ["", "median s", "mean s", "max s"],
        [
            ["produce -> ingested (metrics)", ingest_med, statistics.mean(ingest), max(ingest)],
            [
                "produce -> in a published snapshot",
                statistics.median(fresh),
                statistics.mean(fresh),
                max(fresh),
            ],
            ["daemon's publish step (export+check+write)", publish_s, float("nan"), float("nan")],
        ],
        title=f"freshness at publish interval {interval:g} s, {len(rows)} sample(s)",
    )
    predicted_mean = ingest_med + interval / 2 + publish_s
    default_mean = ingest_med + DEFAULT_INTERVAL / 2 + publish_s
    default_max = ingest_med + DEFAULT_INTERVAL + publish_s
    print()
    print(f"formula: freshness ~= ingest ({ingest_med:.2f} s) + U(0, interval) + publish ({publish_s:.2f} s)")
    print(
        f"  at {interval:g} s: predicted mean {predicted_mean:.2f} s, "
        f"measured mean {statistics.mean(fresh):.2f} s"
    )
    print(
        f"  at the default {DEFAULT_INTERVAL:g} s: mean ~{default_mean:.0f} s, worst ~{default_max:.0f} s "
        f"(+ the sandbox's own pull interval)"
    )
    print(
        f"  daemon start to first snapshot: {r['startup_to_first_snapshot_s']:.1f} s; "
        f"exit code {r['daemon_exit_code']}"
    )
    return {
        "bench": "freshness",
        "smoke": smoke,
        "interval_s": interval,
        "learner_mode": mode,
        "background_events_per_s": rate,
        "samples": rows,
        "ingest_latency_median_s": ingest_med,
        "freshness_median_s": statistics.median(fresh),
        "freshness_mean_s": statistics.mean(fresh),
        "freshness_max_s": max(fresh),
        "publish_step_median_s": publish_s,
        "predicted_mean_s": predicted_mean,
        "default_interval_s": DEFAULT_INTERVAL,
        "default_predicted_mean_s": default_mean,
        "default_predicted_max_s": default_max,
        "startup_to_first_snapshot_s": r["startup_to_first_snapshot_s"],
        "daemon_exit_code": r["daemon_exit_code"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="one sample at a 2 s interval")
    parser.add_argument("--interval", type=float, help="publish interval in seconds (default 5; smoke 2)")
    parser.add_argument("--samples", type=int, help="marked events (default 6; smoke 1)")
    args = parser.parse_args(argv)
    header("freshness", args.smoke, "event produced -> in a published snapshot, real daemon and broker")
    emit(run(args.smoke, args.interval, args.samples))
    return 0


if __name__ == "__main__":
    sys.exit(main())
