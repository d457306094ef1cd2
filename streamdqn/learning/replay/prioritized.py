"""Proportional prioritized experience replay (Schaul et al. 2016, https://arxiv.org/abs/1511.05952).

A slot's chance of being drawn is its priority over the total: P(i) = p_i / sum_k p_k, where
p_i = (|TD error_i| + epsilon) ** alpha, held in a sum tree. The tree is one flat float64 tensor of
2 * capacity_pow2 nodes: node 1 is the root, node n has children 2n and 2n + 1, and ring slot i is
leaf capacity_pow2 + i (node 0 is unused). Every operation runs batched over the tree's levels with
torch ops, on the CPU or on the GPU, without a host sync.
"""

from __future__ import annotations

import torch

# Levels the descent crosses in one step: a block of 2**5 descendants is cumsummed and searched at once.
BLOCK_LEVELS = 5


class PrioritizedSampler:
    """Draws ring positions in proportion to their priority, with importance-sampling weights.

    The replay buffer calls `on_write` after it writes rows (they get the largest priority stored so
    far, so every new row is seen at least once soon), `indices` to draw a batch, and the learner's
    `update_priorities` with the batch's |TD errors|. Not thread-safe by itself: the buffer holds
    the lock around every call.

    With `shared=True` the tree lives in shared memory, so a copy pickled to a spawned process (the
    learner) updates the same tree the ingest process writes to. The random generator and `beta`
    are per process: `beta` may be annealed by whoever calls `indices`.
    """

    def __init__(
        self,
        capacity: int,
        device: torch.device,
        *,
        alpha: float = 0.6,
        beta: float = 0.4,
        epsilon: float = 1e-3,
        seed: int | None = None,
        shared: bool = False,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"prioritized replay capacity must be >= 1, got {capacity}")
        if alpha < 0 or beta < 0 or epsilon <= 0:
            raise ValueError(f"need alpha >= 0, beta >= 0, epsilon > 0; got {alpha}, {beta}, {epsilon}")
        self.capacity = capacity
        self.device = torch.device(device)
        self.alpha = alpha
        self.beta = beta
        self.epsilon = epsilon
        self.leaves = 1 << (capacity - 1).bit_length()  # capacity rounded up to a power of two
        self.depth = self.leaves.bit_length() - 1  # levels below the root
        self.tree = torch.zeros(2 * self.leaves, dtype=torch.float64, device=self.device)
        # The largest stored priority; 1.0 before any update, as in the paper.
        self.max_priority = torch.ones(1, dtype=torch.float64, device=self.device)
        if shared:
            for t in (self.tree, self.max_priority):
                t.share_memory_()
        self._shifts = torch.arange(1, self.depth + 1, device=self.device)
        # The descent goes down several levels a step: fewer, wider ops (each op's fixed cost dominates).
        steps, top = divmod(self.depth, BLOCK_LEVELS)
        self._steps = ([top] if top else []) + [BLOCK_LEVELS] * steps
        self._pair_sum = torch.ones(2, dtype=torch.float64, device=self.device)
        self._segments = torch.empty(0, dtype=torch.float64, device=self.device)
        self.generator = _generator(self.device, seed)

    def __getstate__(self) -> dict[str, object]:
        # The tensors travel as shared-memory handles through torch.multiprocessing; a generator
        # is per process and is made anew on the other side.
        state = dict(self.__dict__)
        del state["generator"]
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self.generator = _generator(self.device, None)

    def indices(self, size: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw batch_size positions among slots [0, size): (positions int64, weights float32).

        Stratified: one draw in each of batch_size equal segments of the total priority. The
        weights are (size * P(i)) ** -beta divided by the batch's largest, so the largest is 1.
        """
        if not 1 <= size <= self.capacity:
            raise ValueError(f"sample size must be in [1, {self.capacity}], got {size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        mass = self._mass_below(size)
        if self._segments.shape[0] != batch_size:
            self._segments = torch.arange(batch_size, dtype=torch.float64, device=self.device)
        draws = torch.rand(batch_size, dtype=torch.float64, device=self.device, generator=self.generator)
        target = (self._segments + draws) * (mass / batch_size)
        node = torch.ones(batch_size, dtype=torch.int64, device=self.device)
        for levels in self._steps:
            node, target = self._descend(node, target, 1 << levels)
        positions = (node - self.leaves).clamp_(max=size - 1)
        weights = self._weights(positions)
        return positions, weights

    def on_write(self, positions: torch.Tensor) -> None:
        """Rows just written at these positions get the largest priority stored so far."""
        if positions.numel() == 0:
            return
        leaf = positions.to(self.device, torch.int64).reshape(-1) + self.leaves
        self.tree.index_copy_(0, leaf, self.max_priority.expand(leaf.shape[0]))
        self._update_parents(leaf)

    def update_priorities(self, positions: torch.Tensor, priorities: torch.Tensor) -> None:
        """Store (|priorities| + epsilon) ** alpha at positions; of duplicates, the last one wins.

        Positions must be ring slots in [0, capacity); they are not checked, which would need a sync.
        """
        if positions.numel() == 0:
            return
        pos = positions.to(self.device, torch.int64).reshape(-1)
        values = (priorities.detach().to(self.device, torch.float64).reshape(-1).abs() + self.epsilon)
        values = values.pow(self.alpha)
        # The running max counts every value, as applying the batch one update at a time would.
        torch.maximum(self.max_priority, values.max(), out=self.max_priority)
        pos, values = _last_of_duplicates(pos, values)
        leaf = pos + self.leaves
        self.tree.index_copy_(0, leaf, values)
        self._update_parents(leaf)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The tree, the largest priority, alpha and beta, on the CPU."""
        return {
            "tree": self.tree.cpu().clone(),
            "max_priority": self.max_priority.cpu().clone(),
            "capacity": torch.tensor(self.capacity, dtype=torch.int64),
            "alpha": torch.tensor(self.alpha, dtype=torch.float64),
            "beta": torch.tensor(self.beta, dtype=torch.float64),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore in place (a shared tree stays shared); capacity and alpha must match."""
        if int(state["capacity"]) != self.capacity:
            raise ValueError(f"state is for capacity {int(state['capacity'])}, this is {self.capacity}")
        # The stored leaves are priorities already raised to alpha: another alpha would misread them.
        if float(state["alpha"]) != self.alpha:
            raise ValueError(f"state was saved with alpha {float(state['alpha'])}, this has {self.alpha}")
        self.tree.copy_(state["tree"])
        self.max_priority.copy_(state["max_priority"])
        self.beta = float(state["beta"])

    def priorities(self) -> torch.Tensor:
        """The stored (p + epsilon) ** alpha of every slot [0, capacity), a view of the tree's leaves."""
        return self.tree[self.leaves : self.leaves + self.capacity]

    def _mass_below(self, size: int) -> torch.Tensor:
        """Sum of the leaves [0, size) as a 0-d tensor: the root, or the left siblings on leaf size's path."""
        if size == self.capacity:  # slots >= capacity are never written
            return self.tree[1]
        node, siblings = self.leaves + size, []
        while node > 1:
            if node & 1:
                siblings.append(node - 1)
            node >>= 1
        return self.tree[torch.tensor(siblings, dtype=torch.int64, device=self.device)].sum()

    def _descend(
        self, node: torch.Tensor, target: torch.Tensor, width: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """From each node, the descendant `width` nodes below it (log2(width) levels) holding target.

        The descendants of node n that many levels down are nodes n * width .. n * width + width - 1,
        row n of the tree viewed as [-, width]. Rounding can leave a target a hair outside a block's
        mass; the clamps keep it from ever choosing an empty node.
        """
        block = self.tree.view(-1, width).index_select(0, node)
        cum = block.cumsum(1)
        found = torch.searchsorted(cum, target.unsqueeze(1), right=True).squeeze(1)
        # cum is non-decreasing: its first maximum is the block's last non-empty node.
        choice = torch.minimum(found, cum.argmax(1))
        before = (cum - block).gather(1, choice.unsqueeze(1)).squeeze(1)
        return torch.add(choice, node, alpha=width), (target - before).clamp_(min=0)

    def _update_parents(self, leaf: torch.Tensor) -> None:
        """Recompute every ancestor of these leaves, a level at a time from the bottom.

        A parent is the sum of its children, recomputed rather than adjusted by a difference, so no
        rounding error accumulates. Duplicate parents in a level write the same sum.
        """
        ancestors = leaf.unsqueeze(0) >> self._shifts.unsqueeze(1)  # [depth, batch], bottom level first
        pairs = self.tree.view(-1, 2)
        for level in ancestors:
            # [n, 2] @ [1, 1]: one rounding of left + right, exactly the sum, and cheaper than .sum(1).
            self.tree.index_copy_(0, level, pairs.index_select(0, level).mv(self._pair_sum))

    def _weights(self, positions: torch.Tensor) -> torch.Tensor:
        # (size * p_i / mass) ** -beta over its batch maximum reduces to (min_j p_j / p_i) ** beta: the
        # size and the total cancel.
        p = self.tree.index_select(0, positions + self.leaves)
        return (p.min() / p).pow(self.beta).to(torch.float32)


def _generator(device: torch.device, seed: int | None) -> torch.Generator:
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def _last_of_duplicates(positions: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Give every occurrence of a position the value of its last occurrence (as sequential updates would).

    Fixed-size and sync-free: a stable sort groups equal positions in their original order, and a
    search of the sorted positions for themselves finds each group's last element.
    """
    sorted_pos, order = torch.sort(positions, stable=True)
    group_end = torch.searchsorted(sorted_pos, sorted_pos, right=True) - 1
    return sorted_pos, values.index_select(0, order.index_select(0, group_end))
