"""Ingest: streamdqn's whole ingest stage against the raw aiokafka ceiling, through a real broker.

Produces N simulated events (one event per message, keyed by sandbox_id, with a content-type
header) to a 4-partition topic on an embedded tansu broker, once as JSON and once as msgpack. Then,
in alternating rounds and each time with a fresh consumer group and the same fetch settings
(streamdqn's KafkaOptions defaults):

    ceiling    aiokafka getmany, counting bytes only
    streamdqn  KafkaSource.fetch (getmany -> Record) -> IngestPipeline.process: decode, validate,
               featurize, episodes -> transitions, acting policy, push into a real ReplayBuffer

The clock of a pass starts at its first non-empty fetch (group join excluded) and that first
batch is not counted. A broker-free breakdown of the same payloads follows, to show where the time
goes. The process runs with the daemon's garbage-collector settings (`streamdqn.daemon.server.tune_gc`),
which apply to both sides; `--default-gc` keeps CPython's defaults, to see what they cost.

    python bench/ingest.py [--smoke] [--events N] [--rounds R] [--default-gc]
Target: streamdqn >= 0.5x the ceiling (aim 0.8x). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import torch
from _common import Target, emit, header, ratio, report_targets, side_by_side, table
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from streamdqn.daemon.server import GC_THRESHOLDS, tune_gc
from streamdqn.kafka.admin import ensure_topics
from streamdqn.kafka.broker import EmbeddedBroker
from streamdqn.kafka.options import KafkaOptions, consumer_settings
from streamdqn.kafka.source import KafkaSource
from streamdqn.learning.learner import ActingPolicy
from streamdqn.learning.replay.buffer import ReplayBuffer
from streamdqn.learning.settings import LearnerSettings
from streamdqn.offline.simulator import simulate
from streamdqn.stream.episodes import EpisodeTracker, TransitionBatch
from streamdqn.stream.features import FEATURE_DIM, RunningNormalizer
from streamdqn.stream.pipeline import IngestPipeline, PipelineOptions
from streamdqn.stream.sources import Record
from streamdqn.stream.wire import Action, decode, parse_payload, validate_records

PARTITIONS = 4
FORMATS = {"msgpack": b"application/msgpack", "json": b"application/json"}
POLL_TIMEOUT_MS = 200  # the daemon's kafka.poll_timeout_ms default
TARGET, AIM = 0.5, 0.8


def encode(event: dict[str, object], fmt: str) -> bytes:
    if fmt == "json":
        return json.dumps(event, separators=(",", ":")).encode()
    return msgpack.packb(event)


def simulated_events(n: int, seed: int = 7) -> list[dict[str, object]]:
    out = []
    # Episodes are 8-30 steps long; ask for more than enough and cut at n.
    for event in simulate(n // 8 + 10, seed):
        out.append(event)
        if len(out) == n:
            break
    return out


async def produce(
    bootstrap: str, topic: str, payloads: Sequence[bytes], keys: Sequence[bytes], ct: bytes
) -> float:
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        linger_ms=20,
        max_batch_size=256 * 1024,
        max_request_size=4 * 1024 * 1024,
        acks=1,
    )
    await producer.start()
    started = time.perf_counter()
    try:
        pending = []
        headers = [("content-type", ct)]
        for value, key in zip(payloads, keys, strict=True):
            pending.append(await producer.send(topic, value, key=key, headers=headers))
            if len(pending) >= 20_000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return time.perf_counter() - started


def fetch_options(bootstrap: str, topic: str) -> KafkaOptions:
    return KafkaOptions(bootstrap_servers=bootstrap, topic=topic, group_id=f"bench-{uuid.uuid4().hex[:12]}")


@dataclass
class PassResult:
    events_per_s: float
    mb_per_s: float
    rejected: int = 0
    transitions: int = 0


async def joined_consumer(options: KafkaOptions) -> AIOKafkaConsumer:
    """aiokafka alone, with KafkaSource's consumer settings, subscribed (it joins in the background)."""
    consumer = AIOKafkaConsumer(**consumer_settings(options))
    await consumer.start()
    consumer.subscribe([options.topic])
    return consumer


async def ceiling_pass(consumer: AIOKafkaConsumer, n: int) -> PassResult:
    """getmany until n messages were seen, counting messages and bytes only."""
    try:
        seen = counted = nbytes = 0
        started = 0.0
        while seen < n:
            batches = await consumer.getmany(timeout_ms=POLL_TIMEOUT_MS)
            got = sum(len(m) for m in batches.values())
            if not got:
                continue
            size = sum(len(msg.value or b"") for messages in batches.values() for msg in messages)
            if seen == 0:
                started = time.perf_counter()  # the clock starts after the first batch
            else:
                counted += got
                nbytes += size
            seen += got
        elapsed = time.perf_counter() - started
    finally:
        await consumer.stop()
    return PassResult(counted / elapsed, nbytes / elapsed / 1e6)


