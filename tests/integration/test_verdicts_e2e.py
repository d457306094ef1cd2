"""Delayed verdicts against the real broker, the daemon as a subprocess: unlabelled telemetry and a
co-partitioned verdicts topic. The counters must agree exactly with what was produced, before and
across SIGKILLs with both topics in flight.

Order is made deterministic by producing in phases and waiting on the daemon's own counters between
them (a verdict produced "later" could otherwise be read first from another partition).
"""

from __future__ import annotations

import json
import random
import signal
import time
from typing import Any

import pytest

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

LABELS = ("is_malicious", "severity")


def unlabelled(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in e.items() if k not in LABELS} for e in events]


def verdicts_for(events: list[dict[str, Any]], timestamp: float | None = None) -> dict[int, dict[str, Any]]:
    """Each episode's verdict, from the simulator's own labels (stamped `timestamp` when given)."""
    out: dict[int, dict[str, Any]] = {}
    for e in events:
        out[int(e["episode_id"])] = {"sandbox_id": e["sandbox_id"], "episode_id": e["episode_id"],
                                     "is_malicious": e["is_malicious"], "severity": e["severity"]}
        if timestamp is not None:
            out[int(e["episode_id"])]["timestamp"] = timestamp
    return out


def keyed(records: list[dict[str, Any]]) -> list[Message]:
    return [Message(json.dumps(r).encode(), str(r["sandbox_id"]).encode()) for r in records]


def labelled(daemon: DaemonProcess, source: str) -> float:
    return daemon.metric(f'streamdqn_episodes_labelled_total{{source="{source}"}}')


def test_verdicts_before_after_never_revised_malformed_and_orphaned_count_exactly(
    topics: Topics, make_daemon: Any
) -> None:
    events = sim_events(10, seed=31)
    last_time = max(float(e["timestamp"]) for e in events)
    # Stamped just after the last event: each join observes its delay, and the records' clock moves on
    # only as far as the last event (nothing expires before step 5).
    verdicts = verdicts_for(events, timestamp=last_time + 1)
    ids = sorted(verdicts)
    daemon = make_daemon(topics, verdicts={"wait_seconds": 1000.0}, **FAST).start()

    # 1. Two verdicts before any telemetry: they wait for their episodes.
    produce(topics.bootstrap, topics.verdicts, keyed([verdicts[ids[0]], verdicts[ids[1]]]))
    daemon.wait_for(lambda: daemon.metric("streamdqn_waiting_verdicts") == 2, 60, "two waiting verdicts")
    # 2. The telemetry, without labels.
    produce(topics.bootstrap, topics.telemetry, encode_events(unlabelled(events)))
    daemon.wait_for(lambda: daemon.metric("streamdqn_events_consumed_total") == len(events), 60,
                    "the telemetry")
    daemon.wait_for(lambda: labelled(daemon, "verdict") == 2, 30, "the two early joins")
    # 3. Six verdicts after their telemetry (ids[8], ids[9]: never), one malformed.
    malformed = {"sandbox_id": events[0]["sandbox_id"], "episode_id": ids[0], "is_malicious": "yes",
                 "severity": 0.5}
    produce(topics.bootstrap, topics.verdicts, keyed([verdicts[i] for i in ids[2:8]] + [malformed]))
    daemon.wait_for(lambda: labelled(daemon, "verdict") == 8, 30, "the late joins")
    # 4. A revision of a joined episode, and a verdict whose episode never comes (timestamped, so that it
    #    waits on the records' clock).
    flipped = verdicts[ids[2]]
    revision = {**flipped, "is_malicious": not flipped["is_malicious"], "severity": 0.0, "revision": 1}
    orphan = {"sandbox_id": "nobody", "episode_id": 424242, "is_malicious": True, "severity": 0.9,
              "timestamp": last_time}
    produce(topics.bootstrap, topics.verdicts, keyed([revision, orphan]))
    daemon.wait_for(lambda: daemon.metric('streamdqn_verdicts_revised_total{when="after_join"}') == 1, 30,
                    "the revision")
    daemon.wait_for(lambda: daemon.metric("streamdqn_waiting_verdicts") == 1, 30, "the orphan waiting")
    # 5. A verdict an hour later on the records' clock: everything still waiting expires.
    clock = {**verdicts[ids[3]], "revision": 0, "timestamp": last_time + 3600}
    produce(topics.bootstrap, topics.verdicts, keyed([clock]))
    daemon.wait_for(lambda: daemon.metric("streamdqn_episodes_unlabelled_expired_total") == 2
                    and daemon.metric("streamdqn_verdicts_orphaned_total") == 1, 60, "the expiries")

    m = daemon.metrics()
    assert m["streamdqn_verdicts_consumed_total"] == 2 + 6 + 2 + 1  # not the malformed one
    assert m['streamdqn_verdicts_rejected_total{reason="validation_error"}'] == 1
    assert m['streamdqn_episodes_labelled_total{source="verdict"}'] == 8
    assert m['streamdqn_episodes_labelled_total{source="inline"}'] == 0
    assert m['streamdqn_verdicts_revised_total{when="before_join"}'] == 0
    assert m["streamdqn_rows_relabelled_total"] > 0
    assert m["streamdqn_pending_episodes"] == 0
    assert m["streamdqn_waiting_verdicts"] == 0
    joined_steps = sum(1 for e in events if int(e["episode_id"]) in ids[:8])
    assert m["streamdqn_transitions_total"] == joined_steps  # never-labelled episodes are not learned
    assert m["streamdqn_verdict_delay_seconds_count"] == 8  # every join observed its delay
    # The malformed verdict went to the dead-letter topic with its reason.
    letters = consume_all(topics.bootstrap, topics.dlq, 1)
    assert len(letters) == 1


