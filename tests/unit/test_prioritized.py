"""PrioritizedSampler: draws in proportion to priority, weights, duplicates, restore, and a shared tree
across a real spawned process."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from streamdqn.learning.replay.prioritized import PrioritizedSampler

CPU = torch.device("cpu")
ALPHA, EPS = 0.6, 1e-3
# Chi-square critical values at p = 1e-4 (scipy.stats.chi2.isf(1e-4, df)): with a fixed seed the test is
# deterministic, and a sampler off by a few percent on any slot lands far above them at 200k draws.
CHI2_CRITICAL = {4: 23.51, 7: 29.88, 9: 33.72, 12: 39.13}
TD_ERRORS = [0.0, 0.5, 1.0, 2.0, 4.0, 0.1, 3.0, 0.2, 1.5, 0.7, 6.0, 0.05, 2.5, 0.3, 0.9, 5.0]


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def stored(td_error: float) -> float:
    return float((abs(td_error) + EPS) ** ALPHA)


def filled(capacity: int, td_errors: list[float], **kwargs: Any) -> PrioritizedSampler:
    sampler = PrioritizedSampler(capacity, CPU, alpha=ALPHA, epsilon=EPS, **kwargs)
    sampler.on_write(torch.arange(capacity))
    sampler.update_priorities(torch.arange(len(td_errors)), torch.tensor(td_errors))
    return sampler


def counts(sampler: PrioritizedSampler, size: int, calls: int = 2000, batch: int = 100) -> torch.Tensor:
    drawn = torch.cat([sampler.indices(size, batch)[0] for _ in range(calls)])
    return torch.bincount(drawn, minlength=sampler.capacity)


def chi_square(observed: torch.Tensor, expected_share: list[float]) -> float:
    total = float(observed.sum())
    pairs = zip(observed.tolist(), expected_share, strict=True)
    return float(sum((o - total * p) ** 2 / (total * p) for o, p in pairs))


def test_draws_are_proportional_to_priority_to_the_alpha() -> None:
    td = TD_ERRORS[:10]
    sampler = filled(10, td, seed=0)
    observed = counts(sampler, 10)
    weights = [stored(d) for d in td]
    share = [w / sum(weights) for w in weights]
    assert int(observed.sum()) == 200_000
    assert chi_square(observed, share) < CHI2_CRITICAL[9]
    # The bound has power: the same draws are far from the shares without alpha (alpha = 1).
    linear = [abs(d) + EPS for d in td]
    assert chi_square(observed, [w / sum(linear) for w in linear]) > 100 * CHI2_CRITICAL[9]


@pytest.mark.parametrize("size", [1, 5, 8, 13])
def test_a_size_below_capacity_never_draws_a_slot_at_or_above_it(size: int) -> None:
    # Every slot of the 16 holds mass, so only the sampler's prefix can keep draws below size.
    sampler = filled(16, TD_ERRORS, seed=1)
    observed = counts(sampler, size, calls=1000 if size > 1 else 10)
    assert int(observed[size:].sum()) == 0
    if size > 1:
        weights = [stored(d) for d in TD_ERRORS[:size]]
        share = [w / sum(weights) for w in weights]
        assert chi_square(observed[:size], share) < CHI2_CRITICAL[size - 1]


def test_importance_weights_match_the_paper_by_hand() -> None:
    td = [0.2, 1.0, 3.0, 0.05, 0.7]
    beta = 0.5
    sampler = filled(5, td, seed=2, beta=beta)
    positions, weights = sampler.indices(5, 64)
    assert positions.dtype == torch.int64
    assert positions.shape == (64,)
    assert weights.dtype == torch.float32
    assert weights.shape == (64,)
    total = sum(stored(d) for d in td)
    raw = [(5 * stored(td[i]) / total) ** -beta for i in positions.tolist()]
    expected = torch.tensor([w / max(raw) for w in raw], dtype=torch.float32)
    assert len(set(positions.tolist())) == 5  # stratified: 64 draws over 5 slots reach each of them
    torch.testing.assert_close(weights, expected, rtol=1e-6, atol=0)
    assert float(weights.max()) == 1.0


def test_beta_is_read_at_each_draw() -> None:
    sampler = filled(5, [0.2, 1.0, 3.0, 0.05, 0.7], seed=3)
    sampler.beta = 0.0
    assert torch.equal(sampler.indices(5, 32)[1], torch.ones(32))
    sampler.beta = 1.0
    assert float(sampler.indices(5, 32)[1].min()) < 0.2


def test_update_with_duplicate_positions_keeps_the_last_and_the_tree_consistent() -> None:
    sampler = filled(8, [])
    sampler.update_priorities(torch.tensor([2, 5, 2, 2, 5, 7]), torch.tensor([1.0, 9.0, 3.0, 4.0, 0.5, -2.0]))
    leaves = sampler.priorities()
    assert math.isclose(float(leaves[2]), stored(4.0), rel_tol=1e-12)
    assert math.isclose(float(leaves[5]), stored(0.5), rel_tol=1e-12)
    assert math.isclose(float(leaves[7]), stored(-2.0), rel_tol=1e-12)  # |TD error|
    untouched = [i for i in range(8) if i not in (2, 5, 7)]
    assert torch.equal(leaves[untouched], torch.ones(len(untouched), dtype=torch.float64))
    assert math.isclose(float(sampler.tree[1]), math.fsum(leaves.tolist()), rel_tol=1e-12)
    # The superseded 9.0 still counts for the running max, as one-at-a-time updates would have it.
    assert math.isclose(float(sampler.max_priority), stored(9.0), rel_tol=1e-12)


def test_on_write_gives_the_largest_priority_so_far() -> None:
    sampler = PrioritizedSampler(6, CPU, alpha=ALPHA, epsilon=EPS)
    sampler.on_write(torch.tensor([0, 1]))
    assert sampler.priorities()[:2].tolist() == [1.0, 1.0]  # before any update: 1, as in the paper
    sampler.update_priorities(torch.tensor([0, 1]), torch.tensor([7.0, 0.1]))
    sampler.update_priorities(torch.tensor([0]), torch.tensor([0.0]))  # the max does not fall back
    sampler.on_write(torch.tensor([2, 3, 3]))
    leaves = sampler.priorities()
    assert leaves[2] == leaves[3] == sampler.max_priority[0]
    assert math.isclose(float(leaves[2]), stored(7.0), rel_tol=1e-12)
    assert leaves[4:].tolist() == [0.0, 0.0]


def test_state_dict_round_trip_is_exact_and_restores_in_place() -> None:
    source = filled(100, [0.1 * i for i in range(60)], seed=4)
    source.update_priorities(torch.tensor([99, 3]), torch.tensor([12.5, 0.0]))
    source.beta = 0.73
    target = PrioritizedSampler(100, CPU, alpha=ALPHA, epsilon=EPS, seed=4, shared=True)
    target.load_state_dict(source.state_dict())
    assert torch.equal(target.tree, source.tree)
    assert torch.equal(target.max_priority, source.max_priority)
    assert target.beta == 0.73
    # Copied into the shared tree, not replaced by a private one.
    assert target.tree.is_shared()  # type: ignore[no-untyped-call]
    for a, b in zip(source.indices(100, 64), target.indices(100, 64), strict=True):
        assert torch.equal(a, b)


def test_load_state_dict_refuses_another_capacity_or_alpha() -> None:
    state = filled(100, [1.0]).state_dict()
    with pytest.raises(ValueError, match="capacity"):
        PrioritizedSampler(99, CPU, alpha=ALPHA).load_state_dict(state)
    with pytest.raises(ValueError, match="alpha"):
        PrioritizedSampler(100, CPU, alpha=0.7).load_state_dict(state)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="capacity"):
        PrioritizedSampler(0, CPU)
    with pytest.raises(ValueError, match="epsilon"):
        PrioritizedSampler(4, CPU, epsilon=0.0)
    sampler = filled(4, [])
    for size, batch in ((0, 8), (5, 8), (4, 0)):
        with pytest.raises(ValueError, match="must be"):
            sampler.indices(size, batch)


def _learner_side(sampler: PrioritizedSampler, child_wrote: Any, parent_wrote: Any, answers: Any) -> None:
    """Runs in a spawned process: what the learner does with the sampler it was sent."""
    positions, _ = sampler.indices(sampler.capacity, 32)
    sampler.update_priorities(torch.tensor([3]), torch.tensor([9.0]))
    child_wrote.set()
    parent_wrote.wait(60)
    answers.put((positions.tolist(), float(sampler.priorities()[5])))


def test_a_pickled_shared_sampler_in_a_spawned_process_sees_the_same_tree() -> None:
    sampler = filled(8, [], seed=5, shared=True)
    ctx = mp.get_context("spawn")
    # The events stand in for the buffer's lock: the two sides never update the tree at once.
    child_wrote, parent_wrote, answers = ctx.Event(), ctx.Event(), ctx.Queue()
    child = ctx.Process(target=_learner_side, args=(sampler, child_wrote, parent_wrote, answers))
    child.start()
    try:
        assert child_wrote.wait(120)
        assert math.isclose(float(sampler.priorities()[3]), stored(9.0), rel_tol=1e-12)
        sampler.update_priorities(torch.tensor([5]), torch.tensor([0.25]))
        parent_wrote.set()
        positions, child_sees = answers.get(timeout=60)
    finally:
        child.join(60)
    assert child.exitcode == 0
    assert all(0 <= p < 8 for p in positions)
    assert math.isclose(float(sampler.tree[1]), 6.0 + stored(9.0) + stored(0.25), rel_tol=1e-12)
    assert math.isclose(child_sees, stored(0.25), rel_tol=1e-12)
