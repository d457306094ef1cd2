"""Channels, pins and their history: which version each sandbox is served (no torch, no onnx).

    stable    what every sandbox gets by default (`latest` is kept equal to it)
    canary    a candidate that a share of sandboxes gets (canary_share) while it is out
    pins      sandbox id -> version, for a sandbox that must stay on one version
    stable pin  stable held at one version: promotion and publishing leave it alone, rollback is
              refused, until it is unpinned (pinning another version moves it)
    history   channels.log: one JSON line per change; rollback walks it back

ChannelBook does the changes and expects its caller (SnapshotStore) to hold the store's lock; the
reading functions here need no lock, because every file they read is replaced atomically or only
ever appended to.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from streamdqn.atomic import atomic_write_bytes, fsync_dir
from streamdqn.errors import SnapshotConflictError, SnapshotError
from streamdqn.snapshots.layout import (
    CANARY,
    HISTORY_FILE,
    LATEST,
    LOCK_FILE,
    PINS_FILE,
    STABLE,
    STABLE_PIN_FILE,
    Channel,
    channel_version,
    is_version_number,
    read_link_version,
    read_pins,
    read_stable_pin,
)

POINTER_TEMP_PREFIX = ".ptr-"
HISTORY_COMPACT_BYTES = 256 * 1024
"""channels.log is compacted past this size (a daemon publishing every 15 s writes ~1 MiB a day):
the old log moves to channels.log.1 and the new one starts with the stable lineage."""
LINEAGE_KEPT = 100
_CANARY_SALT = b"streamdqn-canary\0"


def canary_bucket(sandbox_id: str) -> float:
    """Where a sandbox falls in [0, 1): the first 8 bytes of sha256(salt + id) over 2**64.

    The same id lands in the same place on every server, restart and canary, so a sandbox in a
    20 % share stays in every 20 % share (and in every larger one).
    """
    digest = hashlib.sha256(_CANARY_SALT + sandbox_id.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def in_canary_share(sandbox_id: str, fraction: float) -> bool:
    return canary_bucket(sandbox_id) < fraction


@dataclass(frozen=True)
class HistoryEntry:
    """One line of channels.log."""

    time: float
    action: str  # publish, promote, demote, rollback, pin, unpin, adopt, compact
    channel: str | None  # stable, canary, or None for a sandbox's pin
    version: int | None
    from_version: int | None
    actor: str = ""
    reason: str = ""
    sandbox_id: str | None = None

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), ensure_ascii=False, allow_nan=False).encode() + b"\n"


def _entry_of(line: bytes) -> HistoryEntry | None:
    try:
        raw = json.loads(line)
        entry = HistoryEntry(**raw)
    except (ValueError, TypeError):
        return None
    if entry.version is not None and not is_version_number(entry.version):
        return None
    return entry


def read_history(root: Path) -> list[HistoryEntry]:
    """Every intact line of channels.log, oldest first; a line torn by a crash is skipped."""
    try:
        data = (Path(root) / HISTORY_FILE).read_bytes()
    except FileNotFoundError:
        return []
    entries = (_entry_of(line) for line in data.splitlines() if line.strip())
    return [e for e in entries if e is not None]


def stable_lineage(history: list[HistoryEntry]) -> list[int]:
    """The stable versions that rollback can return to, oldest first, ending with the current one.

    A rollback to a version in the lineage cuts everything after it (rolling back twice goes back
    twice); a rollback elsewhere replaces the version rolled back from.
    """
    lineage: list[int] = []
    for e in history:
        if e.channel != STABLE or e.version is None:
            continue
        if e.action == "rollback" and e.version in lineage:
            del lineage[len(lineage) - lineage[::-1].index(e.version):]
            continue
        if e.action == "rollback" and lineage and lineage[-1] == e.from_version:
            lineage.pop()
        if not lineage or lineage[-1] != e.version:
            lineage.append(e.version)
    return lineage


def previous_stable(history: list[HistoryEntry], current: int | None) -> int | None:
    """The version `rollback` would go to: the last stable in the lineage before `current`."""
    earlier = [v for v in stable_lineage(history) if v != current]
    return earlier[-1] if earlier else None


@dataclass(frozen=True)
class ChannelRecord:
    """What each channel serves, who is pinned, and where a rollback would go."""

    stable: int | None
    canary: int | None
    previous_stable: int | None
    pins: dict[str, int]
    stable_pin: int | None = None  # the version stable is pinned to, while it is

    def as_dict(self) -> dict[str, Any]:
        return {"stable": self.stable, "canary": self.canary, "latest": self.stable,
                "previous_stable": self.previous_stable, "pins": dict(sorted(self.pins.items())),
                "stable_pin": self.stable_pin}

    def protected(self) -> set[int]:
        """Versions retention must keep: every channel, every pin, the rollback target."""
        kept = {self.stable, self.canary, self.previous_stable, self.stable_pin, *self.pins.values()}
        return {v for v in kept if v is not None}


def read_pins_strict(root: Path) -> dict[str, int]:
    try:
        return read_pins(root)
    except (OSError, ValueError) as exc:
        raise SnapshotError(f"{Path(root) / PINS_FILE} is unreadable ({exc}); fix or remove it, "
                            "then try again") from None


def read_stable_pin_strict(root: Path) -> int | None:
    try:
        return read_stable_pin(root)
    except (OSError, ValueError) as exc:
        raise SnapshotError(f"{Path(root) / STABLE_PIN_FILE} is unreadable ({exc}); fix it, or remove it "
                            "to unpin stable, then try again") from None


def read_channels(root: Path) -> ChannelRecord:
    stable = channel_version(root, STABLE)
    return ChannelRecord(stable, channel_version(root, CANARY), previous_stable(read_history(root), stable),
                         read_pins_strict(root), read_stable_pin_strict(root))


@contextmanager
def store_lock(root: Path) -> Iterator[None]:
    """Hold the store's exclusive flock: writers in other processes and threads wait for it.

    Each call opens its own file description, so two threads of one process exclude each other too.
    Never nest it in one thread: that would wait for itself.
    """
    fd = os.open(Path(root) / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the last descriptor releases the lock


def set_pointer(root: Path, name: str, version: int) -> None:
    """Point the symlink `name` at `version`: a new link, renamed over the old one."""
    tmp = Path(root) / f"{POINTER_TEMP_PREFIX}{name}-{os.getpid()}-{time.monotonic_ns()}"
    os.symlink(str(version), tmp)
    os.replace(tmp, Path(root) / name)
    fsync_dir(Path(root))


def clear_pointer(root: Path, name: str) -> None:
    (Path(root) / name).unlink(missing_ok=True)
    fsync_dir(Path(root))


class ChannelBook:
    """The channel changes; the caller holds store_lock and has checked that versions are intact.

    Each change writes its pointer or pins file atomically first and then appends its history line,
    so a crash in between leaves a valid state whose last change is missing from the log (rollback
    then treats the unlogged stable as current and goes to the last logged one). Pinning stable moves
    the pointer before it writes the pin file: a crash in between leaves stable moved but not pinned.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def record(self) -> ChannelRecord:
        return read_channels(self.root)

    def settle(self, actor: str) -> None:
        """Adopt a `latest` from before channels as `stable`, and bring `latest` back in line with
        `stable` after a writer died between the two links."""
        stable = read_link_version(self.root / STABLE)
        latest = read_link_version(self.root / LATEST)
        if stable is None and latest is not None:
            set_pointer(self.root, STABLE, latest)
            self._log("adopt", STABLE, latest, None, actor, "stable adopted from latest")
        elif stable is not None and latest != stable:
            set_pointer(self.root, LATEST, stable)

    def point(self, channel: Channel, version: int, action: str, actor: str, reason: str) -> None:
        before = channel_version(self.root, channel)
        set_pointer(self.root, channel, version)
        if channel == STABLE:
            set_pointer(self.root, LATEST, version)
        self._log(action, channel, version, before, actor, reason)

    def held_by_pin(self) -> int | None:
        """The version stable is pinned to (SnapshotError when the pin file is unreadable: a pin that
        cannot be read holds stable rather than letting it move)."""
        return read_stable_pin_strict(self.root)

    def _refuse_if_pinned(self, change: str) -> None:
        pinned = self.held_by_pin()
        if pinned is not None:
            raise SnapshotConflictError(
                f"stable is pinned to {pinned}; {change} would replace it. Unpin stable first "
                "(`streamdqn snapshots unpin`), or pin the version you want (`snapshots pin VERSION`)")

    def promote(self, version: int | None, check: Callable[[int], None], actor: str, reason: str) -> int:
        self._refuse_if_pinned("promotion")
        canary = channel_version(self.root, CANARY)
        target = canary if version is None else version
        if target is None:
            raise SnapshotConflictError(f"no canary under {self.root} to promote; name a version to promote")
        if target == channel_version(self.root, STABLE):
            raise SnapshotConflictError(f"stable already serves {target}")
        check(target)
        self.point(STABLE, target, "promote", actor, reason)
        if canary == target:
            clear_pointer(self.root, CANARY)
            self._log("promote", CANARY, None, canary, actor, reason)
        return target

    def demote(self, actor: str, reason: str) -> int:
        canary = channel_version(self.root, CANARY)
        if canary is None:
            raise SnapshotConflictError(f"no canary under {self.root} to demote")
        clear_pointer(self.root, CANARY)
        self._log("demote", CANARY, None, canary, actor, reason)
        return canary

    def rollback(self, to: int | None, check: Callable[[int], None], actor: str, reason: str) -> int:
        self._refuse_if_pinned("a rollback")
        current = channel_version(self.root, STABLE)
        target = previous_stable(read_history(self.root), current) if to is None else to
        if target is None:
            raise SnapshotConflictError(f"no previous stable version under {self.root} to roll back to; "
                                        "name one with --to")
        if target == current:
            raise SnapshotConflictError(f"stable already serves {target}")
        check(target)
        self.point(STABLE, target, "rollback", actor, reason)
        return target

    def pin(self, sandbox_id: str, version: int, actor: str, reason: str) -> int | None:
        pins = read_pins_strict(self.root)
        before = pins.get(sandbox_id)
        pins[sandbox_id] = version
        self._write_pins(pins)
        self._log("pin", None, version, before, actor, reason, sandbox_id)
        return before

    def unpin(self, sandbox_id: str, actor: str, reason: str) -> int:
        pins = read_pins_strict(self.root)
        if sandbox_id not in pins:
            raise SnapshotConflictError(f"sandbox {sandbox_id!r} is not pinned")
        before = pins.pop(sandbox_id)
        self._write_pins(pins)
        self._log("unpin", None, None, before, actor, reason, sandbox_id)
        return before

    def pin_stable(self, version: int, check: Callable[[int], None], actor: str, reason: str) -> int | None:
        """Point stable at `version` and hold it there; the stable it replaced (None: none)."""
        before = channel_version(self.root, STABLE)
        check(version)
        if before != version:
            set_pointer(self.root, STABLE, version)
        if read_link_version(self.root / LATEST) != version:
            set_pointer(self.root, LATEST, version)
        pin = {"version": version, "time": time.time(), "actor": actor, "reason": reason}
        atomic_write_bytes(self.root / STABLE_PIN_FILE,
                           json.dumps(pin, indent=2, ensure_ascii=False).encode() + b"\n")
        self._log("pin", STABLE, version, before, actor, reason)
        return before

    def unpin_stable(self, actor: str, reason: str) -> int:
        """Let promotion and publishing move stable again; the version it was pinned to."""
        pinned = self.held_by_pin()
        if pinned is None:
            raise SnapshotConflictError("stable is not pinned")
        clear_pointer(self.root, STABLE_PIN_FILE)
        self._log("unpin", STABLE, None, pinned, actor, reason)
        return pinned

    def _write_pins(self, pins: dict[str, int]) -> None:
        data = json.dumps(dict(sorted(pins.items())), indent=2, ensure_ascii=False).encode() + b"\n"
        atomic_write_bytes(self.root / PINS_FILE, data)

    def _log(self, action: str, channel: str | None, version: int | None, before: int | None,
             actor: str, reason: str, sandbox_id: str | None = None) -> None:
        entry = HistoryEntry(time.time(), action, channel, version, before, actor, reason, sandbox_id)
        fd = os.open(self.root / HISTORY_FILE, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            size = os.fstat(fd).st_size
            # A line torn by a crash must not swallow this one: start on a fresh line.
            torn = size > 0 and os.pread(fd, 1, size - 1) != b"\n"
            os.write(fd, (b"\n" if torn else b"") + entry.to_json())
            os.fsync(fd)
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        if size > HISTORY_COMPACT_BYTES:
            self._compact(actor)

    def _compact(self, actor: str) -> None:
        """Keep the old log as channels.log.1, and start a new one that replays to the same lineage
        (its last LINEAGE_KEPT stables) and the same canary."""
        log = self.root / HISTORY_FILE
        old = log.read_bytes()
        history = read_history(self.root)
        now = time.time()
        lines = [HistoryEntry(now, "compact", STABLE, v, None, actor, "history compacted")
                 for v in stable_lineage(history)[-LINEAGE_KEPT:]]
        canary = channel_version(self.root, CANARY)
        if canary is not None:
            lines.append(HistoryEntry(now, "compact", CANARY, canary, None, actor, "history compacted"))
        atomic_write_bytes(self.root / f"{HISTORY_FILE}.1", old)
        atomic_write_bytes(log, b"".join(e.to_json() for e in lines))
