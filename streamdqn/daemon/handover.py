"""Handover between ranks: the offsets of each rank's newest durable checkpoint, in a small file next to
its checkpoints, so that a partition that moves to another rank resumes where its previous owner's
checkpoint ends.

The group's committed offsets are not enough. A rank commits after each checkpoint, and the commit can
fail (a rebalance under way refuses it: CommitFailedError) or never happen (SIGKILL between the two)
while the checkpoint, and with it the rank's counts and replay shard, already holds the events. The
next owner would read them again from the older committed offset and count them twice (seen: 57 events
in a run of the two-rank fault test). So a rank that is assigned a partition starts at the largest of
its own checkpoint's offset, the group's committed offset and every other rank's handover record.
Offsets only grow, so the largest is always the exact end of what some rank has counted.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

from streamdqn.atomic import atomic_write_bytes
from streamdqn.logs import log_event
from streamdqn.stream.sources import Partition

HANDOVER_FILE = "offsets.json"


def write_handover(path: Path, offsets: Mapping[Partition, int]) -> None:
    rows = [[topic, partition, offset] for (topic, partition), offset in sorted(offsets.items())]
    atomic_write_bytes(path, json.dumps({"offsets": rows}).encode())


def read_handover(path: Path) -> dict[Partition, int]:
    """One rank's record; ValueError when it is not one (OSError when it cannot be read)."""
    record = json.loads(path.read_bytes())
    rows = record.get("offsets") if isinstance(record, dict) else None
    if not isinstance(rows, list):
        raise ValueError("no list under 'offsets'")
    offsets: dict[Partition, int] = {}
    for row in rows:
        if not (isinstance(row, list) and len(row) == 3 and isinstance(row[0], str)
                and all(type(v) is int and v >= 0 for v in row[1:])):
            raise ValueError(f"not a [topic, partition, offset] row: {row!r:.80}")
        offsets[(row[0], row[1])] = row[2]
    return offsets


def read_handovers(paths: Iterable[Path]) -> dict[Partition, int]:
    """The largest offset per partition over the records at `paths`; a missing one is a rank that has
    not checkpointed yet, an unreadable one is logged and left out (its partitions then resume at the
    committed offset, as without handover records)."""
    merged: dict[Partition, int] = {}
    for path in paths:
        try:
            offsets = read_handover(path)
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as exc:
            log_event("handover record unreadable", path=str(path), error=repr(exc)[:300],
                      note="its partitions resume at the group's committed offsets; events may count twice")
            continue
        for key, offset in offsets.items():
            merged[key] = max(offset, merged.get(key, offset))
    return merged
