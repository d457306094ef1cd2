"""`streamdqn demo`: the whole service on one machine, in one command.

Starts the embedded broker (tansu, loopback, memory storage), creates the topics, replays the
simulator as live sandboxes at a fixed event rate, and runs the daemon against it, as production runs
it: the telemetry carries no labels, and each episode's verdict goes to the verdicts topic a few
seconds after its last event (a small share never gets one). `--inline-labels` sends labelled
telemetry instead, as a training farm does. Everything it started is stopped when it ends (after
--duration seconds, or on Ctrl-C), and it closes with what was joined and what the policy learned.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from streamdqn.config import Settings, load_settings
from streamdqn.daemon.build import build
from streamdqn.daemon.server import Server
from streamdqn.kafka.admin import ensure_topics
from streamdqn.kafka.broker import EmbeddedBroker
from streamdqn.kafka.options import KafkaOptions
from streamdqn.kafka.producer import RecordProducer
from streamdqn.offline.baselines import always_ignore, fit_logistic_baseline
from streamdqn.offline.dataset import split_episodes
from streamdqn.offline.simulator import simulate
from streamdqn.snapshots.policy import OnnxPolicy
from streamdqn.stream.scoring import Metrics, evaluate_rows
from streamdqn.stream.wire import validate_records

log = logging.getLogger("streamdqn.daemon.demo")
JSON = [("content-type", b"application/json")]


@dataclass(frozen=True)
class DemoOptions:
    duration: float = 60.0
    rate: float = 500.0  # events per second
    state_dir: Path = Path("state-demo")
    http_port: int = 8765
    publish_interval: float = 15.0
    seed: int = 0
    inline_labels: bool = False
    verdict_delay: tuple[float, float] = (1.0, 5.0)  # seconds after an episode's last event
    never_labelled: float = 0.03  # share of episodes whose verdict never comes


def demo_settings(bootstrap: str, state_dir: Path, http_port: int, publish_interval: float) -> Settings:
    """Settings for a short demo: small replay, frequent snapshots and checkpoints, short verdict wait."""
    return load_settings(
        None,
        kafka={"bootstrap_servers": bootstrap},
        http={"port": http_port},
        state={"dir": state_dir},
        publish={"interval_seconds": publish_interval, "min_updates": 50},
        checkpoint={"interval_seconds": max(5.0, publish_interval / 2)},
        replay={"capacity": 200_000, "min_size": 256},
        verdicts={"wait_seconds": 600.0},
    )


async def produce_live(bootstrap: str, topics: tuple[str, str], options: DemoOptions, stop: asyncio.Event
                       ) -> tuple[int, int]:
    """Simulated sandboxes producing to the telemetry topic at about `rate` events/s, keyed by sandbox_id;
    each episode's verdict follows on the verdicts topic after a random delay. Returns (events, verdicts)."""
    telemetry, verdicts_topic = topics
    rng = random.Random(options.seed)
    due: list[tuple[float, int, dict[str, object]]] = []  # (send at, tie-break, verdict)
    sent = verdicts = 0
    started = time.monotonic()
    async with RecordProducer(bootstrap) as producer:
        for event in simulate(1_000_000, options.seed):
            if stop.is_set():
                break
            now = time.monotonic()
            while due and due[0][0] <= now:
                _, _, verdict = heapq.heappop(due)
                await producer.send(verdicts_topic, json.dumps(verdict).encode(),
                                    key=str(verdict["sandbox_id"]).encode(), headers=JSON)
                verdicts += 1
            if not options.inline_labels:
                label = {"is_malicious": event.pop("is_malicious"), "severity": event.pop("severity")}
                if event["final"] and rng.random() >= options.never_labelled:
                    verdict = {"sandbox_id": event["sandbox_id"], "episode_id": event["episode_id"], **label,
                               "source": "demo"}
                    heapq.heappush(due, (now + rng.uniform(*options.verdict_delay), sent, verdict))
            await producer.send(telemetry, json.dumps(event).encode(), key=str(event["sandbox_id"]).encode(),
                                headers=JSON)
            sent += 1
            ahead = sent / options.rate - (time.monotonic() - started)
            if ahead > 0:
                await asyncio.sleep(ahead)
        await producer.flush()
    return sent, verdicts


