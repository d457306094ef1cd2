"""Checkpoints: numbered files under state/checkpoints/, written atomically, loaded without unpickling.

A checkpoint is one dict of tensors, numbers, strings, lists and dicts, saved with torch.save and
read back with `torch.load(weights_only=True)`, which refuses arbitrary Python objects.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from streamdqn.atomic import atomic_write
from streamdqn.errors import CheckpointError

FORMAT = 2
"""2: one replay row per step, typed stream state. 1: five transitions per step (streamdqn 0.1)."""
_NAME = re.compile(r"^ckpt-(\d{10})\.pt$")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedCheckpoint:
    path: Path
    sequence: int
    state: dict[str, Any]


class CheckpointStore:
    def __init__(self, root: Path, keep: int = 3) -> None:
        if keep < 1:
            raise ValueError("checkpoint retention must keep at least 1")
        self.root = Path(root)
        self.keep = keep
        self.root.mkdir(parents=True, exist_ok=True)
        # Temp files of a writer killed mid-save (atomic_write names them .<name>.<random>.tmp).
        for stale in self.root.glob(".ckpt-*.tmp"):
            stale.unlink(missing_ok=True)

    def _sequences(self) -> list[int]:
        return sorted(int(m.group(1)) for p in self.root.iterdir() if (m := _NAME.match(p.name)))

    def path_of(self, sequence: int) -> Path:
        return self.root / f"ckpt-{sequence:010d}.pt"

    def save(self, state: dict[str, Any]) -> Path:
        """Write a new checkpoint atomically, then drop the oldest beyond `keep`."""
        sequences = self._sequences()
        sequence = (sequences[-1] + 1) if sequences else 1
        path = self.path_of(sequence)
        payload = {**state, "format": FORMAT, "saved_at": time.time(), "sequence": sequence}
        atomic_write(path, lambda f: _save(payload, f), mode=0o600)
        for old in sequences[: max(0, len(sequences) + 1 - self.keep)]:
            self.path_of(old).unlink(missing_ok=True)
        return path

    def load_latest(self) -> LoadedCheckpoint | None:
        """The newest checkpoint that loads; unreadable ones are skipped with a warning. None if none."""
        for sequence in reversed(self._sequences()):
            path = self.path_of(sequence)
            try:
                return LoadedCheckpoint(path, sequence, load_checkpoint(path))
            except OlderFormatError:
                raise
            except CheckpointError as exc:
                log.warning("skipping checkpoint %s: %s", path, exc)
        return None


def _save(payload: dict[str, Any], f: BinaryIO) -> None:
    try:
        torch.save(payload, f)
    except RuntimeError:
        # torch's zip writer reports a short write only as "unexpected pos"; one more write surfaces
        # the OS error behind it (EFBIG past a file-size limit, ENOSPC on a full disk) for the log.
        f.flush()
        os.write(f.fileno(), b"\0")
        raise


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load one checkpoint file safely; CheckpointError says why it cannot be used."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt or not a streamdqn checkpoint: {exc}") from exc
    if isinstance(state, dict) and isinstance(state.get("format"), int) and state["format"] < FORMAT:
        raise OlderFormatError(
            f"checkpoint {path} has format {state['format']} (five replay transitions per step, streamdqn "
            f"0.1); this streamdqn writes format {FORMAT} and cannot resume from it. Move "
            f"{Path(path).parent} away (or set state.dir to a new directory) to start fresh; the Kafka "
            "group's committed offsets then decide where reading resumes"
        )
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} has an unknown format")
    return state


class OlderFormatError(CheckpointError):
    """A checkpoint written by an earlier streamdqn whose format this one cannot read."""
