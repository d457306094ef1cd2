"""Two daemons as one data-parallel group (Gloo on loopback) against the real broker, each a subprocess.

Both are members of one consumer group on a 4-partition topic and share one state directory (each its own
rank-R/ for checkpoints, rank 0's snapshots/ for everyone). What must hold: the summed consumed counts
equal what was produced, before and after a rank is SIGKILLed and after a rank stops for longer than the
session timeout (its partitions move to the other rank) and comes back (they move back); the ranks'
weights agree once the updates stop; rank 0 publishes, its manifest counts the whole group, and the
snapshot runs in onnxruntime from either rank. The ranks are static members of the consumer group
(group.instance.id per rank), so restarts after a failure do not make the group rebalance.

A small supervisor plays systemd's Restart=on-failure: a rank that exits with an error is started again
after a second (a rank whose group failed exits 76, at the latest after distributed.timeout_seconds).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from streamdqn.kafka.broker import free_port
from streamdqn.stream.features import FEATURE_DIM
from tests.integration.conftest import DaemonProcess, Topics, encode_events, produce, sim_events, write_config

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]

GROUP_TIMEOUT_SECONDS = 12.0
RANK_SETTINGS: dict[str, dict[str, object]] = {
    "learner": {"mode": "thread", "hidden": [32, 32], "updates_per_transition": 0.5},
    "replay": {"capacity": 50_000, "min_size": 50},
    "publish": {"interval_seconds": 2.0, "min_updates": 20, "keep": 50, "gate": False},
    "checkpoint": {"interval_seconds": 1.5},
    "lifecycle": {"stop_timeout_seconds": 30.0, "progress_timeout_seconds": 120.0,
                  "broker_retry_max_seconds": 2.0},
    "kafka": {"session_timeout_ms": 6_000},  # a stopped rank's partitions move after 6 s
}
EXIT_GROUP_LOST = 76


def readyz(daemon: DaemonProcess) -> dict[str, object]:
    """/readyz's details; a 503 (not ready yet) still carries them."""
    try:
        return dict(json.loads(daemon.get("/readyz")))
    except urllib.error.HTTPError as e:
        return dict(json.loads(e.read()))


class Ranks:
    """N daemons of one group; `supervise()` restarts the ones that exited with an error."""

    def __init__(self, topics: Topics, tmp: Path, world_size: int = 2) -> None:
        state = tmp / "state"
        rendezvous = free_port()
        self.daemons: list[DaemonProcess] = []
        self.exits: list[list[int]] = [[] for _ in range(world_size)]
        for rank in range(world_size):
            port = free_port()
            distributed = {"world_size": world_size, "rank": rank,
                           "init_method": f"tcp://127.0.0.1:{rendezvous}",
                           "timeout_seconds": GROUP_TIMEOUT_SECONDS}
            config = write_config(tmp / f"rank-{rank}.toml", topics, state, port, distributed=distributed,
                                  **RANK_SETTINGS)
            self.daemons.append(DaemonProcess(config, state, port, tmp / f"rank-{rank}.log"))
        self._stopped: set[int] = set()

    def start(self) -> Ranks:
        for d in self.daemons:
            d.start()
        return self

    def supervise(self) -> None:
        """One look: restart every rank that exited and was not stopped on purpose."""
        for rank, d in enumerate(self.daemons):
            assert d.process is not None
            code = d.process.poll()
            if code is None or rank in self._stopped:
                continue
            self.exits[rank].append(code)
            time.sleep(1.0)  # RestartSec
            d.start()

    def hold(self, rank: int) -> None:
        """Leave rank stopped (an operator's stop) until `release`."""
        self._stopped.add(rank)

    def release(self, rank: int) -> None:
        self._stopped.discard(rank)

    def wait(self, predicate: Callable[[], object], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            self.supervise()
            try:
                last = predicate()
                if last:
                    return
            except OSError as exc:  # a rank between restarts
                last = exc
            time.sleep(0.5)
        logs = "\n".join(f"--- rank {r}\n{d.logs()[-2500:]}" for r, d in enumerate(self.daemons))
        raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r}); exits "
                             f"{self.exits}\n{logs}")

    def consumed(self) -> int:
        return int(sum(d.metric("streamdqn_events_consumed_total") for d in self.daemons))

    def ready(self) -> list[dict[str, object]]:
        return [readyz(d) for d in self.daemons]

    def assigned(self) -> bool:
        """Every rank holds some of the partitions (the group's rebalance has settled)."""
        counts = [d.metric("streamdqn_partitions_assigned") for d in self.daemons]
        return all(c > 0 for c in counts) and sum(counts) == 4

    def stop(self) -> None:
        """SIGTERM to all at once (as `systemctl stop 'streamdqn@*'`), then wait; kill what hangs."""
        running = [d.process for d in self.daemons if d.process is not None and d.process.poll() is None]
        for process in running:
            process.send_signal(signal.SIGTERM)
        for process in running:
            try:
                process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


