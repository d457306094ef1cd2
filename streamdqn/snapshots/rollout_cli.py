"""What `streamdqn snapshots list|pin|unpin|rollback|promote|demote` do (cli.py only parses arguments).

`pin VERSION` pins stable (stable -> VERSION, held there until `unpin`); with a sandbox id it pins that
one sandbox instead. While stable is pinned, `promote` and `rollback` are refused: unpin first, or pin
the version wanted.

Every change goes through SnapshotStore, under the same flock as a running daemon's publisher, so the
commands are safe while the daemon publishes; the daemon's HTTP server serves the change on the next
request. No torch here: the commands answer in a fraction of a second.
"""

from __future__ import annotations

import getpass
import json
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from streamdqn.errors import SnapshotError
from streamdqn.snapshots.channels import ChannelRecord, HistoryEntry, read_channels, read_history
from streamdqn.snapshots.layout import MANIFEST_FILE, version_dir, versions
from streamdqn.snapshots.manifest import parse_manifest
from streamdqn.snapshots.store import SnapshotStore

RolloutAction = Literal["list", "pin", "unpin", "rollback", "promote", "demote"]
HISTORY_SHOWN = 10


@dataclass(frozen=True)
class RolloutCommand:
    """One `streamdqn snapshots` command: `version` is pin's or promote's version, or rollback's --to;
    pin and unpin act on stable without a `sandbox_id`, on that sandbox with one."""

    action: RolloutAction
    root: Path
    version: int | None = None
    sandbox_id: str | None = None
    reason: str = ""
    as_json: bool = False


@dataclass(frozen=True)
class VersionLine:
    version: int
    created_at: float | None
    updates: int | None
    sha256: str | None
    serves: list[str]


def run_rollout(command: RolloutCommand) -> str:
    """Carry out `command`; the text to print. SnapshotError (and subclasses) say what went wrong."""
    root = Path(command.root)
    if not root.is_dir():
        raise SnapshotError(f"no snapshot store at {root}; pass the daemon's <state-dir>/snapshots")
    if command.action == "list":
        return _listing(root, command.as_json)
    record, done = _change(SnapshotStore(root), command, _actor())
    if command.as_json:
        return json.dumps({"action": command.action, "result": done, "channels": record.as_dict()}, indent=2)
    return f"{done}\n{_summary(record)}"


def _change(store: SnapshotStore, c: RolloutCommand, actor: str) -> tuple[ChannelRecord, str]:
    before = store.channels()
    if c.action == "promote":
        record = store.promote(c.version, actor=actor, reason=c.reason)
        return record, f"stable now serves {record.stable} (was {before.stable})"
    if c.action == "demote":
        record = store.demote(actor=actor, reason=c.reason)
        return record, f"canary {before.canary} demoted; every sandbox gets stable {record.stable} or its pin"
    if c.action == "rollback":
        record = store.rollback(c.version, actor=actor, reason=c.reason)
        return record, f"stable rolled back from {before.stable} to {record.stable}"
    if c.action == "pin":
        return _pin(store, c.version, c.sandbox_id, c.reason, actor, before)
    if c.sandbox_id is None:
        record = store.unpin_stable(actor=actor, reason=c.reason)
        return record, f"stable unpinned (was pinned to {before.stable_pin}); promotion may move it again"
    record = store.unpin(c.sandbox_id, actor=actor, reason=c.reason)
    return record, f"sandbox {c.sandbox_id!r} unpinned (was {before.pins.get(c.sandbox_id)})"


def _pin(store: SnapshotStore, version: int | None, sandbox_id: str | None, reason: str, actor: str,
         before: ChannelRecord) -> tuple[ChannelRecord, str]:
    if version is None:
        raise SnapshotError("pin needs a version")
    if sandbox_id is not None:
        record = store.pin(sandbox_id, version, actor=actor, reason=reason)
        return record, f"sandbox {sandbox_id!r} pinned to {version}"
    record = store.pin_stable(version, actor=actor, reason=reason)
    moved = "" if before.stable == version else f" (was {_or_none(before.stable)})"
    return record, (f"stable pinned to {version}{moved}; promotion will not replace it until "
                    "`streamdqn snapshots unpin`")


def _actor() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry and no LOGNAME/USER, as in some containers
        user = "?"
    return f"cli {user}@{socket.gethostname()}"


def version_lines(root: Path, record: ChannelRecord) -> list[VersionLine]:
    """Every published version, newest first, with what serves it."""
    lines = []
    for v in reversed(versions(root)):
        stable = "stable (pinned)" if record.stable_pin == record.stable else "stable"
        serves = [name for name, at in ((stable, record.stable), ("canary", record.canary),
                                         ("rollback target", record.previous_stable)) if at == v]
        serves += [f"pin {sandbox}" for sandbox, at in sorted(record.pins.items()) if at == v]
        try:
            path = version_dir(root, v) / MANIFEST_FILE
            manifest = parse_manifest(path.read_bytes(), str(path))
            lines.append(VersionLine(v, manifest.created_at, manifest.updates, manifest.sha256, serves))
        except (OSError, SnapshotError):
            lines.append(VersionLine(v, None, None, None, [*serves, "manifest unreadable"]))
    return lines


def _listing(root: Path, as_json: bool) -> str:
    record = read_channels(root)
    lines = version_lines(root, record)
    history = read_history(root)[-HISTORY_SHOWN:]
    if as_json:
        return json.dumps({"channels": record.as_dict(), "versions": [vars(line) for line in lines],
                           "history": [vars(e) for e in history]}, indent=2)
    header = f"{'VERSION':>8}  {'CREATED (UTC)':<19}  {'UPDATES':>8}  {'SHA256':<12}  SERVES"
    out = [_summary(record), "", header]
    for line in lines:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(line.created_at)) if line.created_at else "?"
        updates = "?" if line.updates is None else str(line.updates)
        out.append(f"{line.version:>8}  {created:<19}  {updates:>8}  {(line.sha256 or '?')[:12]:<12}  "
                   f"{', '.join(line.serves)}".rstrip())
    if history:
        out += ["", "recent changes (channels.log):", *(_history_line(e) for e in history)]
    return "\n".join(out)


def _summary(record: ChannelRecord) -> str:
    pins = ", ".join(f"{s} -> {v}" for s, v in sorted(record.pins.items())) or "none"
    pinned = "" if record.stable_pin is None else " (pinned)"
    return (f"stable: {_or_none(record.stable)}{pinned}  canary: {_or_none(record.canary)}  "
            f"rollback target: {_or_none(record.previous_stable)}  pins: {pins}")


def _history_line(e: HistoryEntry) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(e.time))
    what = e.channel or f"sandbox {e.sandbox_id!r}"
    change = f"{_or_none(e.from_version)} -> {_or_none(e.version)}"
    tail = " ".join(x for x in (f"by {e.actor}" if e.actor else "", f"({e.reason})" if e.reason else "") if x)
    return f"  {when}  {e.action:<8} {what}: {change} {tail}".rstrip()


def _or_none(value: Any) -> str:
    return "-" if value is None else str(value)