def make_pipeline(capacity: int) -> tuple[IngestPipeline, ReplayBuffer]:
    """The daemon's ingest stage, wired as daemon.build wires it (CPU, thread mode)."""
    settings = LearnerSettings(device="cpu", seed=0)
    buffer = ReplayBuffer(capacity, FEATURE_DIM, "cpu", seed=0)

    def push(batch: TransitionBatch) -> None:
        buffer.push(batch.states, batch.actions, batch.rewards, batch.next_states, batch.dones)

    policy = ActingPolicy(settings, FEATURE_DIM, len(Action))
    pipeline = IngestPipeline(
        EpisodeTracker(), RunningNormalizer(FEATURE_DIM), policy, push, PipelineOptions()
    )
    return pipeline, buffer


async def streamdqn_pass(source: KafkaSource, n: int, capacity: int) -> PassResult:
    """KafkaSource.fetch -> IngestPipeline.process until n records were seen."""
    pipeline, buffer = make_pipeline(capacity)
    try:
        seen = counted = nbytes = 0
        started = 0.0
        while seen < n:
            records = await source.fetch(POLL_TIMEOUT_MS)
            if not records:
                continue
            outcome = pipeline.process(records)
            if seen == 0:
                started = time.perf_counter()
            else:
                counted += outcome.events
                nbytes += sum(len(r.value) for r in records)
            seen += len(records)
        elapsed = time.perf_counter() - started
    finally:
        await source.stop()
    c = pipeline.counters
    return PassResult(counted / elapsed, nbytes / elapsed / 1e6, sum(c.rejected.values()), len(buffer))


