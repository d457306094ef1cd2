"""ReplayBuffer: wires a TensorRing to a sampler and holds the lock. Safe for one producer and one learner."""

from __future__ import annotations

import threading
from contextlib import AbstractContextManager
from typing import NamedTuple

import numpy as np
import torch

from streamdqn.learning.replay.sampler import UniformSampler
from streamdqn.learning.replay.storage import TensorRing, transition_bytes


class ReplaySamples(NamedTuple):
    states: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor
    next_states: torch.Tensor
    dones: torch.Tensor


class ReplayBuffer:
    """Uniform replay on the learner's device.

    The lock makes a push and a sample exclusive, so a sampler never sees a half-written row. On CUDA
    the push copies and the sampling kernels may run on different streams: a CUDA event recorded
    after each push is waited on by the sampler's stream before it gathers.
    """

    def __init__(
        self,
        capacity: int,
        obs_dim: int,
        device: torch.device | str = "cpu",
        *,
        seed: int | None = None,
        shared: bool = False,
        lock: AbstractContextManager[object] | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.storage = TensorRing(capacity, obs_dim, self.device, shared=shared)
        self.sampler = UniformSampler(self.device, seed)
        self._lock = lock if lock is not None else threading.Lock()
        self._cuda = self.device.type == "cuda"
        self._pushed = torch.cuda.Event() if self._cuda else None
        self._sampled = torch.cuda.Event() if self._cuda else None

    def __getstate__(self) -> dict[str, object]:
        # Sent to a learner process: the storage travels as shared-memory handles; the sampler's
        # generator and CUDA events are per-process and are made anew on the other side.
        state = dict(self.__dict__)
        del state["sampler"], state["_pushed"], state["_sampled"]
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self.sampler = UniformSampler(self.device)
        self._pushed = torch.cuda.Event() if self._cuda else None
        self._sampled = torch.cuda.Event() if self._cuda else None

    @property
    def capacity(self) -> int:
        return self.storage.capacity

    def __len__(self) -> int:
        return self.storage.size

    @property
    def total_pushed(self) -> int:
        return self.storage.total_written

    @property
    def nbytes(self) -> int:
        return self.storage.nbytes

    @staticmethod
    def bytes_needed(capacity: int, obs_dim: int) -> int:
        return capacity * transition_bytes(obs_dim)

    def _to_device(self, array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        tensor = torch.as_tensor(array, dtype=dtype)
        if self._cuda:
            # Pinned staging lets the copy run asynchronously; the host allocator keeps it alive until done.
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor

    def push(
        self,
        states: np.ndarray,
        actions: np.ndarray,
        rewards: np.ndarray,
        next_states: np.ndarray,
        dones: np.ndarray,
    ) -> None:
        n = len(actions)
        if not (len(states) == len(rewards) == len(next_states) == len(dones) == n):
            raise ValueError("replay push: arrays of different lengths")
        if n == 0:
            return
        rows = (
            self._to_device(states, torch.float32),
            self._to_device(actions, torch.int64),
            self._to_device(rewards, torch.float32),
            self._to_device(next_states, torch.float32),
            self._to_device(dones, torch.bool),
        )
        with self._lock:
            if self._sampled is not None and self._pushed is not None:
                # Overwriting rows must wait for gathers already queued on the learner's stream.
                torch.cuda.current_stream(self.device).wait_event(self._sampled)
                self.storage.write(rows)
                self._pushed.record()
            else:
                self.storage.write(rows)

    def sample(self, batch_size: int) -> ReplaySamples:
        with self._lock:
            size = self.storage.size
            if size == 0:
                raise ValueError("cannot sample from an empty replay buffer")
            if self._pushed is not None:
                torch.cuda.current_stream(self.device).wait_event(self._pushed)
            index = self.sampler.indices(size, batch_size)
            samples = ReplaySamples(*self.storage.gather(index))
            if self._sampled is not None:
                self._sampled.record()
            return samples

    def state_dict(self) -> dict[str, torch.Tensor]:
        with self._lock:
            return self.storage.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        with self._lock:
            self.storage.load_state_dict(state)
