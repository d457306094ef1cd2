"""`streamdqn demo`: the whole service on one machine, in one command.

Starts the embedded broker (tansu, loopback, memory storage), creates the topics, replays the
simulator as live sandboxes at a fixed event rate, and runs the daemon against it. Everything it
started is stopped when it ends (after --duration seconds, or on Ctrl-C).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from pathlib import Path

from streamdqn.config import Settings, load_settings
from streamdqn.daemon.build import build
from streamdqn.kafka.admin import ensure_topics
from streamdqn.kafka.broker import EmbeddedBroker
from streamdqn.kafka.options import KafkaOptions
from streamdqn.kafka.producer import RecordProducer
from streamdqn.offline.simulator import simulate

log = logging.getLogger("streamdqn.daemon.demo")


def demo_settings(bootstrap: str, state_dir: Path, http_port: int, publish_interval: float) -> Settings:
    """Settings for a short demo: small replay, frequent snapshots and checkpoints."""
    return load_settings(
        None,
        kafka={"bootstrap_servers": bootstrap},
        http={"port": http_port},
        state={"dir": state_dir},
        publish={"interval_seconds": publish_interval, "min_updates": 50},
        checkpoint={"interval_seconds": max(5.0, publish_interval / 2)},
        replay={"capacity": 200_000, "min_size": 256},
        learner={"epsilon_decay_steps": 5000},
    )


async def produce_live(bootstrap: str, topic: str, rate: float, seed: int, stop: asyncio.Event) -> int:
    """Simulated sandboxes producing to `topic` at about `rate` events/s, keyed by sandbox_id."""
    sent = 0
    started = time.monotonic()
    async with RecordProducer(bootstrap) as producer:
        for event in simulate(1_000_000, seed):
            if stop.is_set():
                break
            await producer.send(topic, json.dumps(event).encode(), key=str(event["sandbox_id"]).encode(),
                                headers=[("content-type", b"application/json")])
            sent += 1
            ahead = sent / rate - (time.monotonic() - started)
            if ahead > 0:
                await asyncio.sleep(ahead)
        await producer.flush()
    return sent


async def run_demo(duration: float, rate: float, state_dir: Path, http_port: int, publish_interval: float,
                   seed: int) -> int:
    with EmbeddedBroker() as broker:
        settings = demo_settings(broker.bootstrap_servers, state_dir, http_port, publish_interval)
        k = settings.kafka
        await ensure_topics(KafkaOptions(broker.bootstrap_servers, k.topic, k.group_id),
                            {k.topic: 4, k.dlq_topic: 1, k.snapshot_topic: 1})
        daemon = await asyncio.to_thread(build, settings)
        serve = asyncio.create_task(daemon.serve())
        stop_producing = asyncio.Event()
        producer = asyncio.create_task(produce_live(broker.bootstrap_servers, k.topic, rate, seed,
                                                    stop_producing))
        while daemon.http_port is None and not serve.done():
            await asyncio.sleep(0.1)
        base = f"http://{settings.http.host}:{daemon.http_port}"
        print(f"broker      {broker.bootstrap_servers} (tansu, in memory)", flush=True)
        print(f"producing   {rate:.0f} events/s of simulated sandboxes to topic {k.topic}", flush=True)
        print(f"metrics     {base}/metrics", flush=True)
        print(f"snapshots   {base}/snapshots  (files under {state_dir / 'snapshots'})", flush=True)
        print(f"pull        streamdqn pull --url {base} --out ./policy", flush=True)
        print(f"running for {duration:.0f}s; Ctrl-C stops earlier", flush=True)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(serve), timeout=duration)
        stop_producing.set()
        sent = await producer
        daemon.stop()
        code = await serve
        snapshot = daemon.publisher.store.latest_version()
        consumed = daemon.ingestor.pipeline.counters.events_consumed
        print(f"produced {sent} events; ingested {consumed}; "
              f"updates {daemon.runner.stats().updates}; latest snapshot {snapshot}")
        return code
