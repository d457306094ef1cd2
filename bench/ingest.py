"""Ingest: streamdqn's whole ingest stage against the raw aiokafka ceiling, through a real broker.

Produces N simulated events (one event per message, keyed by sandbox_id, with a content-type
header) to a 4-partition topic on an embedded tansu broker, once as JSON and once as msgpack. Then,
in alternating rounds and each time with a fresh consumer group and the same fetch settings
(streamdqn's KafkaOptions defaults):

    ceiling    aiokafka getmany, counting bytes only
    streamdqn  KafkaSource.fetch (getmany -> Record) -> IngestPipeline.process, the columnar path end
               to end: decode_batch (msgspec -> numpy columns, vectorized checks), episodes, features,
               replay rows (one per step), pushed into a real ReplayBuffer

The clock of a pass starts at its first non-empty fetch (group join excluded) and that first
batch is not counted. Broker-free sections on the same payloads follow:

    where the time goes   cumulative stages of the pipeline, batches of 2000 records
    verdict join          the same events without labels (no is_malicious / severity) plus one
                          verdict per episode on a verdicts topic (it arrives VERDICT_LAG records
                          after the episode's last event), against the events with inline labels:
                          telemetry events/s of whole passes, a fresh pipeline per pass

The process runs with the daemon's garbage-collector settings (`streamdqn.daemon.server.tune_gc`),
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
import zlib
from collections.abc import Callable, Sequence
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
from streamdqn.learning.replay.buffer import ReplayBuffer
from streamdqn.offline.simulator import simulate
from streamdqn.stream.episodes import EpisodeTracker
from streamdqn.stream.features import FEATURE_DIM, RunningNormalizer
from streamdqn.stream.join import VerdictJoin
from streamdqn.stream.pipeline import IngestPipeline, PipelineOptions
from streamdqn.stream.rows import relabel_rewards
from streamdqn.stream.sources import Record
from streamdqn.stream.wire import decode, decode_batch, parse_payload

PARTITIONS = 4
FORMATS = {"msgpack": b"application/msgpack", "json": b"application/json"}
POLL_TIMEOUT_MS = 200  # the daemon's kafka.poll_timeout_ms default
TARGET, AIM = 0.5, 0.8
VERDICTS_TOPIC = "verdicts"
VERDICT_LAG = 500  # records between an episode's last event and its verdict
BATCH = 2000  # the daemon's kafka.max_poll_records


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
    rows: int = 0


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


def make_pipeline(capacity: int, *, join: bool = False) -> tuple[IngestPipeline, ReplayBuffer]:
    """The daemon's ingest stage, wired as daemon.build wires it (CPU, default settings); with `join`,
    records of VERDICTS_TOPIC are verdicts joined to their episodes."""
    buffer = ReplayBuffer(capacity, "cpu", seed=0)
    tracker = EpisodeTracker()
    verdict_join = None
    if join:
        rewards, gamma = tracker.rewards, tracker.gamma

        def relabel(episode: int, malicious: bool, severity: float) -> int:
            index = buffer.find_episode(episode)
            if len(index):
                buffer.write_rewards(index, *relabel_rewards(buffer.read(index), malicious, severity, rewards,
                                                             gamma))
            return len(index)

        verdict_join = VerdictJoin(tracker, relabel)
    pipeline = IngestPipeline(tracker, RunningNormalizer(FEATURE_DIM), buffer.push, PipelineOptions(),
                              join=verdict_join, verdicts_topic=VERDICTS_TOPIC if join else "")
    return pipeline, buffer


async def streamdqn_pass(source: KafkaSource, n: int, capacity: int) -> PassResult:
    """KafkaSource.fetch -> IngestPipeline.process until n records were seen."""
    pipeline, _ = make_pipeline(capacity)
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
    return PassResult(counted / elapsed, nbytes / elapsed / 1e6, sum(c.rejected.values()), c.transitions)


async def wait_assigned(members: Sequence[AIOKafkaConsumer | KafkaSource], timeout: float = 60.0) -> None:
    """Until every member owns all partitions of its (own) group."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(len(m.assignment()) == PARTITIONS for m in members):
            return
        await asyncio.sleep(0.05)
    raise TimeoutError("consumer groups did not get their partitions assigned in time")