async def run_demo(options: DemoOptions) -> int:
    with EmbeddedBroker() as broker:
        settings = demo_settings(broker.bootstrap_servers, options.state_dir, options.http_port,
                                 options.publish_interval)
        k = settings.kafka
        await ensure_topics(KafkaOptions(broker.bootstrap_servers, k.topic, k.group_id),
                            {k.topic: 4, k.verdicts_topic: 4, k.dlq_topic: 1, k.snapshot_topic: 1})
        daemon = await asyncio.to_thread(build, settings)
        serve = asyncio.create_task(daemon.serve())
        stop_producing = asyncio.Event()
        producer = asyncio.create_task(produce_live(broker.bootstrap_servers, (k.topic, k.verdicts_topic),
                                                    options, stop_producing))
        listening = asyncio.create_task(daemon.listening.wait())
        await asyncio.wait([listening, serve], return_when=asyncio.FIRST_COMPLETED)
        listening.cancel()
        base = f"http://{settings.http.host}:{daemon.http_port}"
        low, high = options.verdict_delay
        labels = "inline labels" if options.inline_labels else (
            f"no labels; verdicts to {k.verdicts_topic} {low:g}-{high:g} s after each episode, "
            f"{options.never_labelled:.0%} never")
        print(f"broker      {broker.bootstrap_servers} (tansu, in memory)", flush=True)
        print(f"producing   {options.rate:.0f} events/s of simulated sandboxes to {k.topic} ({labels})",
              flush=True)
        print(f"metrics     {base}/metrics", flush=True)
        print(f"snapshots   {base}/snapshots  (files under {options.state_dir / 'snapshots'})", flush=True)
        print(f"pull        streamdqn pull --url {base} --out ./policy", flush=True)
        print(f"running for {options.duration:.0f}s; Ctrl-C stops earlier", flush=True)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(serve), timeout=options.duration)
        stop_producing.set()
        sent, verdicts = await producer
        daemon.stop()
        code = await serve
        print(_summary(daemon, sent, verdicts, options.seed))
        return code


def _summary(daemon: Server, sent: int, verdicts: int, seed: int) -> str:
    pipeline = daemon.ingestor.pipeline
    c = pipeline.counters
    snapshot = daemon.publisher.store.latest_version()
    updates = daemon.runner.stats().updates
    lines = [f"produced {sent} events; ingested {c.events_consumed}; updates {updates}; "
             f"latest snapshot {snapshot}"]
    join = pipeline.join
    if join is not None:
        j = join.counters
        lines.append(f"verdicts {verdicts} sent, {j.verdicts_consumed} read; episodes labelled "
                     f"{j.labelled_by_verdict} by verdict, {j.labelled_inline} inline; "
                     f"{join.pending_episodes} still waiting for a verdict, {join.waiting_verdicts} verdicts "
                     "for their telemetry")
    held_out = list(pipeline.tracker.holdout)
    if snapshot is None or not held_out:
        lines.append("what the policy learned: not enough held-out episodes or no snapshot yet (run longer)")
        return "\n".join(lines)
    policy = OnnxPolicy(daemon.publisher.store.path_of(snapshot) / "model.onnx")
    fit = split_episodes(validate_records(list(simulate(300, seed + 1000))).events)
    logistic = fit_logistic_baseline(fit, pipeline.tracker.rewards, seed)
    rewards = pipeline.tracker.rewards
    scored = {f"snapshot {snapshot}": evaluate_rows(policy, held_out, rewards),
              "always ignore": evaluate_rows(always_ignore, held_out, rewards),
              "logistic baseline": evaluate_rows(logistic, held_out, rewards)}
    lines.append(f"what the policy learned, on the gate's {len(held_out)} held-out episodes (never learned "
                 "from; the logistic baseline fitted on 300 other simulated episodes):")
    lines += [f"  {name:<18} {_line(m)}" for name, m in scored.items()]
    return "\n".join(lines)


def _line(m: Metrics) -> str:
    def pct(x: float | None) -> str:
        return "-" if x is None or np.isnan(x) else f"{100 * x:.1f}%"

    return (f"mean return {m.mean_return:+.3f}  detection {pct(m.detection_rate)}  "
            f"false positives {pct(m.false_positive_rate)}")
