"""A preallocated ring of transitions in tensors on one device (optionally in shared memory)."""

from __future__ import annotations

import torch


# Bytes a transition takes: state and next state float32, action int64, reward float32, done bool.
def transition_bytes(obs_dim: int) -> int:
    return 2 * obs_dim * 4 + 8 + 4 + 1


class TensorRing:
    """Fixed-capacity FIFO storage: rows are written at `cursor` and wrap around, evicting the oldest.

    `size` and `cursor` live in a small int64 tensor so that a copy in shared memory is seen by
    another process as well. Not thread-safe by itself: ReplayBuffer holds the lock.
    """

    def __init__(self, capacity: int, obs_dim: int, device: torch.device, *, shared: bool = False) -> None:
        if capacity < 1:
            raise ValueError(f"replay capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.obs_dim = obs_dim
        self.device = device
        # Allocated empty, moved to shared memory, then zeroed: zeros-then-share would hold both
        # copies at once (a peak of twice the buffer).
        self.states = torch.empty((capacity, obs_dim), dtype=torch.float32, device=device)
        self.next_states = torch.empty((capacity, obs_dim), dtype=torch.float32, device=device)
        self.actions = torch.empty(capacity, dtype=torch.int64, device=device)
        self.rewards = torch.empty(capacity, dtype=torch.float32, device=device)
        self.dones = torch.empty(capacity, dtype=torch.bool, device=device)
        # [size, cursor, total rows ever written]
        self.counters = torch.zeros(3, dtype=torch.int64)
        if shared:
            for t in self.tensors():
                t.share_memory_()
            self.counters.share_memory_()
        for t in self.tensors():
            t.zero_()
        self._c = self.counters.numpy()  # a view: element access is ~20x cheaper than on the tensor

    def __getstate__(self) -> dict[str, object]:
        state = dict(self.__dict__)
        del state["_c"]  # a numpy view would be pickled as a private copy
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._c = self.counters.numpy()

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.states, self.actions, self.rewards, self.next_states, self.dones)

    @property
    def size(self) -> int:
        return int(self._c[0])

    @property
    def cursor(self) -> int:
        return int(self._c[1])

    @property
    def total_written(self) -> int:
        return int(self._c[2])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def write(self, rows: tuple[torch.Tensor, ...]) -> None:
        """Write rows (already on this device); if more than capacity, only the newest are kept."""
        n = rows[0].shape[0]
        if n == 0:
            return
        if n > self.capacity:
            rows = tuple(r[n - self.capacity :] for r in rows)
            self._c[2] += n - self.capacity
            n = self.capacity
        cursor = self.cursor
        first = min(n, self.capacity - cursor)
        for dst, src in zip(self.tensors(), rows, strict=True):
            dst[cursor : cursor + first].copy_(src[:first], non_blocking=True)
            if first < n:
                dst[: n - first].copy_(src[first:], non_blocking=True)
        c = self._c
        c[0] = min(int(c[0]) + n, self.capacity)
        c[1] = (cursor + n) % self.capacity
        c[2] += n

    def gather(self, index: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(t.index_select(0, index) for t in self.tensors())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The stored rows in FIFO order (oldest first), on the CPU."""
        size, cursor = self.size, self.cursor
        start = (cursor - size) % self.capacity
        order = (torch.arange(size, device=self.device) + start) % self.capacity
        names = ("states", "actions", "rewards", "next_states", "dones")
        out = {name: t.index_select(0, order).cpu() for name, t in zip(names, self.tensors(), strict=True)}
        out["total_written"] = self.counters[2].clone()
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.counters.zero_()
        rows = tuple(state[name].to(self.device)
                     for name in ("states", "actions", "rewards", "next_states", "dones"))
        self.write(rows)
        self.counters[2] = int(state["total_written"])
