"""Daemon: the product as a user runs it, `streamdqn run` against a broker, next to the raw ceiling.

Starts the embedded broker (tansu, loopback), creates a 4-partition topic per format and produces N
simulated events to each (one event per message, keyed by sandbox_id, with a content-type header;
msgpack, and the same events as JSON). Then, per format:

    raw      aiokafka getmany of the same messages with a fresh consumer group and the daemon's fetch
             settings, counting messages only (the clock starts after the first non-empty batch)
    daemon   `python -m streamdqn run --config FILE` as a subprocess with the DEFAULT configuration
             except what must be set: kafka.bootstrap_servers and kafka.topic, state.dir (a fresh
             temporary directory per run) and http.port (a free port on 127.0.0.1). This process
             scrapes http://127.0.0.1:PORT/metrics every 0.5 s (--scrape) until
             streamdqn_events_consumed_total reaches N (or the timeout); events/s from that metric,
             the clock starting at its first non-zero reading (start-up, group join and the first
             poll excluded): (N - first reading) / (time of the reading that saw N - its time).
             The end is known only to within one scrape, so this is a lower bound; the upper bound
             (to the reading before) is reported too. When a single reading already saw all N, only
             a lower bound from the last zero reading is known (make --events larger).

It reports the daemon / raw ratio, the learner's achieved samples per inserted row against its target
(streamdqn_learner_samples_per_insert, streamdqn_learner_target_samples_per_insert), the updates,
the replay rows, and the daemon's log lines about backpressure (pausing the fetch for the learner). The
daemon is stopped with SIGTERM (its ordered shutdown: final checkpoint, then exit) and waited for;
the broker is always stopped.

    python bench/daemon.py [--smoke] [--events N] [--timeout S]
No target is set; the ratios are reported. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from _common import emit, header, ratio, table
from ingest import (
    FORMATS,
    PARTITIONS,
    ceiling_pass,
    encode,
    fetch_options,
    joined_consumer,
    produce,
    wait_assigned,
)

from streamdqn.kafka.admin import ensure_topics
from streamdqn.kafka.broker import EmbeddedBroker, free_port
from streamdqn.kafka.options import KafkaOptions
from streamdqn.offline.simulator import simulate

SCRAPE_S = 0.5
STOP_TIMEOUT_S = 90.0  # the daemon's own lifecycle.stop_timeout_seconds is 30 s, plus a final checkpoint
CONSUMED = "streamdqn_events_consumed_total"
# What this reads from /metrics (streamdqn/serve/metrics.py).
GAUGES = {
    "samples_per_insert": "streamdqn_learner_samples_per_insert",
    "target_samples_per_insert": "streamdqn_learner_target_samples_per_insert",
    "updates": "streamdqn_learner_updates_total",
    "rows": "streamdqn_transitions_total",
    "replay_size": "streamdqn_replay_size",
    "ingest_paused": "streamdqn_ingest_paused",
    "episodes": "streamdqn_episodes_total",
}


def simulated_events(n: int, seed: int = 7) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    for event in simulate(n // 8 + 10, seed):  # episodes are 8-30 steps long: more than enough
        out.append(event)
        if len(out) == n:
            break
    return out


def write_config(path: Path, bootstrap: str, topic: str, state_dir: Path, port: int) -> None:
    """The default configuration plus the four values a run on this broker needs."""
    path.write_text(
        "[kafka]\n"
        f"bootstrap_servers = {json.dumps(bootstrap)}\n"
        f"topic = {json.dumps(topic)}\n"
        "[state]\n"
        f"dir = {json.dumps(str(state_dir))}\n"
        "[http]\n"
        'host = "127.0.0.1"\n'
        f"port = {port}\n"
    )


def scrape(base: str) -> dict[str, float]:
    """Every unlabelled sample of /metrics (name -> value)."""
    with urllib.request.urlopen(base + "/metrics", timeout=5) as response:
        text = response.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, _, value = line.partition(" ")
            with contextlib.suppress(ValueError):
                values[name] = float(value)
    return values


@dataclass
class DaemonRun:
    """What one `streamdqn run` did with N events."""

    events: int
    consumed: int = 0
    events_per_s: float = float("nan")  # (N - first non-zero reading) / time between them: a lower bound
    events_per_s_at_most: float = float("nan")  # the same up to the reading before the last
    first_consumed_after_s: float = float("nan")  # process start -> first non-zero reading
    completed: bool = False
    metrics: dict[str, float] = field(default_factory=dict)
    backpressure_lines: int = 0
    exit_code: int | None = None
    readings: list[tuple[float, float]] = field(default_factory=list)  # (s since the first non-zero, events)


def rates(readings: list[tuple[float, float]], last_zero: float | None) -> tuple[float, float]:
    """(lower, upper) bound of events/s from (seconds since the first non-zero reading, events) readings."""
    if len(readings) == 1:  # every event arrived between the last zero reading and this one
        c0 = readings[0][1]
        return (c0 / -last_zero if last_zero is not None and last_zero < 0 else float("nan")), float("nan")
    (t0, c0), (t_end, c_end) = readings[0], readings[-1]
    lower = (c_end - c0) / (t_end - t0)
    upper = (c_end - c0) / (readings[-2][0] - t0) if len(readings) > 2 else float("inf")
    return lower, upper


def run_daemon(
    bootstrap: str, topic: str, n: int, timeout: float, workdir: Path, scrape_s: float
) -> DaemonRun:
    """Start the daemon, wait for N events consumed (or the timeout), stop it with SIGTERM."""
    port = free_port()
    config = workdir / "streamdqn.toml"
    write_config(config, bootstrap, topic, workdir / "state", port)
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("NOTIFY_SOCKET", None)
    log_path = workdir / "daemon.log"
    result = DaemonRun(n)
    started = time.monotonic()
    with open(log_path, "wb") as log:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "streamdqn", "run", "--config", str(config)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
        )
    try:
        first: tuple[float, float] | None = None
        last_zero: float | None = None  # time of the last reading of 0 events
        last: dict[str, float] = {}
        deadline = started + timeout
        while time.monotonic() < deadline:
            if daemon.poll() is not None:
                raise RuntimeError(f"the daemon exited with {daemon.returncode} before consuming {n:,} "
                                   "events")
            try:
                last = scrape(base)
            except (urllib.error.URLError, OSError):
                time.sleep(scrape_s)  # not serving yet
                continue
            now, consumed = time.monotonic(), last.get(CONSUMED, 0.0)
            if consumed <= 0:
                last_zero = now
            else:
                if first is None:
                    first = (now, consumed)
                    result.first_consumed_after_s = now - started
                result.readings.append((now - first[0], consumed))
            result.consumed = int(consumed)
            if consumed >= n:
                result.completed = True
                break
            time.sleep(scrape_s)
        if first is not None:
            result.events_per_s, result.events_per_s_at_most = rates(
                result.readings, None if last_zero is None else last_zero - first[0]
            )
        result.metrics = {key: last.get(name, float("nan")) for key, name in GAUGES.items()}
    finally:
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait(10)
        result.exit_code = daemon.returncode
    lines = log_path.read_text(errors="replace").splitlines()
    result.backpressure_lines = sum(1 for line in lines if "backpressure" in line or "paused" in line)
    return result


async def prepare(bootstrap: str, events: list[dict[str, object]]) -> dict[str, str]:
    """One fresh 4-partition topic per format, the events produced to each; format -> topic."""
    tag = uuid.uuid4().hex[:8]
    topics = {fmt: f"bench-daemon-{fmt}-{tag}" for fmt in FORMATS}
    await ensure_topics(KafkaOptions(bootstrap, "unused", "unused"),
                        dict.fromkeys(topics.values(), PARTITIONS))
    keys = [str(e["sandbox_id"]).encode() for e in events]
    for fmt, topic in topics.items():
        seconds = await produce(bootstrap, topic, [encode(e, fmt) for e in events], keys, FORMATS[fmt])
        print(f"produced {len(events):,} {fmt} events to {topic} in {seconds:.1f} s", flush=True)
    return topics


async def raw_rate(bootstrap: str, topic: str, n: int) -> float:
    consumer = await joined_consumer(fetch_options(bootstrap, topic))
    await wait_assigned([consumer])
    return (await ceiling_pass(consumer, n)).events_per_s


def run(n: int, timeout: float, smoke: bool, scrape_s: float) -> dict[str, Any]:
    events = simulated_events(n)
    results: dict[str, dict[str, Any]] = {}
    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory(prefix="bench-daemon-") as tmp:
        bootstrap = broker.bootstrap_servers
        topics = asyncio.run(prepare(bootstrap, events))
        raw = {fmt: asyncio.run(raw_rate(bootstrap, topic, n)) for fmt, topic in topics.items()}
        for fmt, topic in topics.items():
            workdir = Path(tmp) / fmt
            workdir.mkdir()
            print(f"streamdqn run on {topic} (default configuration) ...", flush=True)
            try:
                outcome = run_daemon(bootstrap, topic, n, timeout, workdir, scrape_s)
            except BaseException:
                log = workdir / "daemon.log"
                if log.exists():
                    tail = log.read_text(errors="replace").splitlines()[-40:]
                    print("the daemon's last log lines:\n" + "\n".join(tail))
                raise
            if not outcome.completed:
                print(f"  timed out after {timeout:.0f} s with {outcome.consumed:,} of {n:,} events consumed")
            results[fmt] = {
                "raw_events_per_s": raw[fmt],
                **asdict(outcome),
                "daemon_over_raw": ratio(outcome.events_per_s, raw[fmt]),
                "daemon_over_raw_at_most": ratio(outcome.events_per_s_at_most, raw[fmt]),
            }
    table(
        ["format", "raw getmany ev/s", "daemon ev/s", "at most", "daemon/raw", "samples/insert", "target",
         "updates", "replay rows", "backpressure lines", "1st event after s", "exit"],
        [[fmt, r["raw_events_per_s"], r["events_per_s"], r["events_per_s_at_most"], r["daemon_over_raw"],
          r["metrics"]["samples_per_insert"], r["metrics"]["target_samples_per_insert"],
          r["metrics"]["updates"], r["metrics"]["rows"], r["backpressure_lines"], r["first_consumed_after_s"],
          r["exit_code"]]
         for fmt, r in results.items()],
        title=f"streamdqn run (default configuration) vs raw getmany, {n:,} events, {PARTITIONS} partitions, "
        f"scraped every {scrape_s:g} s (daemon ev/s: a lower bound; 'at most': to the reading before)",
    )
    for fmt, r in results.items():
        m = r["metrics"]
        print(f"  {fmt}: the learner reached {m['samples_per_insert']:.2f} of its "
              f"{m['target_samples_per_insert']:.0f} samples per inserted row "
              f"({ratio(m['samples_per_insert'], m['target_samples_per_insert']):.1%})")
    return {
        "bench": "daemon",
        "smoke": smoke,
        "events": n,
        "partitions": PARTITIONS,
        "scrape_s": scrape_s,
        "configuration": "defaults + kafka.bootstrap_servers, kafka.topic, state.dir, http.host/port",
        "formats": results,
        **{f"daemon_over_raw_{fmt}": r["daemon_over_raw"] for fmt, r in results.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="20,000 events")
    parser.add_argument("--events", type=int, help="events per format (default 200000; smoke 20000)")
    parser.add_argument("--timeout", type=float,
                        help="seconds to wait for each daemon run (default 600; smoke 120)")
    parser.add_argument("--scrape", type=float, default=SCRAPE_S,
                        help=f"seconds between scrapes (default {SCRAPE_S:g})")
    args = parser.parse_args(argv)
    n = args.events or (20_000 if args.smoke else 200_000)
    timeout = args.timeout or (120.0 if args.smoke else 600.0)
    header("daemon", args.smoke, "streamdqn run as a user runs it vs raw getmany, through tansu")
    emit(run(n, timeout, args.smoke, args.scrape))
    return 0


if __name__ == "__main__":
    sys.exit(main())
