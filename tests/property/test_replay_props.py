"""Replay ring properties: capacity, FIFO eviction, samples only of live rows, and no torn rows under threads.

Every pushed row encodes a unique id: state = id, next_state = id + 0.5, action = id % 5, reward = id,
done = id is even. A row whose fields disagree about its id was torn or mixed up.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from streamdqn.learning.replay.buffer import ReplayBuffer, ReplaySamples

OBS_DIM = 3
PROPS = settings(max_examples=100, deadline=None)

capacities = st.integers(1, 40)
push_sizes = st.lists(st.integers(0, 60), min_size=1, max_size=12)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rows(ids: np.ndarray) -> tuple[np.ndarray, ...]:
    ids = ids.astype(np.float32)
    return (
        np.repeat(ids[:, None], OBS_DIM, axis=1),
        ids.astype(np.int64) % 5,
        ids,
        np.repeat(ids[:, None] + 0.5, OBS_DIM, axis=1),
        ids.astype(np.int64) % 2 == 0,
    )


def push_all(buffer: ReplayBuffer, sizes: list[int], start: int = 0) -> list[int]:
    """Push batches of fresh ids; returns every id pushed, in order."""
    pushed: list[int] = []
    for size in sizes:
        ids = np.arange(start + len(pushed), start + len(pushed) + size)
        buffer.push(*rows(ids))
        pushed += ids.tolist()
    return pushed


def ids_of(samples: ReplaySamples) -> np.ndarray:
    """Each sampled row's id, after checking that all its fields agree on it."""
    ids = samples.states[:, 0]
    assert torch.equal(samples.states, ids[:, None].expand(-1, OBS_DIM))
    assert torch.equal(samples.next_states, samples.states + 0.5)
    assert torch.equal(samples.actions, ids.long() % 5)
    assert torch.equal(samples.rewards, ids)
    assert torch.equal(samples.dones, ids.long() % 2 == 0)
    return ids.long().numpy()


@PROPS
@given(capacities, push_sizes)
def test_never_above_capacity(capacity: int, sizes: list[int]) -> None:
    buffer = ReplayBuffer(capacity, OBS_DIM, "cpu", seed=0)
    total = 0
    for size in sizes:
        push_all(buffer, [size], start=total)
        total += size
        assert len(buffer) == min(total, capacity) <= buffer.capacity
        assert buffer.total_pushed == total


@PROPS
@given(capacities, push_sizes)
def test_fifo_eviction_keeps_the_last_capacity_rows_in_order(capacity: int, sizes: list[int]) -> None:
    buffer = ReplayBuffer(capacity, OBS_DIM, "cpu", seed=0)
    pushed = push_all(buffer, sizes)
    state = buffer.state_dict()
    kept = pushed[-capacity:] if pushed else []
    assert state["states"][:, 0].long().tolist() == kept
    assert state["rewards"].long().tolist() == kept
    assert int(state["total_written"]) == len(pushed)
    # And a buffer loaded from it holds the same rows and keeps evicting in the same order.
    restored = ReplayBuffer(capacity, OBS_DIM, "cpu", seed=0)
    restored.load_state_dict(state)
    more = push_all(restored, [capacity // 2 + 1], start=len(pushed))
    push_all(buffer, [capacity // 2 + 1], start=len(pushed))
    assert restored.state_dict()["states"][:, 0].long().tolist() == (kept + more)[-capacity:]
    for name in ("states", "actions", "rewards", "next_states", "dones"):
        assert torch.equal(restored.state_dict()[name], buffer.state_dict()[name])


@PROPS
@given(capacities, push_sizes, st.integers(1, 64), st.integers(0, 2**32 - 1))
def test_every_sampled_row_was_pushed_and_not_evicted(
    capacity: int, sizes: list[int], batch: int, seed: int
) -> None:
    buffer = ReplayBuffer(capacity, OBS_DIM, "cpu", seed=seed)
    pushed = push_all(buffer, [*sizes, 1])
    live = set(pushed[-capacity:])
    samples = buffer.sample(batch)
    assert set(ids_of(samples).tolist()) <= live


@PROPS
@given(capacities, st.integers(0, 50), st.integers(0, 40))
def test_sample_shapes_dtypes_and_device(capacity: int, pushed: int, batch: int) -> None:
    buffer = ReplayBuffer(capacity, OBS_DIM, torch.device("cpu"), seed=1)
    if pushed == 0:
        with pytest.raises(ValueError, match="empty"):
            buffer.sample(batch)
        return
    push_all(buffer, [pushed])
    s = buffer.sample(batch)
    assert s.states.shape == s.next_states.shape == (batch, OBS_DIM)
    assert s.actions.shape == s.rewards.shape == s.dones.shape == (batch,)
    assert (s.states.dtype, s.actions.dtype, s.rewards.dtype, s.next_states.dtype, s.dones.dtype) == (
        torch.float32,
        torch.int64,
        torch.float32,
        torch.float32,
        torch.bool,
    )
    assert all(t.device == torch.device("cpu") for t in s)
    assert buffer.nbytes == ReplayBuffer.bytes_needed(capacity, OBS_DIM)


def test_mismatched_lengths_are_refused() -> None:
    buffer = ReplayBuffer(4, OBS_DIM, "cpu")
    states, actions, rewards, next_states, dones = rows(np.arange(3))
    with pytest.raises(ValueError, match="different lengths"):
        buffer.push(states, actions[:2], rewards, next_states, dones)
    with pytest.raises(ValueError):
        ReplayBuffer(0, OBS_DIM, "cpu")


@PROPS
@given(st.integers(1, 32), st.lists(st.integers(1, 48), min_size=5, max_size=25), st.integers(1, 64))
def test_a_sampler_thread_never_sees_a_torn_row(capacity: int, sizes: list[int], batch: int) -> None:
    buffer = ReplayBuffer(capacity, OBS_DIM, "cpu", seed=2)
    push_all(buffer, [1])
    done = threading.Event()
    seen: list[np.ndarray] = []
    errors: list[BaseException] = []

    def sampler() -> None:
        try:
            while not done.is_set():
                seen.append(ids_of(buffer.sample(batch)))
        except BaseException as exc:  # reported on the main thread
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
