"""Replay: a preallocated tensor ring of rows (storage), uniform sampling (sampler), and the buffer that
wires them."""

from streamdqn.learning.replay.buffer import ReplayBuffer, RowBatch
from streamdqn.learning.replay.storage import OldReplayFormatError, TensorRing

__all__ = ["OldReplayFormatError", "ReplayBuffer", "RowBatch", "TensorRing"]
