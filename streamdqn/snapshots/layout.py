"""The snapshot directory, read one way by everyone: the store that writes it, the HTTP server, the
offline evaluator and the sandbox-side client. No torch or onnx here.

    snapshots/<version>/model.onnx
    snapshots/<version>/manifest.json
    snapshots/latest -> <version>          (a symlink, replaced atomically)

A version is a canonical ASCII decimal: 1-12 digits, no sign, no leading zero. `\\d` would also match
Arabic-Indic or fullwidth digits, which int() turns into numbers, so one version could have several
names; `[0-9]` with re.ASCII cannot.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

MODEL_FILE = "model.onnx"
MANIFEST_FILE = "manifest.json"
LATEST = "latest"
VERSION_RE = re.compile(r"[1-9][0-9]{0,11}", re.ASCII)


def parse_version(name: str) -> int | None:
    """The version a directory or link-target name stands for, or None when it is not canonical."""
    return int(name) if VERSION_RE.fullmatch(name) else None


def read_link_version(link: Path) -> int | None:
    """The version a symlink such as `latest` points to; None when it is missing or not a version."""
    try:
        target = os.readlink(link)
    except OSError:
        return None
    return parse_version(target)


def latest_version(root: Path) -> int | None:
    return read_link_version(Path(root) / LATEST)


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
