"""Data-parallel learners over real processes on loopback (Gloo): identical weights, the rendezvous's errors.

Every group here is real: spawned processes, a TCPStore on 127.0.0.1 and a Gloo process group. Workers
report through a queue; every process is joined, and killed if it outlives the test.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from streamdqn.errors import ConfigError
from streamdqn.kafka.broker import free_port
from streamdqn.learning.distributed import (
    GroupError,
    GroupSettings,
    RankDoubled,
    join_group,
    share_learner_state,
)
from streamdqn.learning.learner import DQNLearner
from streamdqn.learning.replay.buffer import RowBatch
from streamdqn.learning.settings import LearnerSettings
from streamdqn.stream.features import FEATURE_DIM
from streamdqn.stream.rows import N_ACTIONS

# Spawned processes and real process groups: in the integration lane with the other multi-process tests.
pytestmark = [pytest.mark.timeout(180), pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]

CTX = mp.get_context("spawn")
# A worker's whole life, torch import included, on a loaded 2-core machine.
RESULT_SECONDS = 120
STEPS = 20
BATCH = 16


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def learner_settings(seed: int) -> LearnerSettings:
    return LearnerSettings(hidden=(32, 32), lr=1e-3, batch_size=BATCH, target_update_interval=5, device="cpu",
                           seed=seed)


def local_batch(stream: int, step: int) -> RowBatch:
    """Rank `stream`'s batch at `step`: random rows, every target known (so equal known-counts per rank)."""
    rng = np.random.default_rng([stream, step])
    return RowBatch(
        torch.as_tensor(rng.normal(size=(BATCH, FEATURE_DIM)), dtype=torch.float32),
        torch.as_tensor(rng.normal(size=(BATCH, N_ACTIONS)), dtype=torch.float32),
        torch.ones(BATCH, N_ACTIONS, dtype=torch.bool),
        torch.as_tensor(rng.normal(size=(BATCH, FEATURE_DIM)), dtype=torch.float32),
        torch.as_tensor(rng.integers(0, 3, size=BATCH), dtype=torch.int8),
        torch.arange(BATCH),
        torch.ones(BATCH),
    )


def both_ranks_batch(step: int) -> RowBatch:
    pairs = zip(local_batch(0, step), local_batch(1, step), strict=True)
    return RowBatch(*(torch.cat(pair) for pair in pairs))


def weights(learner: DQNLearner) -> dict[str, np.ndarray]:
    nets = {"online": learner.online, "target": learner.target}
    return {f"{n}.{k}": v.numpy().copy() for n, net in nets.items() for k, v in net.state_dict().items()}


def normalize(learner: DQNLearner) -> None:
    """A normalization only rank 0 (and the reference) knows: the buffers must travel too."""
    spread = np.linspace(0.5, 2.0, FEATURE_DIM)
    learner.set_normalization(0.1 * spread, spread, 4.0)


def settings_for(rank: int, port: int, timeout: float = 60.0, world_size: int = 2) -> GroupSettings:
    return GroupSettings(rank=rank, world_size=world_size, master_port=port, timeout_seconds=timeout)


# --- workers: run in spawned processes ---------------------------------------------------------------


def _reporting(results: Any, rank: int, body: Callable[[], Any]) -> None:
    torch.set_num_threads(1)
    try:
        results.put((rank, "ok", body()))
    except BaseException as e:  # the test reads the failure instead of waiting for a result
        results.put((rank, type(e).__name__, "".join(traceback.format_exception(e))))
        raise


def _train(rank: int, port: int, checkpoint: str | None, results: Any) -> None:
    def body() -> dict[str, Any]:
        group = join_group(settings_for(rank, port))
        try:
            # Different seeds: only the start-up sync can make the ranks equal.
            learner = DQNLearner(learner_settings(seed=100 + rank), FEATURE_DIM, N_ACTIONS,
                                 after_backward=group.average_gradients)
            if checkpoint is None:
                if group.is_publisher:
                    normalize(learner)
                group.broadcast_parameters(learner.online)
                group.broadcast_parameters(learner.target)
            else:
                if group.is_publisher:
                    learner.load_state_dict(torch.load(checkpoint, weights_only=True))
                share_learner_state(group, learner)
            for step in range(STEPS):
                learner.update(local_batch(rank, step))
            # Adam and clipping barely see a gradient's scale: the mean itself is checked on known values.
            probe = torch.nn.Linear(3, 2)
            probe.weight.grad = torch.full_like(probe.weight, rank + 1.0)
            group.average_gradients(probe)
            assert probe.weight.grad is not None and probe.bias.grad is not None
            averaged = (probe.weight.grad.tolist(), probe.bias.grad.tolist())
            return {"weights": weights(learner), "updates": learner.counters.updates, "averaged": averaged}
        finally:
            group.close()
            group.close()

    _reporting(results, rank, body)