@pytest.fixture
def ranks(topics: Topics, tmp_path: Path) -> Iterator[Ranks]:
    group = Ranks(topics, tmp_path)
    yield group
    group.stop()


def agreeing_weights(ranks: Ranks, seen: dict[str, object]) -> bool:
    return agreeing_weights_of(ranks.daemons, seen)


def agreeing_weights_of(daemons: list[DaemonProcess], seen: dict[str, object]) -> bool:
    """Every rank reports the same update count and weight hash twice in a row (updates have stopped)."""
    ready = [readyz(d) for d in daemons]
    key = [(r["updates"], r["weights_sha256"]) for r in ready]
    same = len(set(key)) == 1 and int(ready[0]["updates"]) > 0  # type: ignore[call-overload]
    stable = same and seen.get("last") == key
    seen["last"] = key
    return stable


def test_two_ranks_learn_one_policy_count_once_and_rank0_publishes(ranks: Ranks, topics: Topics) -> None:
    events = sim_events(24, seed=41, sandboxes=8)
    ranks.start()
    ranks.wait(ranks.assigned, 60, "both ranks assigned partitions")
    produce(topics.bootstrap, topics.telemetry, encode_events(events))
    ranks.wait(lambda: ranks.consumed() == len(events), 120, "every event consumed once across the ranks")
    shares = [d.metric("streamdqn_events_consumed_total") for d in ranks.daemons]
    assert all(s > 0 for s in shares), f"each rank consumes its partitions: {shares}"

    seen: dict[str, object] = {}
    ranks.wait(lambda: agreeing_weights(ranks, seen), 120, "the ranks' weights to agree")
    ready = ranks.ready()
    assert [r["rank"] for r in ready] == [0, 1] and {r["world_size"] for r in ready} == {2}
    info = [k for k in ranks.daemons[1].metrics() if k.startswith("streamdqn_build_info{")]
    assert info and 'rank="1"' in info[0] and 'world_size="2"' in info[0]

    def manifest_counts_the_group() -> bool:
        manifest = json.loads(ranks.daemons[1].get("/snapshots/latest/manifest.json"))
        return int(manifest["events_learned"]) == len(events)

    ranks.wait(manifest_counts_the_group, 60, "a snapshot whose manifest counts both ranks' events")
    assert not (ranks.daemons[0].state_dir / "rank-1" / "snapshots").exists(), "only rank 0 publishes"
    model = ranks.daemons[1].get("/snapshots/latest/model.onnx")
    assert model == ranks.daemons[0].get("/snapshots/latest/model.onnx")
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    out = session.run(None, {"features": np.zeros((3, FEATURE_DIM), dtype=np.float32)})
    assert out[0].shape == (3, 5)


