"""Replay ring properties: capacity, FIFO eviction, samples only of live rows, and no torn rows under threads.

Every pushed row encodes a unique id: state = id, next_state = id + 0.5, rewards = id, known = id is even,
horizon = id % 3, episode = id // 4. A row whose fields disagree about its id was torn or mixed up.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from streamdqn.learning.replay.buffer import ReplayBuffer, RowBatch
from streamdqn.learning.replay.storage import OldReplayFormatError
from streamdqn.stream.features import FEATURE_DIM
from streamdqn.stream.rows import ReplayRows

PROPS = settings(max_examples=100, deadline=None)

capacities = st.integers(1, 40)
push_sizes = st.lists(st.integers(0, 60), min_size=1, max_size=12)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rows(ids: np.ndarray) -> ReplayRows:
    out = ReplayRows.empty(len(ids))
    f = ids.astype(np.float32)
    out.states[:] = f[:, None]
    out.next_states[:] = f[:, None] + 0.5
    out.rewards[:] = f[:, None]
    out.known[:] = (ids % 2 == 0)[:, None]
    out.horizon[:] = ids % 3
    out.episode[:] = ids // 4  # four rows per episode
    return out


def push_all(buffer: ReplayBuffer, sizes: list[int], start: int = 0) -> list[int]:
    """Push batches of fresh ids; returns every id pushed, in order."""
    pushed: list[int] = []
    for size in sizes:
        ids = np.arange(start + len(pushed), start + len(pushed) + size)
        buffer.push(rows(ids))
        pushed += ids.tolist()
    return pushed


def ids_of(samples: RowBatch) -> np.ndarray:
    """Each sampled row's id, after checking that all its fields agree on it."""
    ids = samples.states[:, 0]
    assert torch.equal(samples.states, ids[:, None].expand(-1, FEATURE_DIM))
    assert torch.equal(samples.next_states, samples.states + 0.5)
    assert torch.equal(samples.rewards, ids[:, None].expand(-1, 5))
    assert torch.equal(samples.known, (ids.long() % 2 == 0)[:, None].expand(-1, 5))
    assert torch.equal(samples.horizon.long(), ids.long() % 3)
    return ids.long().numpy()


@PROPS
@given(capacities, push_sizes)
def test_never_above_capacity(capacity: int, sizes: list[int]) -> None:
    buffer = ReplayBuffer(capacity, "cpu", seed=0)
    total = 0
    for size in sizes:
        push_all(buffer, [size], start=total)
        total += size
        assert len(buffer) == min(total, capacity) <= buffer.capacity
        assert buffer.total_pushed == total