def test_sigkill_with_both_topics_in_flight_counts_every_event_and_verdict_once(
    topics: Topics, make_daemon: Any
) -> None:
    rng = random.Random(7)
    daemon = make_daemon(topics, checkpoint={"interval_seconds": 0.5}, publish={"interval_seconds": 1.0},
                         verdicts={"wait_seconds": 86_400.0}, **FAST).start()
    produced_events = produced_verdicts = steps = 0
    for round_ in range(4):
        events = [{**e, "episode_id": int(e["episode_id"]) + 10_000 * round_}
                  for e in sim_events(6, seed=40 + round_)]
        verdicts = list(verdicts_for(events).values())
        # Verdicts of half the episodes first, the rest after the telemetry, all produced at once.
        half = len(verdicts) // 2
        produce(topics.bootstrap, topics.verdicts, keyed(verdicts[:half]))
        produce(topics.bootstrap, topics.telemetry, encode_events(unlabelled(events)))
        produce(topics.bootstrap, topics.verdicts, keyed(verdicts[half:]))
        produced_events += len(events)
        produced_verdicts += len(verdicts)
        steps += len(events)
        if round_ < 3:
            daemon.wait_for(lambda n=produced_events: daemon.metric("streamdqn_events_consumed_total")
                            > n - 40, 60, "ingest under way")
            time.sleep(rng.uniform(0.0, 1.0))  # the kill lands at a random moment of the ingest
            daemon.signal(signal.SIGKILL)
            daemon.wait_exit(10)
            daemon.start()

    daemon.wait_for(lambda: daemon.metric("streamdqn_events_consumed_total") == produced_events
                    and daemon.metric("streamdqn_verdicts_consumed_total") == produced_verdicts
                    and daemon.metric('streamdqn_episodes_labelled_total{source="verdict"}') == 24, 120,
                    "every event and verdict after the last kill")
    m = daemon.metrics()
    assert m["streamdqn_events_consumed_total"] == produced_events
    assert m["streamdqn_verdicts_consumed_total"] == produced_verdicts
    assert m["streamdqn_transitions_total"] == steps  # every step learned once, none twice
    assert m["streamdqn_pending_episodes"] == 0
    assert m["streamdqn_waiting_verdicts"] == 0
    assert m["streamdqn_episodes_unlabelled_expired_total"] == 0