def breakdown(
    payloads: Sequence[bytes], ct: bytes, rounds: int, seconds: float, batch: int = BATCH
) -> dict[str, float]:
    """events/s of the pipeline's stages on in-memory records (no broker): where the time goes.

    Each stage handles the same `batch` records per call; stages alternate, median of rounds.
    """
    ct_text = ct.decode()
    chunk = list(payloads[:batch])
    records = [
        Record("t", i % PARTITIONS, i // PARTITIONS, p, None, (("content-type", ct),))
        for i, p in enumerate(chunk)
    ]
    cts = [ct_text] * len(chunk)

    def pipeline_without_replay() -> None:
        pipeline = IngestPipeline(EpisodeTracker(), RunningNormalizer(FEATURE_DIM), lambda rows: None)
        pipeline.process(records)

    def whole_pipeline() -> None:
        pipeline, _ = make_pipeline(4 * batch)  # fresh episode state: the same records again are new
        pipeline.process(records)

    return side_by_side(
        {
            "parse only (msgpack / json module, per record)": lambda: [
                parse_payload(p, ct_text) for p in chunk
            ],
            "careful path per record (wire.decode: parse + pydantic)": lambda: [
                decode(p, ct_text) for p in chunk
            ],
            "decode_batch (msgspec -> columns + vectorized checks)": lambda: decode_batch(chunk, cts),
            "IngestPipeline.process, rows discarded (no replay)": pipeline_without_replay,
            "IngestPipeline.process (all stages, into ReplayBuffer)": whole_pipeline,
        },
        rounds=rounds,
        seconds=seconds,
        per_call=len(chunk),
    )


def unlabelled_with_verdicts(events: Sequence[dict[str, object]]) -> list[Record]:
    """The events without their labels, msgpack, and each episode's verdict on VERDICTS_TOPIC,
    VERDICT_LAG records after the episode's last event (keyed and partitioned as its telemetry)."""
    headers = (("content-type", FORMATS["msgpack"]),)
    offsets: dict[tuple[str, int], int] = {}
    due: list[tuple[int, Record]] = []
    out: list[Record] = []

    def append(topic: str, key: bytes, value: bytes) -> None:
        partition = zlib.crc32(key) % PARTITIONS
        offset = offsets.get((topic, partition), 0)
        offsets[(topic, partition)] = offset + 1
        out.append(Record(topic, partition, offset, value, key, headers))

    for i, event in enumerate(events):
        while due and due[0][0] <= i:
            _, verdict = due.pop(0)
            append(VERDICTS_TOPIC, verdict.key or b"", verdict.value)
        key = str(event["sandbox_id"]).encode()
        append("telemetry", key, msgpack.packb({k: v for k, v in event.items()
                                                if k not in ("is_malicious", "severity")}))
        if event["final"]:
            payload = {"sandbox_id": event["sandbox_id"], "episode_id": event["episode_id"],
                       "is_malicious": event["is_malicious"], "severity": event["severity"],
                       "timestamp": event["timestamp"]}
            due.append((i + VERDICT_LAG, Record(VERDICTS_TOPIC, 0, 0, msgpack.packb(payload), key)))
    for _, verdict in due:
        append(VERDICTS_TOPIC, verdict.key or b"", verdict.value)
    return out


def inline_records(events: Sequence[dict[str, object]]) -> list[Record]:
    headers = (("content-type", FORMATS["msgpack"]),)
    offsets = [0] * PARTITIONS
    out = []
    for event in events:
        key = str(event["sandbox_id"]).encode()
        partition = zlib.crc32(key) % PARTITIONS
        out.append(Record("telemetry", partition, offsets[partition], msgpack.packb(event), key, headers))
        offsets[partition] += 1
    return out


def verdict_join_cost(events: Sequence[dict[str, object]], rounds: int, seconds: float) -> dict[str, Any]:
    """Telemetry events/s of whole passes (a fresh pipeline each), inline labels vs a verdicts topic."""
    inline = inline_records(events)
    joined = unlabelled_with_verdicts(events)
    telemetry = len(events)
    outcome: dict[str, tuple[int, int]] = {}

    def one_pass(records: list[Record], join: bool, name: str) -> Callable[[], object]:
        def run_pass() -> None:
            pipeline, _ = make_pipeline(max(1024, telemetry), join=join)
            for start in range(0, len(records), BATCH):
                pipeline.process(records[start : start + BATCH])
            c = pipeline.counters
            outcome[name] = (c.events_consumed, c.transitions)

        return run_pass

    rates = side_by_side(
        {"inline labels": one_pass(inline, False, "inline labels"),
         "unlabelled + verdicts topic": one_pass(joined, True, "unlabelled + verdicts topic")},
        rounds=rounds, seconds=seconds, per_call=telemetry, warmup=0.0,
    )
    return {
        "events_per_s": rates,
        "join_over_inline": ratio(rates["unlabelled + verdicts topic"], rates["inline labels"]),
        "verdict_records": len(joined) - telemetry,
        "events_consumed": {k: v[0] for k, v in outcome.items()},
        "rows": {k: v[1] for k, v in outcome.items()},
    }


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
                "rows_per_pass": ours[-1].rows,
                "rounds": [[p.events_per_s for p in ceiling], [p.events_per_s for p in ours]],
            }
    table(
        ["format", "ceiling ev/s", "streamdqn ev/s", "ratio", "rejected", "replay rows/pass"],
        [
            [
                fmt,
                v["ceiling_events_per_s"],
                v["streamdqn_events_per_s"],
                v["ratio"],
                v["rejected"],
                v["rows_per_pass"],
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
        title=f"where the time goes (events/s, in-memory records, batches of {BATCH}, "
        f"median of {stage_rounds})",
    )
    join_events = events[: min(n, 5_000 if smoke else 40_000)]
    join = verdict_join_cost(join_events, stage_rounds, stage_seconds)
    table(
        ["msgpack, no broker", "telemetry ev/s", "events consumed", "replay rows"],
        [[name, rate, join["events_consumed"][name], join["rows"][name]]
         for name, rate in join["events_per_s"].items()],
        title=f"verdict join: {len(join_events):,} events, {join['verdict_records']:,} verdicts (one per "
        f"episode, {VERDICT_LAG} records after its last event), whole passes, median of {stage_rounds}",
    )
    print(f"  verdicts topic / inline labels: {join['join_over_inline']:.2f}x")
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
        "verdict_join": join,
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
    torch.set_num_threads(1)  # the daemon's setting (learner.torch_threads)
    header("ingest", args.smoke, "streamdqn ingest vs the raw aiokafka ceiling, through tansu")
    emit(asyncio.run(run(n, rounds, args.smoke, args.default_gc)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