def _member(rank: int, port: int, release: Any, results: Any) -> None:
    def body() -> str:
        try:
            group = join_group(settings_for(rank, port, timeout=30))
        except ConfigError as e:
            return f"refused: {e}"
        results.put((rank, "joined", ""))
        try:
            release.wait(RESULT_SECONDS)
            group.barrier()
        finally:
            group.close()
        return "left"

    _reporting(results, rank, body)


def _joins_late(rank: int, port: int, delay: float, results: Any) -> None:
    def body() -> str:
        time.sleep(delay)
        group = join_group(settings_for(rank, port, timeout=2, world_size=3), keep_waiting=lambda: True)
        try:
            group.barrier()
        finally:
            group.close()
        return "joined"

    _reporting(results, rank, body)


def _dies_after_joining(rank: int, port: int, results: Any) -> None:
    def body() -> str:
        group = join_group(settings_for(rank, port, timeout=30))
        if rank == 1:
            results.put((rank, "ok", "dying"))
            results.close()
            results.join_thread()  # flushed: os._exit skips the queue's own flush
            os._exit(0)  # no close: as a SIGKILL would leave it
        model = torch.nn.Linear(4, 2)
        model(torch.ones(1, 4)).sum().backward()
        try:
            group.average_gradients(model)
        except GroupError as e:
            return f"GroupError: {e}"
        finally:
            group.close()
        return "no error"

    _reporting(results, rank, body)


def _mismatched(rank: int, port: int, results: Any) -> None:
    def body() -> str:
        group = join_group(settings_for(rank, port))
        # A device of its own is allowed; another learning rate is not.
        settings = learner_settings(seed=rank).model_copy(update={"lr": 1e-3 * (1 + rank), "device": "cpu"})
        try:
            share_learner_state(group, DQNLearner(settings, FEATURE_DIM, N_ACTIONS))
        except ConfigError as e:
            return f"refused: {e}"
        finally:
            group.close()
        return "shared"

    _reporting(results, rank, body)


def _steps_together(rank: int, port: int, rows: Any, results: Any) -> None:
    """Rank r's normalizer saw `rows[r]`; three steps: r1 not ready, both ready, r0 leaving."""
    def body() -> list[dict[str, Any]]:
        from streamdqn.learning.distributed import LocalProgress
        from streamdqn.stream.features import RunningNormalizer

        group = join_group(settings_for(rank, port))
        n = RunningNormalizer(dim=rows[rank].shape[1])
        n.update(rows[rank])
        out = []
        try:
            for ready, leaving in [(rank == 0, False), (True, False), (True, rank == 0)]:
                local = LocalProgress(ready=ready, leaving=leaving, events=10 * (rank + 1),
                                      transitions=rank + 1, normalizer_count=n.count,
                                      normalizer_version=rank + 1, mean=n.mean, std=n.std)
                got = group.step_together(local)
                out.append({"all_ready": got.all_ready, "leaving": got.leaving, "events": got.events,
                            "transitions": got.transitions, "count": got.normalizer_count,
                            "mean": got.mean, "std": got.std})
        finally:
            group.close()
        return out

    _reporting(results, rank, body)


@contextmanager
def processes(target: Callable[..., None], *arg_lists: tuple[Any, ...]) -> Iterator[list[Any]]:
    procs = [CTX.Process(target=target, args=args, daemon=True) for args in arg_lists]
    for p in procs:
        p.start()
    try:
        yield procs
    finally:
        for p in procs:
            p.join(30)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()


def two_ranks(target: Callable[..., None], *args: Any) -> tuple[dict[int, tuple[str, Any]], list[int | None]]:
    """`target(rank, port, *args, results)` as ranks 0 and 1 of one group: what each reported, and the
    processes' exit codes once joined."""
    results = CTX.Queue()
    port = free_port()
    with processes(target, *((rank, port, *args, results) for rank in (0, 1))) as procs:
        out = collect(results, 2)
    return out, [p.exitcode for p in procs]


