"""What a daemon checkpoint holds, typed: the stream stage's state and the offsets of both topics it
corresponds to, the learner's state, and (optionally) the replay buffer's contents.

On disk it is one torch.save dict (loaded with weights_only=True): the stream state is msgspec-encoded
bytes validated against its schema on load, offsets a list of [topic, partition, offset].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from streamdqn.errors import CheckpointError
from streamdqn.stream.pipeline import PipelineState, decode_state, encode_state
from streamdqn.stream.sources import Partition


@dataclass(frozen=True)
class DaemonState:
    stream: PipelineState
    offsets: dict[Partition, int]  # (topic, partition) -> the next offset to read
    learner: dict[str, Any]
    replay: dict[str, Any] | None

    def to_checkpoint(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "stream": encode_state(self.stream),
            "offsets": [[t, p, o] for (t, p), o in sorted(self.offsets.items())],
            "learner": self.learner,
        }
        if self.replay is not None:
            out["replay"] = self.replay
        return out

    @staticmethod
    def from_checkpoint(state: dict[str, Any], where: str) -> DaemonState:
        try:
            stream = decode_state(state["stream"])
            offsets = {(str(t), int(p)): int(o) for t, p, o in state["offsets"]}
            return DaemonState(stream, offsets, state["learner"], state.get("replay"))
        except (KeyError, TypeError, ValueError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise CheckpointError(f"checkpoint {where} does not hold a daemon's state: {exc}") from exc


def offsets_for_log(offsets: dict[Partition, int]) -> dict[str, int]:
    return {f"{t}:{p}": o for (t, p), o in sorted(offsets.items())}
