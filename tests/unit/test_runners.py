"""The learner runners for real: a thread and a spawned process over shared-memory replay.

Each runs a tiny network on a filled replay buffer; the tests only wait on conditions (with a deadline),
never assert on how long something took.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

import numpy as np
import pytest
import torch

from streamdqn.learning.learner import DQNLearner
from streamdqn.learning.replay.buffer import ReplayBuffer, make_replay
from streamdqn.learning.runners import LearnerRunner, ProcessRunner, RunnerOptions, ThreadRunner
from streamdqn.learning.settings import LearnerSettings
from streamdqn.stream.features import FEATURE_DIM
from streamdqn.stream.rows import N_ACTIONS
from tests.unit.test_learner import S0, S1, mdp_rows

SETTINGS = LearnerSettings(hidden=(8,), lr=1e-2, gamma=0.9, batch_size=16, target_update_interval=10,
                           device="cpu", seed=0, cuda_graph=False)
PUBLISH_EVERY = 5
ROWS = 32  # mdp_rows(16): two states, 16 copies each
OPTIONS = RunnerOptions(FEATURE_DIM, N_ACTIONS, min_size=ROWS, updates_per_transition=0.5,
                        publish_every_updates=PUBLISH_EVERY, torch_threads=1)
CAPACITY = 128


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def budget(inserted: int) -> int:
    return int(OPTIONS.updates_per_transition * inserted)


def run_to_budget(runner: LearnerRunner, inserted: int) -> int:
    """Allow `inserted` rows' worth of updates, wait for them, and check that no more follow."""
    runner.note_ingested(inserted, 0)
    target = budget(inserted)
    wait_until(lambda: runner.stats().updates >= target, f"{target} updates")
    # The loop keeps running (heartbeats) but must not update past its budget.
    beat = runner.stats().heartbeat
    wait_until(lambda: runner.stats().heartbeat > beat, "a heartbeat after the budget was reached")
    assert runner.stats().updates == target
    return target


def filled(shared: bool = False, lock: AbstractContextManager[object] | None = None) -> ReplayBuffer:
    buffer = make_replay(CAPACITY, "cpu", seed=0, shared=shared, lock=lock)
    buffer.push(mdp_rows(16))
    assert len(buffer) == ROWS
    return buffer


def normalization() -> tuple[np.ndarray, np.ndarray]:
    mean = np.linspace(-1.0, 1.0, FEATURE_DIM).astype(np.float32)
    std = np.linspace(0.5, 2.0, FEATURE_DIM).astype(np.float32)
    return mean, std


def assert_weights_match(weights: dict[str, torch.Tensor], online: dict[str, torch.Tensor]) -> None:
    assert set(weights) == set(online)
    for name, tensor in online.items():
        torch.testing.assert_close(weights[name], tensor.float(), rtol=0, atol=0, msg=name)


def restored(state: dict[str, object]) -> DQNLearner:
    learner = DQNLearner(SETTINGS.model_copy(update={"seed": 99}), FEATURE_DIM, N_ACTIONS)
    learner.load_state_dict(state)
    return learner


def test_thread_runner_updates_up_to_its_budget_publishes_and_hands_over_its_state() -> None:
    learner = DQNLearner(SETTINGS, FEATURE_DIM, N_ACTIONS)
    runner = ThreadRunner(learner, filled(), OPTIONS)
    assert runner.weights()[1] == 1  # the initial weights are published on construction
    runner.start()
    try:
        assert runner.alive()
        # Nothing inserted yet: no budget, no updates.
        beat = runner.stats().heartbeat
        wait_until(lambda: runner.stats().heartbeat > beat, "a first heartbeat")
        assert runner.stats().updates == 0

        updates = run_to_budget(runner, 40)
        stats = runner.stats()
        assert np.isfinite(stats.loss) and np.isfinite(stats.td_error_abs)
        weights, version = runner.weights()
        assert version == 1 + updates // PUBLISH_EVERY
        assert_weights_match(weights, runner.learner_state()["online"])

        mean, std = normalization()
        runner.set_normalization(mean, std, 1000.0)
        updates = run_to_budget(runner, 50)
        online = runner.learner_state()["online"]
        np.testing.assert_array_equal(online["obs_mean"].numpy(), mean)
        np.testing.assert_array_equal(online["obs_std"].numpy(), std)
        weights, version = runner.weights()  # published at update 25, after the new normalization
        assert version == 1 + updates // PUBLISH_EVERY
        np.testing.assert_array_equal(weights["obs_mean"].numpy(), mean)

        state = runner.learner_state()
        copy = restored(state)
        assert copy.counters.updates == updates
        states = np.stack([S0, S1])
        np.testing.assert_array_equal(copy.q_values(states), learner.q_values(states))
    finally:
        runner.stop()
    assert not runner.alive()
    runner.stop()  # safe twice
    assert not runner.alive()


def test_process_runner_updates_up_to_its_budget_over_shared_replay() -> None:
    learner = DQNLearner(SETTINGS, FEATURE_DIM, N_ACTIONS)
    lock = ProcessRunner.make_lock()
    runner = ProcessRunner(SETTINGS, learner.state_dict(), filled(shared=True, lock=lock), lock, OPTIONS,
                           learner.online.state_dict(), learner.counters.updates)
    assert not runner.alive()
    runner.start()
    try:
        wait_until(runner.alive, "the learner process")
        updates = run_to_budget(runner, 40)
        weights, version = runner.weights()
        assert version == updates // PUBLISH_EVERY
        state = runner.learner_state()
        assert state["updates"] == updates
        assert_weights_match(weights, state["online"])
        # The child learned: its weights are no longer the ones it was given.
        assert not torch.equal(weights["mlp.0.weight"], learner.online.state_dict()["mlp.0.weight"])

        mean, std = normalization()
        runner.set_normalization(mean, std, 1000.0)
        updates = run_to_budget(runner, 50)
        state = runner.learner_state()
        online = state["online"]
        np.testing.assert_array_equal(online["obs_mean"].numpy(), mean)
        np.testing.assert_array_equal(online["obs_std"].numpy(), std)

        copy = restored(state)
        assert copy.counters.updates == updates
        assert_weights_match(runner.weights()[0], copy.online.state_dict())
    finally:
        runner.stop()
    assert not runner.alive()
    runner.stop()  # safe twice
    with pytest.raises(RuntimeError, match="not running"):
        runner.learner_state()


def learner_process() -> multiprocessing.process.BaseProcess:
    children = [p for p in multiprocessing.active_children() if p.name == "streamdqn-learner"]
    assert len(children) == 1
    return children[0]


def test_a_killed_learner_process_is_not_alive_and_stops_cleanly() -> None:
    learner = DQNLearner(SETTINGS, FEATURE_DIM, N_ACTIONS)
    lock = ProcessRunner.make_lock()
    runner = ProcessRunner(SETTINGS, None, filled(shared=True, lock=lock), lock, OPTIONS,
                           learner.online.state_dict())
    runner.start()
    try:
        wait_until(runner.alive, "the learner process")
        wait_until(lambda: runner.stats().heartbeat > 0, "a first heartbeat")
        child = learner_process()
        assert child.pid is not None
        os.kill(child.pid, signal.SIGKILL)
        wait_until(lambda: not runner.alive(), "the killed learner to be seen dead")
        with pytest.raises(RuntimeError, match="not running"):
            runner.learner_state()
        assert runner.stats().updates == 0
    finally:
        runner.stop(timeout=5)
    runner.stop(timeout=5)
    assert not runner.alive()
