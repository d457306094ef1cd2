"""The HTTP face of the daemon: snapshots for the sandboxes, /metrics for Prometheus, probes for systemd/k8s.

    GET /healthz                               200, health() as JSON (never needs a token)
    GET /readyz                                200 or 503, ready()'s details as JSON (never needs a token)
    GET /metrics                               render_metrics() (token only with protect_metrics)
    GET /snapshots                             {"latest": v, "versions": [...]}
    GET /snapshots/channels                    {"stable", "canary", "latest", "previous_stable", "pins",
                                                "stable_pin", "canary_fraction"}
    GET /snapshots/latest/{model.onnx,manifest.json}      Cache-Control: no-cache, X-Snapshot-Version,
                                                          X-Snapshot-Channel, Vary: X-Sandbox-Id
    GET /snapshots/<version>/{model.onnx,manifest.json}   immutable, cacheable for a year
    POST /admin/snapshots/{promote,demote,rollback,pin,unpin}   only with an admin token (serve.admin)

`latest` is routed by the request's `X-Sandbox-Id`: a pinned sandbox gets its pin (channel `pinned`);
while a canary is out, a sandbox whose id hashes into the canary share (streamdqn.snapshots.channels.
canary_bucket < canary_fraction) gets the canary; everyone else, and every request without the
header, gets `stable`.

Thousands of sandboxes poll `latest/manifest.json` with If-None-Match, so the common answer is a
304 from memory: in one worker-thread hop each request resolves its channel (two readlinks and, with
X-Sandbox-Id, a read of the small pins file, parsed only when it changed) and stats the version
directory, and the files of the few most recent versions are held in a small LRU. A channel change is
therefore seen by the next request. The event loop never reads snapshot files itself.

The path is never joined from request text: the version segment must be `latest` or a canonical
ASCII decimal (1-12 digits, no sign, no leading zero), the file name one of two constants.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import stat
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from streamdqn.serve.admin import admin_routes
from streamdqn.serve.auth import bearer_token, token_matches
from streamdqn.snapshots import layout
from streamdqn.snapshots.channels import in_canary_share, previous_stable, read_history
from streamdqn.snapshots.layout import (
    CANARY,
    LATEST,
    MANIFEST_FILE,
    MODEL_FILE,
    PINS_FILE,
    STABLE,
    VERSION_RE,
)

log = logging.getLogger(__name__)

_FILES = {MODEL_FILE: "application/octet-stream", MANIFEST_FILE: "application/json"}
CACHE_VERSIONS = 4
IMMUTABLE = "max-age=31536000, immutable"
SANDBOX_HEADER = "X-Sandbox-Id"
CHANNEL_HEADER = "X-Snapshot-Channel"
PINNED = "pinned"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
App = web.Application
HttpRunner = web.AppRunner


@dataclass(frozen=True)
class _VersionFiles:
    """One published version, read once: both files and their ETags."""

    version: int
    identity: tuple[int, int, int]  # (st_dev, st_ino, st_mtime_ns) of the version directory
    model: bytes
    manifest: bytes
    model_etag: str
    manifest_etag: str


class _NotFound(Exception):
    """The version does not exist (or is not a complete snapshot)."""


@dataclass(frozen=True)
class Route:
    """Which version a `latest` request gets, and why: `stable`, `canary` or `pinned`."""

    version: int
    channel: str


class SnapshotFiles:
    """Read-only view of a snapshot directory with a bounded per-version cache.

    It never writes or cleans the directory (that is SnapshotStore's job in the publishing
    process). Cache entries are keyed by the version directory's identity, so a version that is
    pruned or recreated under the same number is re-read rather than served stale.
    """

    def __init__(self, root: Path, cache_versions: int = CACHE_VERSIONS) -> None:
        self.root = Path(root)
        self._cache: OrderedDict[int, _VersionFiles] = OrderedDict()
        self._cache_size = max(1, cache_versions)
        self._lock = threading.Lock()
        self._pins: dict[str, int] = {}
        self._pins_bytes: bytes | None = None

    def latest_version(self) -> int | None:
        """Read the stable channel once; None when nothing is published."""
        return layout.latest_version(self.root)

    def versions(self) -> list[int]:
        return layout.versions(self.root)

    def listing(self) -> dict[str, Any]:
        return {"latest": self.latest_version(), "versions": self.versions()}

    def pins(self) -> dict[str, int]:
        """The pins file, parsed again only when its bytes changed.

        Read whole on every routed request (it is small): a stat could miss a change, since an
        atomically replaced file can get the old inode number back within one mtime tick. A pins file
        that does not parse (edited by hand) keeps the last good pins in force.
        """
        try:
            data = (self.root / PINS_FILE).read_bytes()
        except FileNotFoundError:
            return {}
        except OSError:
            return self._pins
        with self._lock:
            if data == self._pins_bytes:
                return self._pins
        try:
            pins = layout.parse_pins(data)
        except ValueError as exc:
            log.warning("%s is unreadable, keeping the previous pins: %s", self.root / PINS_FILE, exc)
            return self._pins
        with self._lock:
            self._pins, self._pins_bytes = pins, data
        return pins

    def channels(self, canary_fraction: float) -> dict[str, Any]:
        stable = layout.channel_version(self.root, STABLE)
        return {"stable": stable, "canary": layout.channel_version(self.root, CANARY), "latest": stable,
                "previous_stable": previous_stable(read_history(self.root), stable),
                "pins": dict(sorted(self.pins().items())), "stable_pin": self.stable_pin(),
                "canary_fraction": canary_fraction}

    def stable_pin(self) -> int | None:
        """The version stable is pinned to; None when it is not (or the pin file is unreadable, which
        is logged: the store's writers refuse to move stable then)."""
        try:
            return layout.read_stable_pin(self.root)
        except (OSError, ValueError) as exc:
            log.warning("%s is unreadable: %s", self.root / layout.STABLE_PIN_FILE, exc)
            return None

    def route(self, sandbox_id: str | None, canary_fraction: float) -> Route:
        """The version a `latest` request gets now, or _NotFound."""
        if sandbox_id is not None:
            pinned = self.pins().get(sandbox_id)
            if pinned is not None:
                return Route(pinned, PINNED)
            if canary_fraction > 0 and in_canary_share(sandbox_id, canary_fraction):
                canary = layout.channel_version(self.root, CANARY)
                if canary is not None:
                    return Route(canary, CANARY)
        stable = layout.channel_version(self.root, STABLE)
        if stable is None:
            raise _NotFound("no snapshot published yet to the stable channel")
        return Route(stable, STABLE)

    def load_latest(self, sandbox_id: str | None, canary_fraction: float) -> tuple[Route, _VersionFiles]:
        """route() and load() in one call, so that one thread hop answers a `latest` request."""
        route = self.route(sandbox_id, canary_fraction)
        return route, self.load(route.version)

    def load(self, version: int | None) -> _VersionFiles:
        """The files of `version` (None: resolve stable now), or _NotFound. Blocking: run in a thread."""
        if version is None:
            version = self.latest_version()
            if version is None:
                raise _NotFound("no snapshot published yet")
        path = self.root / str(version)
        try:
            st = os.stat(path, follow_symlinks=False)
        except OSError:
            raise _NotFound(f"snapshot {version} does not exist") from None
        if not stat.S_ISDIR(st.st_mode):  # SnapshotStore writes real directories; never follow a planted link
            raise _NotFound(f"snapshot {version} does not exist")
        identity = (st.st_dev, st.st_ino, st.st_mtime_ns)
        with self._lock:
            cached = self._cache.get(version)
            if cached is not None and cached.identity == identity:
                self._cache.move_to_end(version)
                return cached
        try:
            manifest = (path / MANIFEST_FILE).read_bytes()
            model = (path / MODEL_FILE).read_bytes()
            model_sha = json.loads(manifest)["sha256"]
        except (OSError, ValueError, KeyError, TypeError):
            raise _NotFound(f"snapshot {version} is incomplete or its manifest is unreadable") from None
        if not isinstance(model_sha, str):
            raise _NotFound(f"snapshot {version} has no sha256 in its manifest")
        files = _VersionFiles(
            version=version,
            identity=identity,
            model=model,
            manifest=manifest,
            model_etag=f'"{model_sha}"',
            manifest_etag=f'"{hashlib.sha256(manifest).hexdigest()}"',
        )
        with self._lock:
            self._cache[version] = files
            self._cache.move_to_end(version)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return files


def etag_matches(if_none_match: str, etag: str) -> bool:
    """RFC 9110 If-None-Match: `*`, a comma-separated list, weak comparison (W/ ignored)."""
    wanted = etag.removeprefix("W/")
    for candidate in if_none_match.split(","):
        candidate = candidate.strip()
        if candidate == "*" or candidate.removeprefix("W/") == wanted:
            return True
    return False


def _require_token(token: str, handler: Handler) -> Handler:
    """Wrap `handler` so that it answers 401 without `Authorization: Bearer <token>`."""
    expected = token.encode()

    async def guarded(request: web.Request) -> web.StreamResponse:
        given = bearer_token(request)
        if given is None or not token_matches(given, expected):
            challenge = 'Bearer realm="streamdqn"'
            if given is not None:
                challenge += ', error="invalid_token"'
            return web.json_response(
                {"error": "missing bearer token" if given is None else "invalid bearer token"},
                status=401,
                headers={"WWW-Authenticate": challenge},
            )
        return await handler(request)

    return guarded


def build_app(
    *,
    snapshots_dir: Path,
    render_metrics: Callable[[], tuple[bytes, str]],
    health: Callable[[], dict[str, Any]],
    ready: Callable[[], tuple[bool, dict[str, Any]]],
    token: str = "",
    protect_metrics: bool = False,
    cache_versions: int = CACHE_VERSIONS,
    canary_fraction: float = 0.0,
    admin_token: str = "",
) -> web.Application:
    """The aiohttp application; `token` (if set) guards /snapshots* and, with protect_metrics, /metrics.

    `canary_fraction` (0..1) is the share of sandbox ids served the canary while one is out.
    `admin_token` enables POST /admin/snapshots/* (404 without it); it must differ from `token`.
    """
    if not 0.0 <= canary_fraction <= 1.0:
        raise ValueError(f"canary_fraction must be between 0 and 1, got {canary_fraction}")
    if admin_token and admin_token == token:
        raise ValueError("the admin token must differ from the snapshot token")
    files = SnapshotFiles(snapshots_dir, cache_versions)
    immutable = ("private, " if token else "public, ") + IMMUTABLE

    def guard(handler: Handler) -> Handler:
        return _require_token(token, handler) if token else handler

    async def healthz(request: web.Request) -> web.StreamResponse:
        return web.json_response(health())

    async def readyz(request: web.Request) -> web.StreamResponse:
        ok, details = ready()
        return web.json_response(details, status=200 if ok else 503)

    async def metrics(request: web.Request) -> web.StreamResponse:
        body, content_type = render_metrics()
        # Set the header directly: aiohttp's content_type= refuses the parameters Prometheus sends.
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def snapshot_index(request: web.Request) -> web.StreamResponse:
        listing = await asyncio.to_thread(files.listing)
        return web.json_response(listing, headers={"Cache-Control": "no-cache"})

    async def snapshot_channels(request: web.Request) -> web.StreamResponse:
        listing = await asyncio.to_thread(files.channels, canary_fraction)
        return web.json_response(listing, headers={"Cache-Control": "no-cache"})

    async def snapshot_file(request: web.Request) -> web.StreamResponse:
        segment, name = request.match_info["version"], request.match_info["name"]
        if name not in _FILES or not (segment == LATEST or VERSION_RE.fullmatch(segment)):
            raise web.HTTPNotFound()
        is_latest = segment == LATEST
        sandbox_id = request.headers.get(SANDBOX_HEADER, "").strip() or None
        if sandbox_id is not None and (problem := layout.sandbox_id_problem(sandbox_id)):
            return web.json_response({"error": f"{SANDBOX_HEADER}: {problem}"}, status=400)
        route: Route | None = None
        try:
            # One thread hop resolves the channel once and returns that version's files, so the
            # manifest and model of one request always belong to the same version.
            if is_latest:
                route, snap = await asyncio.to_thread(files.load_latest, sandbox_id, canary_fraction)
            else:
                snap = await asyncio.to_thread(files.load, int(segment))
        except _NotFound as exc:
            return web.json_response({"error": str(exc)}, status=404)
        if name == MODEL_FILE:
            body, etag = snap.model, snap.model_etag
        else:
            body, etag = snap.manifest, snap.manifest_etag
        headers = {
            "ETag": etag,
            "Cache-Control": "no-cache" if is_latest else immutable,
            "X-Snapshot-Version": str(snap.version),
            "X-Content-Type-Options": "nosniff",
        }
        if route is not None:
            headers[CHANNEL_HEADER] = route.channel
            headers["Vary"] = SANDBOX_HEADER  # a shared cache must not hand one sandbox's channel to another
        if etag_matches(request.headers.get("If-None-Match", ""), etag):
            return web.Response(status=304, headers=headers)
        headers["Content-Type"] = _FILES[name]
        return web.Response(body=body, headers=headers)

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", guard(metrics) if protect_metrics else metrics)
    app.router.add_get("/snapshots", guard(snapshot_index))
    app.router.add_get("/snapshots/channels", guard(snapshot_channels))
    app.router.add_get("/snapshots/{version}/{name}", guard(snapshot_file))
    if admin_token:
        app.router.add_routes(admin_routes(Path(snapshots_dir), admin_token))
    return app


async def start_http(
    app: web.Application, host: str, port: int, *, access_log: bool = False, shutdown_timeout: float = 5.0
) -> tuple[web.AppRunner, int]:
    """Serve `app` on host:port; returns the runner and the bound port (port 0 picks a free one).

    The access log is off by default: at thousands of polls a minute it drowns everything else.
    """
    runner = web.AppRunner(
        app,
        access_log=logging.getLogger("aiohttp.access") if access_log else None,
        shutdown_timeout=shutdown_timeout,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound = runner.addresses[0][1]
    log.info("HTTP server listening on %s:%d", host, bound)
    return runner, bound


async def stop_http(runner: web.AppRunner) -> None:
    """Stop listening and close connections; safe to call twice."""
    if runner.server is None:
        return
    await runner.cleanup()
