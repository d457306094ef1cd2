"""Training history: state/history.jsonl, one line per daemon checkpoint or `streamdqn train` progress
line (drawn by `streamdqn report`)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

HISTORY_FILE = "history.jsonl"


@dataclass(frozen=True)
class HistoryPoint:
    time: float  # epoch seconds
    events: int
    updates: int
    episode_return: float  # mean return of the episodes finished since the previous point (nan: none)
    loss: float
    samples_per_insert: float  # achieved: sampled rows per inserted row, so far
    snapshot_version: int


def append_history(state_dir: Path, point: HistoryPoint) -> None:
    """Append one line; a torn last line from a crash is skipped by `read_history`."""
    path = Path(state_dir) / HISTORY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                       for k, v in asdict(point).items()})
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_history(state_dir: Path) -> list[HistoryPoint]:
    path = Path(state_dir) / HISTORY_FILE
    points = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            raw = json.loads(line)
            points.append(HistoryPoint(
                float(raw["time"]), int(raw["events"]), int(raw["updates"]), _number(raw["episode_return"]),
                _number(raw["loss"]),
                # Lines written before streamdqn 0.2 have epsilon instead (there is no behaviour policy now).
                _number(raw.get("samples_per_insert")), int(raw["snapshot_version"]),
            ))
        except (ValueError, TypeError, KeyError):
            continue
    return points


def _number(value: object) -> float:
    return math.nan if value is None else float(value)  # type: ignore[arg-type]  # JSON numbers only