def test_a_killed_rank_and_a_rank_that_leaves_and_returns_lose_and_double_nothing(
    ranks: Ranks, topics: Topics
) -> None:
    events = sim_events(48, seed=43, sandboxes=8)
    episodes = sorted({int(e["episode_id"]) for e in events})
    parts = [[e for e in events if episodes.index(int(e["episode_id"])) % 4 == i] for i in range(4)]
    ranks.start()
    ranks.wait(ranks.assigned, 60, "both ranks assigned partitions")
    produce(topics.bootstrap, topics.telemetry, encode_events(parts[0]))
    ranks.wait(lambda: ranks.consumed() == len(parts[0]), 120, "the first part")
    ranks.wait(lambda: ranks.ready()[0]["updates"], 60, "updates together")

    # SIGKILL rank 1 mid-stream: rank 0's collectives fail (76), the supervisor restarts both.
    produce(topics.bootstrap, topics.telemetry, encode_events(parts[1]))
    ranks.daemons[1].signal(signal.SIGKILL)
    ranks.wait(lambda: EXIT_GROUP_LOST in ranks.exits[0], GROUP_TIMEOUT_SECONDS * 4,
               "rank 0 to leave its group")
    ranks.wait(lambda: ranks.consumed() == len(parts[0]) + len(parts[1]), 180,
               "exact counts after the kill and the restarts")
    ranks.wait(ranks.assigned, 120, "the consumer group to settle after the restarts")
    seen: dict[str, object] = {}
    ranks.wait(lambda: agreeing_weights(ranks, seen), 120, "the ranks to learn together again")

    # Rank 1 stops (SIGTERM: final checkpoint, commit) for longer than the session timeout: the broker
    # evicts it and its partitions move to rank 0, which reads the third part from all four (its group
    # failed: it exits 76 once, then its learner waits for rank 1). Rank 1 comes back: partitions move
    # back and resume at rank 0's checkpoint, not at rank 1's older one (a double count).
    before = [d.metric("streamdqn_events_consumed_total") for d in ranks.daemons]
    ranks.hold(1)
    ranks.daemons[1].signal(signal.SIGTERM)
    assert ranks.daemons[1].wait_exit(60) == 0
    rank0 = ranks.daemons[0]
    ranks.wait(lambda: rank0.metric("streamdqn_partitions_assigned") == 4, 120,
               "rank 0 to take over rank 1's partitions")
    produce(topics.bootstrap, topics.telemetry, encode_events(parts[2]))
    ranks.wait(lambda: rank0.metric("streamdqn_events_consumed_total") == before[0] + len(parts[2]), 120,
               "rank 0 to read the third part from all four partitions")
    ranks.release(1)
    ranks.daemons[1].start()
    ranks.wait(ranks.assigned, 120, "both ranks assigned partitions again")
    produce(topics.bootstrap, topics.telemetry, encode_events(parts[3]))
    ranks.wait(lambda: ranks.consumed() == len(events), 180, "exact counts after the rebalances")
    seen = {}
    ranks.wait(lambda: agreeing_weights(ranks, seen), 120, "the ranks' weights to agree again")
    time.sleep(2.0)  # a late double count would show here
    assert ranks.consumed() == len(events)


def test_torchrun_hands_out_the_ranks_and_ports(topics: Topics, tmp_path: Path) -> None:
    """One configuration for both ranks (world_size left at 1): torchrun's agent serves the rendezvous
    and sets RANK/WORLD_SIZE; local rank r serves HTTP on http.port + r."""
    events = sim_events(12, seed=47, sandboxes=8)
    base = free_port()
    while not port_free(base + 1):
        base = free_port()
    # The default learner mode here (the other tests use a thread): each rank's learner process joins.
    sections = {**RANK_SETTINGS, "learner": {**RANK_SETTINGS["learner"], "mode": "process"}}
    config = write_config(tmp_path / "torchrun.toml", topics, tmp_path / "state", base, **sections)
    log = open(tmp_path / "torchrun.log", "ab")  # noqa: SIM115 - the child owns it
    agent = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
         "--master-port", str(free_port()), "--max-restarts", "0", "-m", "streamdqn", "run", "--config",
         str(config)],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=tmp_path,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    log.close()
    daemons = [DaemonProcess(config, tmp_path / "state", base + r, tmp_path / "torchrun.log", process=agent)
               for r in range(2)]
    try:
        for d in daemons:
            d.wait_http()
        first = daemons[0]
        first.wait_for(lambda: all(d.metric("streamdqn_partitions_assigned") > 0 for d in daemons), 60,
                       "both ranks assigned partitions")
        produce(topics.bootstrap, topics.telemetry, encode_events(events))
        first.wait_for(lambda: sum(d.metric("streamdqn_events_consumed_total") for d in daemons)
                       == len(events), 90, "every event consumed once")
        ready = [readyz(d) for d in daemons]
        assert [r["rank"] for r in ready] == [0, 1] and {r["world_size"] for r in ready} == {2}
        seen: dict[str, object] = {}
        first.wait_for(lambda: agreeing_weights_of(daemons, seen), 90, "the ranks' weights to agree")
    finally:
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(timeout=60)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait(timeout=10)


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
