"""The snapshot store: atomic versioned directories with a `latest` pointer and retention.

A version directory is assembled under a hidden temp name and renamed into place, so a reader
never sees a half-written snapshot (the layout is in streamdqn.snapshots.layout). No torch here.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import msgspec

from streamdqn.atomic import atomic_write_bytes, fsync_dir
from streamdqn.errors import SnapshotError
from streamdqn.snapshots.layout import (
    LATEST,
    MANIFEST_FILE,
    MODEL_FILE,
    latest_version,
    version_dir,
    versions,
)
from streamdqn.snapshots.manifest import (
    SCHEMA_VERSION,
    Manifest,
    OnnxInfo,
    PolicyInfo,
    Signature,
    parse_manifest,
)
from streamdqn.snapshots.signing import signed_payload


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Signer(Protocol):
    """Signs a manifest's canonical JSON (see streamdqn.snapshots.signing)."""

    algorithm: str

    def sign(self, data: bytes) -> str: ...




@dataclass(frozen=True)
class Snapshot:
    version: int
    path: Path
    manifest: Manifest


class SnapshotStore:
    """Versioned snapshot directories with an atomic `latest` pointer and retention."""

    def __init__(self, root: Path, keep: int = 20) -> None:
        if keep < 1:
            raise ValueError("snapshot retention must keep at least 1 version")
        self.root = Path(root)
        self.keep = keep
        self.root.mkdir(parents=True, exist_ok=True)
        # Leftovers of a writer killed mid-publish; never visible as versions, safe to remove.
        for stale in [*self.root.glob(".tmp-*"), *self.root.glob(".latest-*")]:
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)

    def versions(self) -> list[int]:
        return versions(self.root)

    def latest_version(self) -> int | None:
        return latest_version(self.root)

    def path_of(self, version: int) -> Path:
        return version_dir(self.root, version)

    def read(self, version: int | None = None) -> Snapshot:
        """A published snapshot (the latest by default), its manifest parsed."""
        v = self.latest_version() if version is None else version
        if v is None:
            raise SnapshotError(f"no snapshot published yet under {self.root}")
        path = self.path_of(v)
        try:
            data = (path / MANIFEST_FILE).read_bytes()
        except OSError as exc:
            raise SnapshotError(f"snapshot {v} under {self.root} is unreadable: {exc}") from exc
        return Snapshot(v, path, parse_manifest(data, str(path / MANIFEST_FILE)))

    def publish(
        self,
        model: bytes,
        info: PolicyInfo,
        *,
        onnx: OnnxInfo | None = None,
        parity: float = 0.0,
        packages: dict[str, str] | None = None,
        make_latest: bool = True,
        signer: Signer | None = None,
    ) -> Snapshot:
        """Write a new version (its manifest gets version, sha256, created_at) and point `latest` at it."""
        existing = self.versions()
        version = max([*existing, self.latest_version() or 0]) + 1
        manifest = Manifest(
            **msgspec.structs.asdict(info), schema_version=SCHEMA_VERSION, version=version,
            created_at=time.time(), sha256=sha256_hex(model), model_file=MODEL_FILE, onnx=onnx,
            parity_max_abs_diff=parity, packages=packages or {},
        )
        if signer is not None:
            value = signer.sign(signed_payload(manifest.as_dict()))
            manifest = msgspec.structs.replace(manifest, signature=Signature(signer.algorithm, value))
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=self.root))
        try:
            atomic_write_bytes(tmp / MODEL_FILE, model)
            atomic_write_bytes(tmp / MANIFEST_FILE, _manifest_json(manifest))
            os.chmod(tmp, 0o755)
            os.rename(tmp, self.path_of(version))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_dir(self.root)
        if make_latest:
            self.point_latest(version)
        self.prune()
        return Snapshot(version, self.path_of(version), manifest)

    def point_latest(self, version: int) -> None:
        link = self.root / f".latest-{os.getpid()}-{time.monotonic_ns()}"
        os.symlink(str(version), link)
        os.replace(link, self.root / LATEST)
        fsync_dir(self.root)

    def prune(self) -> list[int]:
        """Remove versions beyond the retention count (never the one `latest` points to), and stale temps."""
        latest = self.latest_version()
        versions = self.versions()
        doomed = [v for v in versions[: max(0, len(versions) - self.keep)] if v != latest]
        for v in doomed:
            shutil.rmtree(self.path_of(v), ignore_errors=True)
        return doomed


def _manifest_json(manifest: Manifest) -> bytes:
    # Indented for people who read it. json, not msgspec: msgspec writes NaN as null, and a NaN
    # anywhere in a manifest must be an error, never a silently changed value.
    return json.dumps(manifest.as_dict(), indent=2, allow_nan=False).encode()
