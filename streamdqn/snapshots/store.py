"""The snapshot store: atomic versioned directories, the `stable` and `canary` channels, per-sandbox
pins, a pin that holds stable, a channel history, and retention that keeps whatever a channel, pin or
rollback needs.

A version directory is assembled under a hidden temp name and renamed into place, so a reader
never sees a half-written snapshot (the layout is in streamdqn.snapshots.layout). Every write (publish,
promote, demote, rollback, pin, unpin, pin and unpin stable, prune) holds an flock on the store's lock
file, so the daemon and the `streamdqn snapshots` commands can change one store at the same time. No
torch here.
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
from streamdqn.errors import SnapshotError, SnapshotNotFoundError, SnapshotVerifyError
from streamdqn.snapshots.channels import (
    POINTER_TEMP_PREFIX,
    ChannelBook,
    ChannelRecord,
    read_channels,
    store_lock,
)
from streamdqn.snapshots.layout import (
    CHANNELS,
    LATEST,
    MANIFEST_FILE,
    MODEL_FILE,
    PINS_FILE,
    STABLE,
    STABLE_PIN_FILE,
    Channel,
    is_version_number,
    latest_version,
    read_link_version,
    sandbox_id_problem,
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
    channel: Channel | None = None  # what publish pointed at it (None: none, or stable held by a pin)


class SnapshotStore:
    """Versioned snapshot directories, channels, pins and retention (keep the newest `keep`)."""

    def __init__(self, root: Path, keep: int = 20) -> None:
        if keep < 1:
            raise ValueError("snapshot retention must keep at least 1 version")
        self.root = Path(root)
        self.keep = keep
        self.root.mkdir(parents=True, exist_ok=True)
        self._book = ChannelBook(self.root)
        # Leftovers of a writer killed mid-publish; never visible as versions, safe to remove (under
        # the lock: a live writer's temp directory is not a leftover).
        with store_lock(self.root):
            for stale in [*self.root.glob(".tmp-*"), *self.root.glob(".latest-*"),
                          *self.root.glob(f"{POINTER_TEMP_PREFIX}*"), *self.root.glob(f".{PINS_FILE}.*.tmp"),
                          *self.root.glob(f".{STABLE_PIN_FILE}.*.tmp")]:
                if stale.is_dir() and not stale.is_symlink():
                    shutil.rmtree(stale, ignore_errors=True)
                else:
                    stale.unlink(missing_ok=True)

    def versions(self) -> list[int]:
        return versions(self.root)

    def latest_version(self) -> int | None:
        """The stable channel's version (what `latest` serves)."""
        return latest_version(self.root)

    def path_of(self, version: int) -> Path:
        return version_dir(self.root, version)

    def channels(self) -> ChannelRecord:
        """What each channel serves, the pins, and where a rollback would go."""
        return read_channels(self.root)

    def read(self, version: int | None = None) -> Snapshot:
        """A published snapshot (stable's by default), its manifest parsed."""
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
        channel: Channel | None = STABLE,
        signer: Signer | None = None,
        actor: str = "publisher",
        reason: str = "",
    ) -> Snapshot:
        """Write a new version (its manifest gets version, sha256, created_at) and point `channel` at
        it (None: publish without pointing any channel at it, e.g. a rejected candidate). While stable
        is pinned, a version published to stable is written but not pointed at (Snapshot.channel None)."""
        if channel is not None and channel not in CHANNELS:
            raise ValueError(f"unknown channel {channel!r}; channels are {', '.join(CHANNELS)}")
        with store_lock(self.root):
            self._book.settle(actor)
            version = max(self.versions(), default=0) + 1
            manifest = Manifest(
                **msgspec.structs.asdict(info), schema_version=SCHEMA_VERSION, version=version,
                created_at=time.time(), sha256=sha256_hex(model), model_file=MODEL_FILE, onnx=onnx,
                parity_max_abs_diff=parity, packages=packages or {},
            )
            if signer is not None:
                value = signer.sign(signed_payload(manifest.as_dict()))
                manifest = msgspec.structs.replace(manifest, signature=Signature(signer.algorithm, value))
            if channel == STABLE and self._book.held_by_pin() is not None:
                channel = None
            self._write_version(version, model, manifest)
            if channel is not None:
                self._book.point(channel, version, "publish", actor, reason)
            self._prune_locked()
        return Snapshot(version, self.path_of(version), manifest, channel)

    def _write_version(self, version: int, model: bytes, manifest: Manifest) -> None:
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

    def promote(self, version: int | None = None, *, actor: str = "", reason: str = "") -> ChannelRecord:
        """Point stable at the canary (clearing canary), or at `version` (clearing canary if it is);
        refused while stable is pinned (SnapshotConflictError)."""
        with store_lock(self.root):
            self._book.settle(actor)
            self._book.promote(version, self.verify, actor, reason)
            return self._book.record()

    def point_latest(self, version: int) -> None:
        """Point stable (and `latest`) at `version`: promote(version), for callers from before channels."""
        self.promote(version, actor="store", reason="point_latest")

    def demote(self, *, actor: str = "", reason: str = "") -> ChannelRecord:
        """Take the canary out: every sandbox is served stable (or its pin) again."""
        with store_lock(self.root):
            self._book.demote(actor, reason)
            return self._book.record()

    def rollback(self, to: int | None = None, *, actor: str = "", reason: str = "") -> ChannelRecord:
        """Point stable at the previous stable of the history, or at `to`; refused while stable is
        pinned (SnapshotConflictError)."""
        with store_lock(self.root):
            self._book.settle(actor)
            self._book.rollback(to, self.verify, actor, reason)
            return self._book.record()

    def pin(self, sandbox_id: str, version: int, *, actor: str = "", reason: str = "") -> ChannelRecord:
        """Serve `version` to `sandbox_id` whatever the channels say, until unpinned."""
        problem = sandbox_id_problem(sandbox_id)
        if problem is not None:
            raise SnapshotError(f"cannot pin {sandbox_id!r}: {problem}")
        with store_lock(self.root):
            self.verify(version)
            self._book.pin(sandbox_id, version, actor, reason)
            return self._book.record()

    def unpin(self, sandbox_id: str, *, actor: str = "", reason: str = "") -> ChannelRecord:
        with store_lock(self.root):
            self._book.unpin(sandbox_id, actor, reason)
            return self._book.record()

    def pin_stable(self, version: int, *, actor: str = "", reason: str = "") -> ChannelRecord:
        """Point stable at `version` (verified as rollback does) and hold it there: promotion and
        publishing do not move it and rollback is refused until unpin_stable(). Pinning again moves it."""
        with store_lock(self.root):
            self._book.settle(actor)
            self._book.pin_stable(version, self.verify, actor, reason)
            return self._book.record()

    def unpin_stable(self, *, actor: str = "", reason: str = "") -> ChannelRecord:
        """Release stable: the next promotion or publish to stable moves it again."""
        with store_lock(self.root):
            self._book.unpin_stable(actor, reason)
            return self._book.record()

    def verify(self, version: int) -> None:
        """Refuse a version that is not there or not intact: SnapshotNotFoundError, SnapshotError for an
        unreadable manifest, SnapshotVerifyError for a model that does not match its manifest."""
        if not is_version_number(version):
            raise SnapshotNotFoundError(f"{version!r} is not a snapshot version (1 to 999999999999)")
        if version not in self.versions():
            known = self.versions()
            listing = f"versions here: {known[0]}..{known[-1]}" if known else "no versions here"
            raise SnapshotNotFoundError(f"snapshot {version} does not exist under {self.root} (never "
                                        f"published, or pruned); {listing}")
        snapshot = self.read(version)
        try:
            model = (snapshot.path / MODEL_FILE).read_bytes()
        except OSError as exc:
            raise SnapshotError(f"snapshot {version} under {self.root} has no readable model: "
                                f"{exc}") from None
        if sha256_hex(model) != snapshot.manifest.sha256:
            raise SnapshotVerifyError(f"snapshot {version} under {self.root}: the model's sha256 does not "
                                      "match its manifest; it is corrupt and will not be served")

    def prune(self) -> list[int]:
        """Remove versions beyond the retention count, except any a channel, pin or rollback needs."""
        with store_lock(self.root):
            return self._prune_locked()

    def _prune_locked(self) -> list[int]:
        protected = self._book.record().protected()
        protected.add(read_link_version(self.root / LATEST) or 0)
        existing = self.versions()
        doomed = [v for v in existing[: max(0, len(existing) - self.keep)] if v not in protected]
        for v in doomed:
            shutil.rmtree(self.path_of(v), ignore_errors=True)
        return doomed


def _manifest_json(manifest: Manifest) -> bytes:
    # Indented for people who read it. json, not msgspec: msgspec writes NaN as null, and a NaN
    # anywhere in a manifest must be an error, never a silently changed value.
    return json.dumps(manifest.as_dict(), indent=2, allow_nan=False).encode()