async def wait_assigned(members: Sequence[AIOKafkaConsumer | KafkaSource], timeout: float = 60.0) -> None:
    """Until every member owns all partitions of its (own) group."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(len(m.assignment()) == PARTITIONS for m in members):
            return
        await asyncio.sleep(0.05)
    raise TimeoutError("consumer groups did not get their partitions assigned in time")


def breakdown(
    payloads: Sequence[bytes], ct: bytes, rounds: int, seconds: float, batch: int = 2000
) -> dict[str, float]:
    """events/s of cumulative stages on in-memory records (no broker): where the time goes.

    Each stage handles the same `batch` records per call; stages alternate, median of rounds.
    """
    ct_text = ct.decode()
    chunk = list(payloads[:batch])
    records = [
        Record("t", i % PARTITIONS, i // PARTITIONS, p, None, (("content-type", ct),))
        for i, p in enumerate(chunk)
    ]

    def batch_validate() -> None:
        parsed: list[object] = []
        for p in chunk:
            parsed.extend(parse_payload(p, ct_text))
        validate_records(parsed)

    def whole_pipeline() -> None:
        pipeline, _ = make_pipeline(4 * batch)  # fresh episode state: the same records again are new
        pipeline.process(records)

    return side_by_side(
        {
            "parse (msgpack/json) per record": lambda: [parse_payload(p, ct_text) for p in chunk],
            "parse + validate per record (telemetry.decode)": lambda: [decode(p, ct_text) for p in chunk],
            "parse per record + validate per batch (as the pipeline does)": batch_validate,
            "IngestPipeline.process (all stages)": whole_pipeline,
        },
        rounds=rounds,
        seconds=seconds,
        per_call=len(chunk),
    )


async def run(n: int, rounds: int, smoke: bool, default_gc: bool) -> dict[str, object]:
    events = simulated_events(n)
    keys = [str(e["sandbox_id"]).encode() for e in events]
    capacity = max(1024, n)
    results: dict[str, dict[str, Any]] = {}
    with EmbeddedBroker() as broker:
        bootstrap = broker.bootstrap_servers
        topics = {f"bench-ingest-{fmt}-{uuid.uuid4().hex[:8]}": fmt for fmt in FORMATS}
        await ensure_topics(KafkaOptions(bootstrap, "unused", "unused"), dict.fromkeys(topics, PARTITIONS))
        payloads: dict[str, list[bytes]] = {}
        for topic, fmt in topics.items():
            payloads[fmt] = [encode(e, fmt) for e in events]
            seconds = await produce(bootstrap, topic, payloads[fmt], keys, FORMATS[fmt])
            size = statistics.mean(len(p) for p in payloads[fmt])
            print(f"produced {n:,} {fmt} events ({size:.0f} B each) in {seconds:.1f} s")
        # Every pass has its own fresh group. They all join up front, at once, because tansu holds
        # each JoinGroup for seconds (its initial rebalance delay), and that is not what we measure.
        # Within a round the order alternates, so that neither side always runs first.
        members: list[tuple[str, AIOKafkaConsumer | KafkaSource]] = []
        for topic, fmt in topics.items():
            for r in range(rounds):
                for name in ("ceiling", "streamdqn") if r % 2 == 0 else ("streamdqn", "ceiling"):
                    options = fetch_options(bootstrap, topic)
                    if name == "ceiling":
                        members.append((fmt, await joined_consumer(options)))
                    else:
                        source = KafkaSource(options)
                        await source.start()
                        members.append((fmt, source))
        await wait_assigned([m for _, m in members])
        if not default_gc:
            tune_gc()  # as the daemon does once it has started: after startup's allocations
        passes: dict[str, dict[str, list[PassResult]]] = {
            fmt: {"ceiling": [], "streamdqn": []} for fmt in FORMATS
        }
        for fmt, member in members:
            if isinstance(member, KafkaSource):
                passes[fmt]["streamdqn"].append(await streamdqn_pass(member, n, capacity))
            else:
                passes[fmt]["ceiling"].append(await ceiling_pass(member, n))
        for fmt in FORMATS:
            ceiling, ours = passes[fmt]["ceiling"], passes[fmt]["streamdqn"]
            c = statistics.median(p.events_per_s for p in ceiling)
            s = statistics.median(p.events_per_s for p in ours)
            results[fmt] = {
                "ceiling_events_per_s": c,
                "streamdqn_events_per_s": s,
                "ratio": ratio(s, c),
                "ceiling_mb_per_s": statistics.median(p.mb_per_s for p in ceiling),
                "rejected": ours[-1].rejected,
                "transitions_per_pass": ours[-1].transitions,
                "rounds": [[p.events_per_s for p in ceiling], [p.events_per_s for p in ours]],
            }
    table(
        ["format", "ceiling ev/s", "streamdqn ev/s", "ratio", "rejected", "transitions/pass"],
        [
            [
                fmt,
                v["ceiling_events_per_s"],
                v["streamdqn_events_per_s"],
                v["ratio"],
                v["rejected"],
                v["transitions_per_pass"],
            ]
            for fmt, v in results.items()
        ],
        title=f"through tansu, {n:,} events, {PARTITIONS} partitions, median of {rounds} round(s), "
        f"fresh consumer group per pass",
    )
    stage_rounds, stage_seconds = (1, 0.2) if smoke else (5, 0.5)
    stages = {fmt: breakdown(payloads[fmt], FORMATS[fmt], stage_rounds, stage_seconds) for fmt in FORMATS}
    names = list(next(iter(stages.values())))
    table(
        ["stage (cumulative, no broker)", *FORMATS],
        [[name, *(stages[f][name] for f in FORMATS)] for name in names],
        title=f"where the time goes (events/s, in-memory records, batches of 2000, median of {stage_rounds})",
    )
    targets = [Target(f"ingest_{fmt}_vs_ceiling", float(results[fmt]["ratio"]), TARGET) for fmt in FORMATS]
    verdicts = report_targets(targets, smoke)
    if not smoke:
        for fmt in FORMATS:
            reached = float(results[fmt]["ratio"])
            print(f"  aim {AIM}x ({fmt}): {'reached' if reached >= AIM else f'not reached ({reached:.2f}x)'}")
    return {
        "bench": "ingest",
        "smoke": smoke,
        "events": n,
        "partitions": PARTITIONS,
        "rounds": rounds,
        "gc": "default" if default_gc else {"frozen_at_start": True, "thresholds": list(GC_THRESHOLDS)},
        "formats": results,
        "stages_events_per_s": stages,
        "targets": verdicts,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes for CI; targets not judged")
    parser.add_argument("--events", type=int, help="events per format (default 200000; smoke 5000)")
    parser.add_argument("--rounds", type=int, help="alternating rounds per format (default 2; smoke 1)")
    parser.add_argument("--default-gc", action="store_true", help="keep CPython's GC thresholds (no tune_gc)")
    args = parser.parse_args(argv)
    n = args.events or (5_000 if args.smoke else 200_000)
    rounds = args.rounds or (1 if args.smoke else 2)
    torch.set_num_threads(1)  # the daemon's setting (learner.torch_threads); the acting policy runs here
    header("ingest", args.smoke, "streamdqn ingest vs the raw aiokafka ceiling, through tansu")
    emit(asyncio.run(run(n, rounds, args.smoke, args.default_gc)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
