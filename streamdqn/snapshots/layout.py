"""The snapshot directory, read one way by everyone: the store that writes it, the HTTP server, the
offline evaluator and the sandbox-side client. No torch or onnx here.

    snapshots/<version>/model.onnx
    snapshots/<version>/manifest.json
    snapshots/stable -> <version>          (a symlink, replaced atomically)
    snapshots/canary -> <version>          (only while a canary is out)
    snapshots/latest -> <version>          (the same version as `stable`, for readers from before channels)
    snapshots/pins.json                    {"<sandbox id>": <version>, ...}, replaced atomically
    snapshots/stable_pin.json              {"version": <version>}: stable is pinned there (only while pinned)
    snapshots/channels.log                 one JSON line per channel change, append-only
    snapshots/store.lock                   flock'd by every writer (streamdqn.snapshots.store)

A version is a canonical ASCII decimal: 1-12 digits, no sign, no leading zero. `\\d` would also match
Arabic-Indic or fullwidth digits, which int() turns into numbers, so one version could have several
names; `[0-9]` with re.ASCII cannot.

A store written before channels has only `latest`; it reads as `stable` until the next write adds the
`stable` link.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Final, Literal, TypeGuard

MODEL_FILE = "model.onnx"
MANIFEST_FILE = "manifest.json"
LATEST = "latest"
Channel = Literal["stable", "canary"]
STABLE: Final = "stable"
CANARY: Final = "canary"
CHANNELS: tuple[Channel, ...] = (STABLE, CANARY)
PINS_FILE = "pins.json"
STABLE_PIN_FILE = "stable_pin.json"
HISTORY_FILE = "channels.log"
LOCK_FILE = "store.lock"
VERSION_RE = re.compile(r"[1-9][0-9]{0,11}", re.ASCII)
MAX_SANDBOX_ID_CHARS = 256


def parse_version(name: str) -> int | None:
    """The version a directory or link-target name stands for, or None when it is not canonical."""
    return int(name) if VERSION_RE.fullmatch(name) else None


def is_version_number(value: object) -> TypeGuard[int]:
    """Whether `value` is an int (not a bool) that a canonical version name can spell."""
    return type(value) is int and 0 < value < 10**12


def read_link_version(link: Path) -> int | None:
    """The version a symlink such as `latest` points to; None when it is missing or not a version."""
    try:
        target = os.readlink(link)
    except OSError:
        return None
    return parse_version(target)


def channel_version(root: Path, channel: Channel) -> int | None:
    """The version `channel` points to, read once; `stable` falls back to `latest` (older stores)."""
    version = read_link_version(Path(root) / channel)
    if version is None and channel == STABLE:
        version = read_link_version(Path(root) / LATEST)
    return version


def latest_version(root: Path) -> int | None:
    """What `latest` means to readers: the stable channel."""
    return channel_version(root, STABLE)


def versions(root: Path) -> list[int]:
    """Published versions: real directories (never links) with canonical names, ascending."""
    try:
        entries = list(os.scandir(root))
    except OSError:
        return []
    found = (parse_version(e.name) for e in entries if e.is_dir(follow_symlinks=False))
    return sorted(v for v in found if v is not None)


def version_dir(root: Path, version: int) -> Path:
    return Path(root) / str(version)


def sandbox_id_problem(sandbox_id: str) -> str | None:
    """Why `sandbox_id` cannot be pinned or routed (None: it can): 1-256 printable characters."""
    if not sandbox_id:
        return "a sandbox id must not be empty"
    if len(sandbox_id) > MAX_SANDBOX_ID_CHARS:
        return f"a sandbox id has at most {MAX_SANDBOX_ID_CHARS} characters"
    if not sandbox_id.isprintable() or sandbox_id != sandbox_id.strip():
        return "a sandbox id must be printable, without leading or trailing spaces"
    return None


def parse_pins(data: bytes) -> dict[str, int]:
    """pins.json's bytes as {sandbox id: version}; ValueError says what is wrong."""
    raw = json.loads(data)
    if not isinstance(raw, dict):
        raise ValueError("pins file is not a JSON object")
    pins: dict[str, int] = {}
    for sandbox_id, version in raw.items():
        problem = sandbox_id_problem(sandbox_id)
        if problem is not None:
            raise ValueError(f"pins file: {sandbox_id!r}: {problem}")
        if not is_version_number(version):
            raise ValueError(f"pins file: {sandbox_id!r} is pinned to {version!r}, not a version")
        pins[sandbox_id] = version
    return pins


def read_pins(root: Path) -> dict[str, int]:
    """The pins (empty when there is no pins file); OSError or ValueError when it is unreadable."""
    try:
        data = (Path(root) / PINS_FILE).read_bytes()
    except FileNotFoundError:
        return {}
    return parse_pins(data)


def parse_stable_pin(data: bytes) -> int:
    """stable_pin.json's bytes as the pinned version; ValueError says what is wrong."""
    raw = json.loads(data)
    version = raw.get("version") if isinstance(raw, dict) else None
    if not is_version_number(version):
        raise ValueError(f"stable pin file: {raw!r} does not name a version as {{\"version\": N}}")
    return version


def read_stable_pin(root: Path) -> int | None:
    """The version stable is pinned to, None when it is not pinned; OSError or ValueError when the
    file is unreadable."""
    try:
        data = (Path(root) / STABLE_PIN_FILE).read_bytes()
    except FileNotFoundError:
        return None
    return parse_stable_pin(data)
