"""Replay: a preallocated tensor ring (storage), uniform sampling (sampler), and the buffer that
wires them."""

from streamdqn.learning.replay.buffer import ReplayBuffer, ReplaySamples
from streamdqn.learning.replay.storage import TensorRing

__all__ = ["ReplayBuffer", "ReplaySamples", "TensorRing"]
