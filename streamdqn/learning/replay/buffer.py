"""ReplayBuffer: wires a TensorRing to a sampler and holds the lock. Safe for one producer and one learner."""

from __future__ import annotations

import threading
from contextlib import AbstractContextManager
from typing import NamedTuple

import numpy as np
import torch

from streamdqn.learning.replay.prioritized import PrioritizedSampler
from streamdqn.learning.replay.sampler import Sampler, UniformSampler
from streamdqn.learning.replay.storage import TensorRing, row_bytes, rows_to_numpy
from streamdqn.stream.rows import ROW_FIELDS, ReplayRows

# The columns an update reads.
LEARNED = ("states", "rewards", "known", "next_states", "horizon")


class RowBatch(NamedTuple):
    """Sampled rows as the learner reads them (see streamdqn.stream.rows for what each field means)."""

    states: torch.Tensor  # float32 [B, 30]
    rewards: torch.Tensor  # float32 [B, 5]
    known: torch.Tensor  # bool [B, 5]
    next_states: torch.Tensor  # float32 [B, 30]
    horizon: torch.Tensor  # int8 [B]: ignore bootstraps gamma**horizon * Q(next); 0 = terminal
    positions: torch.Tensor  # int64 [B]: the rows' ring positions (for priorities)
    weights: torch.Tensor  # float32 [B]: importance weights (all 1 under uniform sampling)


def make_replay(
    capacity: int, device: torch.device | str, *, prioritized: bool = False, alpha: float = 0.6,
    beta: float = 0.4, seed: int | None = None, shared: bool = False,
    lock: AbstractContextManager[object] | None = None,
) -> ReplayBuffer:
    """A replay buffer with uniform or prioritized sampling."""
    device = torch.device(device)
    sampler = None
    if prioritized:
        sampler = PrioritizedSampler(capacity, device, alpha=alpha, beta=beta, seed=seed, shared=shared)
    return ReplayBuffer(capacity, device, seed=seed, shared=shared, lock=lock, sampler=sampler)


class ReplayBuffer:
    """Replay rows on the learner's device, sampled uniformly unless given another sampler.

    The lock makes a push and a sample exclusive, so a sampler never sees a half-written row. On CUDA
    the push copies and the sampling kernels may run on different streams: a CUDA event recorded
    after each push is waited on by the sampler's stream before it gathers.
    """

    def __init__(
        self,
        capacity: int,
        device: torch.device | str = "cpu",
        *,
        seed: int | None = None,
        shared: bool = False,
        lock: AbstractContextManager[object] | None = None,
        sampler: Sampler | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.storage = TensorRing(capacity, self.device, shared=shared)
        self.sampler: Sampler = sampler if sampler is not None else UniformSampler(self.device, seed)
        self._lock = lock if lock is not None else threading.Lock()
        self._cuda = self.device.type == "cuda"
        self._pushed = torch.cuda.Event() if self._cuda else None
        self._sampled = torch.cuda.Event() if self._cuda else None

    def __getstate__(self) -> dict[str, object]:
        # Sent to a learner process: the storage travels as shared-memory handles; CUDA events are
        # per-process and are made anew on the other side.
        state = dict(self.__dict__)
        del state["_pushed"], state["_sampled"]
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._pushed = torch.cuda.Event() if self._cuda else None
        self._sampled = torch.cuda.Event() if self._cuda else None

    @property
    def capacity(self) -> int:
        return self.storage.capacity

    def __len__(self) -> int:
        return self.storage.size

    @property
    def prioritized(self) -> bool:
        """Whether the sampler wants to hear the TD errors of what it sampled."""
        return not isinstance(self.sampler, UniformSampler)

    @property
    def total_pushed(self) -> int:
        return self.storage.total_written

    @property
    def nbytes(self) -> int:
        return self.storage.nbytes

    @staticmethod
    def bytes_needed(capacity: int) -> int:
        return capacity * row_bytes()

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        if self._cuda:
            # Pinned staging lets the copy run asynchronously; the host allocator keeps it alive until done.
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor

    def push(self, rows: ReplayRows) -> None:
        if any(len(column) != rows.size for column in rows):
            raise ValueError("replay push: columns of different lengths")
        if rows.size == 0:
            return
        columns = {name: self._to_device(column) for name, column in zip(ROW_FIELDS, rows, strict=True)}
        with self._lock:
            if self._sampled is not None and self._pushed is not None:
                # Overwriting rows must wait for gathers already queued on the learner's stream.
                torch.cuda.current_stream(self.device).wait_event(self._sampled)
                self.sampler.on_write(self.storage.write(columns))
                self._pushed.record()
            else:
                self.sampler.on_write(self.storage.write(columns))

    def sample(self, batch_size: int) -> RowBatch:
        with self._lock:
            size = self.storage.size
            if size == 0:
                raise ValueError("cannot sample from an empty replay buffer")
            if self._pushed is not None:
                torch.cuda.current_stream(self.device).wait_event(self._pushed)
            index, weights = self.sampler.indices(size, batch_size)
            states, rewards, known, next_states, horizon = self.storage.gather(index, LEARNED)
            batch = RowBatch(states, rewards, known, next_states, horizon, index, weights)
            if self._sampled is not None:
                self._sampled.record()
            return batch

    def update_priorities(self, index: torch.Tensor, td_abs: torch.Tensor) -> None:
        with self._lock:
            self.sampler.update_priorities(index, td_abs)

    def find_episode(self, episode: int) -> np.ndarray:
        """Ring positions of the stored rows of one episode (by its episode_hash)."""
        with self._lock:
            return self.storage.find("episode", episode).cpu().numpy()

    def read(self, index: np.ndarray) -> ReplayRows:
        with self._lock:
            at = torch.as_tensor(index, dtype=torch.int64, device=self.device)
            return rows_to_numpy(dict(zip(ROW_FIELDS, self.storage.gather(at, ROW_FIELDS), strict=True)))

    def write_rewards(self, index: np.ndarray, rewards: np.ndarray, known: np.ndarray) -> None:
        """Replace the rewards of rows in place (a revised verdict relabels an episode)."""
        with self._lock:
            at = torch.as_tensor(index, dtype=torch.int64, device=self.device)
            columns = self.storage.columns
            columns["rewards"].index_copy_(0, at, torch.as_tensor(rewards, device=self.device))
            columns["known"].index_copy_(0, at, torch.as_tensor(known, device=self.device))

    def state_dict(self) -> dict[str, object]:
        """The rows, oldest first. Priorities are not kept: restored rows start at the maximum priority,
        as new rows do, and the first updates that sample them set their priorities again."""
        with self._lock:
            return self.storage.state_dict()

    def load_state_dict(self, state: dict[str, object]) -> None:
        with self._lock:
            self.storage.load_state_dict(state)
            self.sampler.on_write(self.storage.fifo_order())
