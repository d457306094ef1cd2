"""The prioritized sampler's sum tree after any mix of writes and updates: every internal node is the sum
of its children, the root is the sum of the leaves, the leaves are what one-at-a-time updates would
leave, and a draw never lands on an empty slot or at or above the size asked for."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import NamedTuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from streamdqn.learning.replay.prioritized import PrioritizedSampler

PROPS = settings(max_examples=150, deadline=None)
EPS = 1e-3


class Op(NamedTuple):
    """on_write(positions) when priorities is None, else update_priorities(positions, priorities)."""

    positions: list[int]
    priorities: list[float] | None


class Case(NamedTuple):
    capacity: int
    alpha: float
    ops: list[Op]
    size: int


@st.composite
def cases(draw: st.DrawFn) -> Case:
    capacity = draw(st.integers(1, 70))
    positions = st.lists(st.integers(0, capacity - 1), max_size=2 * capacity)  # duplicates likely
    ops = []
    for _ in range(draw(st.integers(0, 8))):
        chosen = draw(positions)
        if draw(st.booleans()):
            ops.append(Op(chosen, None))
        else:
            td = st.floats(-50, 50, allow_nan=False)
            ops.append(Op(chosen, draw(st.lists(td, min_size=len(chosen), max_size=len(chosen)))))
    return Case(capacity, draw(st.sampled_from([0.0, 0.6, 1.0])), ops, draw(st.integers(1, capacity)))


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def replay_one_at_a_time(case: Case) -> tuple[list[float], float]:
    """The leaves and running max that applying every write and update singly would give."""
    leaves, top = [0.0] * case.capacity, 1.0
    for op in case.ops:
        for i, pos in enumerate(op.positions):
            if op.priorities is None:
                leaves[pos] = top
            else:
                leaves[pos] = (abs(op.priorities[i]) + EPS) ** case.alpha
                top = max(top, leaves[pos])
    return leaves, top


@PROPS
@given(cases())
def test_the_tree_stays_a_sum_tree_of_the_sequential_leaves(case: Case) -> None:
    sampler = PrioritizedSampler(case.capacity, torch.device("cpu"), alpha=case.alpha, epsilon=EPS, seed=0)
    for op in case.ops:
        positions = torch.tensor(op.positions, dtype=torch.int64)
        if op.priorities is None:
            sampler.on_write(positions)
        else:
            sampler.update_priorities(positions, torch.tensor(op.priorities, dtype=torch.float64))

    tree, n = sampler.tree, sampler.leaves
    assert tree.shape == (2 * n,)
    assert tree.dtype == torch.float64
    # Exact: parents are recomputed from their children, never adjusted by differences.
    assert torch.equal(tree[1:n], tree[2::2] + tree[3::2])
    leaves = tree[n:].tolist()
    assert math.isclose(float(tree[1]), math.fsum(leaves), rel_tol=1e-12, abs_tol=1e-300)
    assert leaves[case.capacity :] == [0.0] * (n - case.capacity)
    expected, top = replay_one_at_a_time(case)
    for got, want in zip(leaves, expected, strict=False):
        assert math.isclose(got, want, rel_tol=1e-12)
    assert math.isclose(float(sampler.max_priority), top, rel_tol=1e-12)

    if math.fsum(expected[: case.size]) > 0:
        positions, weights = sampler.indices(case.size, 32)
        assert all(0 <= p < case.size and expected[p] > 0 for p in positions.tolist())
        assert float(weights.max()) == 1.0
        assert float(weights.min()) > 0
