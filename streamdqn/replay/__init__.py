"""Replay: a preallocated tensor ring (storage), uniform sampling (sampler), and the buffer that
wires them."""

from streamdqn.replay.buffer import ReplayBuffer, ReplaySamples
from streamdqn.replay.storage import TensorRing

__all__ = ["ReplayBuffer", "ReplaySamples", "TensorRing"]