@PROPS
@given(capacities, push_sizes)
def test_fifo_eviction_keeps_the_last_capacity_rows_in_order(capacity: int, sizes: list[int]) -> None:
    buffer = ReplayBuffer(capacity, "cpu", seed=0)
    pushed = push_all(buffer, sizes)
    state = buffer.state_dict()
    kept = pushed[-capacity:] if pushed else []
    assert state["states"][:, 0].long().tolist() == kept  # type: ignore[index]
    assert state["episode"].tolist() == [i // 4 for i in kept]  # type: ignore[attr-defined]
    assert state["total_written"] == len(pushed)
    # And a buffer loaded from it holds the same rows and keeps evicting in the same order.
    restored = ReplayBuffer(capacity, "cpu", seed=0)
    restored.load_state_dict(state)
    more = push_all(restored, [capacity // 2 + 1], start=len(pushed))
    push_all(buffer, [capacity // 2 + 1], start=len(pushed))
    assert restored.state_dict()["states"][:, 0].long().tolist() == (kept + more)[-capacity:]  # type: ignore[index]
    for name in ReplayRows._fields:
        # action_prob is NaN where nothing was logged: equal_nan.
        torch.testing.assert_close(restored.state_dict()[name], buffer.state_dict()[name], rtol=0, atol=0,
                                   equal_nan=True)


@PROPS
@given(capacities, push_sizes, st.integers(1, 64), st.integers(0, 2**32 - 1))
def test_every_sampled_row_was_pushed_and_not_evicted(
    capacity: int, sizes: list[int], batch: int, seed: int
) -> None:
    buffer = ReplayBuffer(capacity, "cpu", seed=seed)
    pushed = push_all(buffer, [*sizes, 1])
    live = set(pushed[-capacity:])
    samples = buffer.sample(batch)
    assert set(ids_of(samples).tolist()) <= live


@PROPS
@given(capacities, st.integers(0, 50), st.integers(0, 40))
def test_sample_shapes_dtypes_and_device(capacity: int, pushed: int, batch: int) -> None:
    buffer = ReplayBuffer(capacity, torch.device("cpu"), seed=1)
    if pushed == 0:
        with pytest.raises(ValueError, match="empty"):
            buffer.sample(batch)
        return
    push_all(buffer, [pushed])
    s = buffer.sample(batch)
    assert s.states.shape == s.next_states.shape == (batch, FEATURE_DIM)
    assert s.rewards.shape == s.known.shape == (batch, 5)
    assert s.horizon.shape == s.positions.shape == s.weights.shape == (batch,)
    assert [t.dtype for t in s] == [torch.float32, torch.float32, torch.bool, torch.float32, torch.int8,
                                    torch.int64, torch.float32]
    assert torch.equal(s.weights, torch.ones(batch))  # uniform sampling
    assert all(t.device == torch.device("cpu") for t in s)
    assert buffer.nbytes == ReplayBuffer.bytes_needed(capacity)


@PROPS
@given(st.integers(4, 40), push_sizes, st.integers(0, 30))
def test_an_episodes_rows_are_found_read_and_relabelled_in_place(
    capacity: int, sizes: list[int], episode: int
) -> None:
    buffer = ReplayBuffer(capacity, "cpu", seed=3)
    pushed = push_all(buffer, sizes)
    live = [i for i in pushed[-capacity:] if i // 4 == episode]
    index = buffer.find_episode(episode)
    found = buffer.read(index)
    assert sorted(found.states[:, 0].astype(int).tolist()) == live
    assert (found.episode == episode).all()
    new = np.full((len(index), 5), -7.0, np.float32)
    buffer.write_rewards(index, new, np.ones((len(index), 5), bool))
    state = buffer.state_dict()
    ids = state["states"][:, 0].long()  # type: ignore[index]
    rewards = state["rewards"]
    assert torch.equal(rewards[ids // 4 == episode], torch.full((len(live), 5), -7.0))  # type: ignore[index]
    others = ids // 4 != episode
    assert torch.equal(rewards[others], ids[others].float()[:, None].expand(-1, 5))  # type: ignore[index]


def test_bad_pushes_and_old_states_are_refused() -> None:
    buffer = ReplayBuffer(4, "cpu")
    short = rows(np.arange(3))._replace(horizon=np.zeros(2, np.int8))
    with pytest.raises(ValueError, match="different lengths"):
        buffer.push(short)
    with pytest.raises(ValueError, match="capacity"):
        ReplayBuffer(0, "cpu")
    old = {"states": torch.zeros(1, 30), "actions": torch.zeros(1, dtype=torch.int64), "total_written": 1}
    with pytest.raises(OldReplayFormatError, match="older streamdqn"):
        buffer.load_state_dict(old)  # type: ignore[arg-type]


@PROPS
@given(st.integers(1, 32), st.lists(st.integers(1, 48), min_size=5, max_size=25), st.integers(1, 64))
def test_a_sampler_thread_never_sees_a_torn_row(capacity: int, sizes: list[int], batch: int) -> None:
    buffer = ReplayBuffer(capacity, "cpu", seed=2)
    push_all(buffer, [1])
    done = threading.Event()
    seen: list[np.ndarray] = []
    errors: list[Exception] = []

    def sampler() -> None:
        try:
            while not done.is_set():
                seen.append(ids_of(buffer.sample(batch)))
        except (AssertionError, RuntimeError, ValueError) as exc:  # reported on the main thread
            errors.append(exc)

    thread = threading.Thread(target=sampler)
    thread.start()
    try:
        pushed = push_all(buffer, sizes, start=1)
    finally:
        done.set()
        thread.join(timeout=30)
    assert not thread.is_alive()
    assert errors == []
    valid = set(range(1 + len(pushed)))
    assert all(set(ids.tolist()) <= valid for ids in seen)
