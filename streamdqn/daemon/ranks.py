"""Where this daemon stands among the ranks that learn one policy, and where each rank keeps its state.

Alone (world_size 1, the default) nothing changes. In a group of N ranks (the [distributed] section, or
torchrun's environment) every rank is one daemon in the same consumer group with its own replay shard;
their learners average gradients every update (streamdqn.learning.distributed), so one policy comes out.

State directory of a group (state.dir shared by the ranks: one host, or a shared filesystem):

    state.dir/rank-R/checkpoints   each rank's own checkpoints (its offsets, replay shard, stream state)
    state.dir/rank-R/history.jsonl its own progress history
    state.dir/rank-R/offsets.json  the offsets of its newest checkpoint, for the rank that takes over
                                   one of its partitions (streamdqn.daemon.handover)
    state.dir/snapshots            rank 0 publishes here; every rank serves /snapshots from here
    state.dir/rejected             rank 0's candidates that the gate refused

Every rank serves the snapshots from the one shared directory rather than redirecting to rank 0: a
sandbox that pulls from any rank gets the same bytes and ETags, and pulls keep working while rank 0
restarts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from streamdqn.config import DistributedSettings
from streamdqn.daemon.handover import HANDOVER_FILE
from streamdqn.learning.distributed import GroupSettings
from streamdqn.logs import log_event

_TORCHRUN = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def group_settings(d: DistributedSettings, environ: Mapping[str, str]) -> GroupSettings | None:
    """The group this daemon joins, or None to learn alone.

    torchrun's environment counts when the [distributed] section leaves world_size at 1; a configured
    world_size > 1 uses rank and init_method from the section.
    """
    if d.world_size == 1 and all(k in environ for k in _TORCHRUN):
        settings = GroupSettings.from_environment(environ, timeout_seconds=d.timeout_seconds,
                                                  backend=d.backend)
        if settings.world_size == 1:
            return None
        log_event("distributed settings from the launcher", rank=settings.rank,
                  world_size=settings.world_size,
                  master=settings.endpoint)
        return settings
    if d.world_size == 1:
        return None
    host, port = d.endpoint
    return GroupSettings(rank=d.rank, world_size=d.world_size, master_addr=host, master_port=port,
                         timeout_seconds=d.timeout_seconds, backend=d.backend)


def http_port(configured: int, environ: Mapping[str, str]) -> int:
    """Under torchrun the local ranks of one host share one configuration: each serves HTTP on the
    configured port plus its LOCAL_RANK (0 stays 0: an ephemeral port for everyone)."""
    local = environ.get("LOCAL_RANK", "")
    if configured == 0 or not (local.isascii() and local.isdigit()) or "TORCHELASTIC_RUN_ID" not in environ:
        return configured
    return configured + int(local)


@dataclass(frozen=True)
class Role:
    """This daemon's place: rank and world size; rank 0 publishes, runs the gate and the rollout."""

    rank: int = 0
    world_size: int = 1

    @classmethod
    def of(cls, group: GroupSettings | None) -> Role:
        return cls() if group is None else cls(group.rank, group.world_size)

    @property
    def alone(self) -> bool:
        return self.world_size == 1

    @property
    def publishes(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True)
class StateLayout:
    """The directories a daemon writes (and, for snapshots, serves)."""

    own: Path  # checkpoints/ and history.jsonl
    snapshots: Path
    rejected: Path

    @classmethod
    def of(cls, state_dir: Path, role: Role) -> StateLayout:
        own = state_dir if role.alone else state_dir / f"rank-{role.rank}"
        return cls(own, state_dir / "snapshots", state_dir / "rejected")

    @property
    def checkpoints(self) -> Path:
        return self.own / "checkpoints"

    @property
    def handover(self) -> Path:
        return self.own / HANDOVER_FILE

    def other_handovers(self) -> list[Path]:
        """Every other rank's handover record, also of ranks beyond today's world_size (taking the
        largest offset, an old record can only be overtaken, never wrong)."""
        return sorted(p for p in self.own.parent.glob(f"rank-*/{HANDOVER_FILE}") if p != self.handover)