def collect(results: Any, n: int) -> dict[int, tuple[str, Any]]:
    out = {}
    for _ in range(n):
        rank, kind, payload = results.get(timeout=RESULT_SECONDS)
        assert kind in ("ok", "joined"), payload
        out[rank] = (kind, payload)
    return out


# --- the learners stay one learner ---------------------------------------------------------------------


def reference(checkpoint: DQNLearner | None) -> DQNLearner:
    """One process on both ranks' batches at once (the mean loss over 2 x BATCH rows)."""
    if checkpoint is None:
        learner = DQNLearner(learner_settings(seed=100), FEATURE_DIM, N_ACTIONS)
        normalize(learner)
    else:
        learner = checkpoint
    for step in range(STEPS):
        learner.update(both_ranks_batch(step))
    return learner


def pretrained() -> DQNLearner:
    learner = DQNLearner(learner_settings(seed=7), FEATURE_DIM, N_ACTIONS)
    normalize(learner)
    for step in range(7):
        learner.update(local_batch(9, step))
    return learner


@pytest.mark.parametrize("start", ["broadcast", "restore"])
def test_two_ranks_on_different_batches_hold_identical_weights_equal_to_one_learner_on_both(
    start: str, tmp_path: Path
) -> None:
    checkpoint = None
    if start == "restore":  # rank 0 restores a checkpoint with Adam moments; rank 1 starts fresh
        checkpoint = str(tmp_path / "learner.pt")
        torch.save(pretrained().state_dict(), checkpoint)
    out, exits = two_ranks(_train, checkpoint)
    assert exits == [0, 0]
    rank0, rank1 = out[0][1], out[1][1]
    assert rank0["updates"] == rank1["updates"] == STEPS + (7 if start == "restore" else 0)
    # (1 + 2) / 2, and a missing gradient counts as zeros.
    assert rank0["averaged"] == rank1["averaged"] == ([[1.5] * 3] * 2, [0.0, 0.0])
    assert rank0["weights"].keys() == rank1["weights"].keys()
    for name, value in rank0["weights"].items():
        assert np.array_equal(value, rank1["weights"][name]), f"{name} differs between the ranks"

    expected = weights(reference(pretrained() if start == "restore" else None))
    untrained = weights(pretrained() if start == "restore" else DQNLearner(
        learner_settings(seed=100), FEATURE_DIM, N_ACTIONS))
    for name, value in expected.items():
        np.testing.assert_allclose(rank0["weights"][name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    assert not np.allclose(rank0["weights"]["online.mlp.0.weight"], untrained["online.mlp.0.weight"])


def test_steps_together_agree_on_readiness_sum_counts_and_pool_the_normalizers_exactly() -> None:
    rng = np.random.default_rng(5)
    rows = [rng.normal(3.0, 2.0, size=(40, 6)), rng.normal(-1.0, 0.5, size=(25, 6))]
    out, exits = two_ranks(_steps_together, rows)
    assert exits == [0, 0]
    steps0, steps1 = out[0][1], out[1][1]
    assert [s["all_ready"] for s in steps0] == [s["all_ready"] for s in steps1] == [False, True, True]
    assert [s["leaving"] for s in steps0] == [0, 0, 1]
    assert {(s["events"], s["transitions"]) for s in steps0 + steps1} == {(30, 3)}
    # The pooled statistics are those of one normalizer that saw both ranks' rows.
    both = np.concatenate(rows)
    for s in (steps0[0], steps1[2]):
        assert s["count"] == len(both)
        np.testing.assert_allclose(s["mean"], both.mean(axis=0), rtol=1e-9)
        np.testing.assert_allclose(s["std"], np.sqrt(both.var(axis=0) + 1e-8), rtol=1e-6)


def test_a_dead_member_makes_the_next_collective_raise_a_group_error() -> None:
    out, _ = two_ranks(_dies_after_joining)
    assert out[1] == ("ok", "dying")
    assert out[0][1].startswith("GroupError: all_reduce failed on rank 0 of 2"), out[0][1]


# --- the rendezvous refuses what would wedge a group -------------------------------------------------


def test_a_second_member_with_a_taken_rank_is_refused_and_told_which() -> None:
    results, release = CTX.Queue(), CTX.Event()
    port = free_port()
    with processes(_member, (0, port, release, results), (1, port, release, results)) as group:
        assert {kind for kind, _ in collect(results, 2).values()} == {"joined"}
        with processes(_member, (1, port, release, results), (0, port, release, results)) as doubles:
            refused = collect(results, 2)
        release.set()
        left = collect(results, 2)
    assert [p.exitcode for p in group + doubles] == [0, 0, 0, 0]
    for rank in (0, 1):
        message = refused[rank][1]
        assert message.startswith(f"refused: rank {rank} is doubled"), message
        assert "distinct distributed.rank in 0..1" in message
        assert left[rank] == ("ok", "left")


def test_members_that_keep_waiting_outlast_the_timeout_for_the_rendezvous_and_for_each_other() -> None:
    """Rank 1 comes 5 s before rank 0's rendezvous, and both 5 s before rank 2, at a 2 s timeout."""
    results, port = CTX.Queue(), free_port()
    with processes(_joins_late, *((rank, port, delay, results) for rank, delay in ((1, 0), (0, 5), (2, 10)))):
        out = collect(results, 3)
    assert out == {rank: ("ok", "joined") for rank in range(3)}


def test_a_waiting_member_stops_waiting_when_told(caplog: pytest.LogCaptureFixture) -> None:
    answers = [True, True, False]  # go on, go on, stop
    with caplog.at_level("WARNING", logger="streamdqn"), pytest.raises(ConfigError, match="could not reach"):
        join_group(settings_for(1, free_port(), timeout=1), keep_waiting=lambda: answers.pop(0))
    assert answers == []
    assert "rank 1 waits for rank 0's rendezvous" in caplog.text  # at once, then every timeout


def test_a_waiting_member_whose_rank_is_held_tries_again_until_told_to_stop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    results, release = CTX.Queue(), CTX.Event()
    port = free_port()
    answers = [True, True, False]
    with processes(_member, (0, port, release, results), (1, port, release, results)):
        assert {kind for kind, _ in collect(results, 2).values()} == {"joined"}
        refused = pytest.raises(RankDoubled, match="rank 1 is doubled")
        with caplog.at_level("WARNING", logger="streamdqn"), refused:
            join_group(settings_for(1, port, timeout=30), keep_waiting=lambda: answers.pop(0))
        release.set()
        collect(results, 2)
    assert answers == []
    assert caplog.text.count("rank 1 is doubled") == 1  # warned once per timeout, then told to stop


def test_a_world_that_never_assembles_times_out_naming_the_missing_rank() -> None:
    with pytest.raises(ConfigError, match=r"did not assemble within 3 s: rank\(s\) \[1\] of world_size 2"):
        join_group(settings_for(0, free_port(), timeout=3))


def test_a_member_without_rank_0_times_out_naming_the_rendezvous() -> None:
    port = free_port()
    with pytest.raises(ConfigError, match=f"rank 1 could not reach the rendezvous at 127.0.0.1:{port}"):
        join_group(settings_for(1, port, timeout=3))


def test_a_rendezvous_that_goes_away_during_the_join_is_a_failed_join_not_a_crash() -> None:
    """Seen when rank 0 exits for a restart while another rank joins: the daemon must exit 76, not 70."""
    port = free_port()
    host = subprocess.Popen([sys.executable, "-c", (
        "import time, torch.distributed as d\n"
        f"s = d.TCPStore('127.0.0.1', {port}, is_master=True, wait_for_workers=False)\n"
        "print('up', flush=True)\ntime.sleep(3)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert host.stdout is not None and host.stdout.readline().strip() == "up"
        with pytest.raises(ConfigError, match=f"rendezvous at 127.0.0.1:{port} failed while rank 1 joined"):
            join_group(settings_for(1, port, timeout=60))
    finally:
        host.kill()
        host.communicate()


def test_rank_0_on_a_port_another_process_holds_is_told_to_choose_another() -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        with pytest.raises(ConfigError, match=f"master_port {port} on 127.0.0.1 is taken by another process"):
            join_group(settings_for(0, port, timeout=3))


@pytest.mark.parametrize(("field", "kwargs"), [
    ("rank", {"rank": 2, "world_size": 2}),
    ("rank", {"rank": -1, "world_size": 2}),
    ("world_size", {"rank": 0, "world_size": 0}),
    ("master_port", {"rank": 0, "world_size": 1, "master_port": 70000}),
    ("timeout_seconds", {"rank": 0, "world_size": 1, "timeout_seconds": 0}),
])
def test_group_settings_name_the_invalid_key(field: str, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match=f"distributed.{field} must be"):
        GroupSettings(**{"master_port": 29500, **kwargs})


def test_a_group_of_one_averages_to_the_same_gradients_and_closes_twice() -> None:
    group = join_group(settings_for(0, free_port(), world_size=1))
    try:
        assert group.is_publisher
        model = torch.nn.Linear(3, 2)
        model(torch.ones(2, 3)).sum().backward()
        before = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        group.average_gradients(model)
        after = [p.grad for p in model.parameters() if p.grad is not None]
        assert len(after) == len(before) == 2
        assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True))
    finally:
        group.close()
        group.close()
    with pytest.raises(GroupError, match="closed group"):
        group.average_gradients(model)


# --- the learner's hook ---------------------------------------------------------------------------------


def test_the_learner_hands_its_gradients_to_after_backward_before_clipping() -> None:
    seen: list[tuple[torch.nn.Module, float]] = []

    def erase(module: torch.nn.Module) -> None:
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        seen.append((module, float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))))
        for g in grads:
            g.zero_()

    settings = learner_settings(seed=1).model_copy(update={"grad_clip": 1e-6})
    learner = DQNLearner(settings, FEATURE_DIM, N_ACTIONS, after_backward=erase)
    assert learner.graphed_step is None
    before = weights(learner)
    learner.update(local_batch(0, 0))
    assert [m for m, _ in seen] == [learner.online]
    assert seen[0][1] > 1e-3  # unclipped: the hook ran before clip_grad_norm_
    # Zero gradients make Adam's step zero: what the hook left is what the optimizer used.
    for name, value in weights(learner).items():
        assert np.array_equal(value, before[name]), name
    plain = DQNLearner(settings, FEATURE_DIM, N_ACTIONS)
    plain.update(local_batch(0, 0))
    assert not np.array_equal(weights(plain)["online.mlp.0.weight"], before["online.mlp.0.weight"])


def test_a_rank_whose_learner_settings_differ_from_rank_0s_is_refused() -> None:
    out, exits = two_ranks(_mismatched)
    assert exits == [0, 0]
    assert out[0] == ("ok", "shared")
    assert out[1][1] == (
        "refused: rank 1's learner settings differ from rank 0's in ['lr']: every rank must learn with the "
        "same [learner] section"
    )


# --- under torchrun ------------------------------------------------------------------------------------


def torchrun_member() -> None:
    """What each torchrun worker runs (torch.distributed.run ... -m tests.integration.test_distributed)."""
    torch.set_num_threads(1)
    group = join_group(GroupSettings.from_environment(os.environ, timeout_seconds=60))
    try:
        learner = DQNLearner(learner_settings(seed=100 + group.rank), FEATURE_DIM, N_ACTIONS,
                             after_backward=group.average_gradients)
        share_learner_state(group, learner)
        for step in range(3):
            learner.update(local_batch(group.rank, step))
        sha = hashlib.sha256(b"".join(v.tobytes() for v in weights(learner).values())).hexdigest()
        print(f"member rank={group.rank} agent_store={group.settings.agent_store} sha256={sha}", flush=True)
    finally:
        group.close()


def test_members_under_torchrun_join_its_agents_store_and_agree() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "tests.integration.test_distributed"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=150, check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # Found anywhere in a line: the two workers share torchrun's stdout.
    # A hash is exactly 64 hex digits: two lines printed at once must not run together into one match.
    pattern = r"member rank=(\d+) agent_store=(True|False) sha256=([0-9a-f]{64})"
    members = sorted(re.findall(pattern, done.stdout))
    assert [m[:2] for m in members] == [("0", "True"), ("1", "True")], done.stdout + done.stderr[-3000:]
    assert members[0][2] == members[1][2]


def test_settings_from_a_launchers_environment() -> None:
    environ = {"RANK": "1", "WORLD_SIZE": "3", "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "29400",
               "TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_RESTART_COUNT": "2"}
    assert GroupSettings.from_environment(environ, timeout_seconds=9) == GroupSettings(
        rank=1, world_size=3, master_addr="10.0.0.5", master_port=29400, timeout_seconds=9, agent_store=True,
        generation=2,
    )
    plain = GroupSettings.from_environment({k: environ[k] for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                                    "MASTER_PORT")})
    assert (plain.agent_store, plain.generation) == (False, 0)
    with pytest.raises(ConfigError, match=r"lacks \['MASTER_PORT'\]"):
        GroupSettings.from_environment({k: environ[k] for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR")})
    with pytest.raises(ConfigError, match="not an integer"):
        GroupSettings.from_environment({**environ, "RANK": "one"})


if __name__ == "__main__":
    torchrun_member()
