"""The HTTP server on a real loopback socket, serving snapshots that publish_snapshot really wrote."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from yarl import URL

from streamdqn.serve.app import build_app, etag_matches, start_http, stop_http
from streamdqn.snapshots.signing import HmacSigner
from streamdqn.snapshots.store import SnapshotStore
from tests.factories import publish_small

pytestmark = pytest.mark.integration

OBS_DIM, N_ACTIONS = 30, 5
TOKEN = "t0k3n-for-the-tests"
OUTSIDE_MARKER = b"OUTSIDE-THE-STORE"


publish = publish_small


class Probes:
    """What /healthz, /readyz and /metrics report; tests flip `is_ready`."""

    def __init__(self) -> None:
        self.is_ready = True

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "uptime_s": 1.0}

    def ready(self) -> tuple[bool, dict[str, Any]]:
        return self.is_ready, {"ready": self.is_ready, "learner": "running" if self.is_ready else "starting"}

    def metrics(self) -> tuple[bytes, str]:
        return b"# TYPE streamdqn_up gauge\nstreamdqn_up 1\n", "text/plain; version=0.0.4; charset=utf-8"


@asynccontextmanager
async def serving(root: Path, probes: Probes | None = None, **options: Any) -> AsyncIterator[str]:
    probes = probes or Probes()
    app = build_app(snapshots_dir=root, render_metrics=probes.metrics, health=probes.health,
                    ready=probes.ready, **options)
    runner, port = await start_http(app, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await stop_http(runner)
        await stop_http(runner)  # safe twice


@pytest.fixture
def store(tmp_path: Path) -> SnapshotStore:
    return SnapshotStore(tmp_path / "snapshots")


def run(test: Callable[[], Any]) -> None:
    asyncio.run(test())


async def get(session: aiohttp.ClientSession, url: str, **headers: str) -> tuple[int, Any, bytes]:
    async with session.get(url, headers=headers) as r:
        return r.status, r.headers, await r.read()


def test_routes_bodies_and_headers(store: SnapshotStore) -> None:
    first = publish(store, 1)
    model_bytes = (first.path / "model.onnx").read_bytes()
    manifest_bytes = (first.path / "manifest.json").read_bytes()
    probes = Probes()

    async def test() -> None:
        async with serving(store.root, probes) as base, aiohttp.ClientSession() as s:
            status, headers, body = await get(s, f"{base}/healthz")
            assert status == 200
            assert json.loads(body) == {"status": "ok", "uptime_s": 1.0}

            status, _, body = await get(s, f"{base}/readyz")
            assert status == 200
            assert json.loads(body)["ready"] is True
            probes.is_ready = False
            status, _, body = await get(s, f"{base}/readyz")
            assert status == 503
            assert json.loads(body) == {"ready": False, "learner": "starting"}

            status, headers, body = await get(s, f"{base}/metrics")
            assert status == 200
            assert body.endswith(b"streamdqn_up 1\n")
            assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"

            status, _, body = await get(s, f"{base}/snapshots")
            assert status == 200
            assert json.loads(body) == {"latest": 1, "versions": [1]}

            for version in ("latest", "1"):
                status, headers, body = await get(s, f"{base}/snapshots/{version}/model.onnx")
                assert status == 200
                assert body == model_bytes
                assert headers["ETag"] == f'"{first.manifest.sha256}"'
                assert headers["Content-Type"] == "application/octet-stream"
                assert headers["X-Snapshot-Version"] == "1"

                status, headers, body = await get(s, f"{base}/snapshots/{version}/manifest.json")
                assert status == 200
                assert body == manifest_bytes
                assert headers["ETag"] == f'"{hashlib.sha256(manifest_bytes).hexdigest()}"'
                assert headers["Content-Type"].startswith("application/json")
                if version == "latest":
                    assert headers["Cache-Control"] == "no-cache"
                else:
                    assert headers["Cache-Control"] == "public, max-age=31536000, immutable"

            async with s.head(f"{base}/snapshots/latest/model.onnx") as r:
                assert r.status == 200
                assert await r.read() == b""
            status, _, _ = await get(s, f"{base}/snapshots/2/model.onnx")
            assert status == 404

    run(test)


def test_etag_if_none_match_gives_304_for_both_files(store: SnapshotStore) -> None:
    publish(store, 1)

    async def test() -> None:
        async with serving(store.root) as base, aiohttp.ClientSession() as s:
            for path in ("latest/model.onnx", "latest/manifest.json", "1/model.onnx", "1/manifest.json"):
                url = f"{base}/snapshots/{path}"
                _, headers, _ = await get(s, url)
                etag = headers["ETag"]
                for header in (etag, f"W/{etag}", "*", f'"nope", {etag}', f'"a",W/{etag} , "b"'):
                    status, h304, body = await get(s, url, **{"If-None-Match": header})
                    assert (status, body) == (304, b""), (path, header)
                    assert h304["ETag"] == etag
                    assert h304["X-Snapshot-Version"] == "1"
                status, _, body = await get(s, url, **{"If-None-Match": '"0000", W/"1111"'})
                assert status == 200
                assert body

    run(test)


def test_latest_moves_after_a_second_publish(store: SnapshotStore) -> None:
    first = publish(store, 1)

    async def test() -> None:
        async with serving(store.root) as base, aiohttp.ClientSession() as s:
            _, headers, _ = await get(s, f"{base}/snapshots/latest/manifest.json")
            old_etag = headers["ETag"]
            second = publish(store, 2)
            assert second.manifest.sha256 != first.manifest.sha256

            status, headers, body = await get(s, f"{base}/snapshots/latest/manifest.json",
                                              **{"If-None-Match": old_etag})
            assert status == 200
            assert json.loads(body)["version"] == 2
            assert headers["X-Snapshot-Version"] == "2"
            assert headers["ETag"] != old_etag
            status, _, body = await get(s, f"{base}/snapshots/latest/model.onnx")
            assert body == (second.path / "model.onnx").read_bytes()
            status, _, body = await get(s, f"{base}/snapshots")
            assert json.loads(body) == {"latest": 2, "versions": [1, 2]}
            # The old version stays reachable under its own, immutable URL.
            status, _, body = await get(s, f"{base}/snapshots/1/model.onnx")
            assert status == 200
            assert body == (first.path / "model.onnx").read_bytes()

    run(test)


def test_a_version_replaced_on_disk_is_not_served_from_a_stale_cache(store: SnapshotStore) -> None:
    # Wiping the store and publishing again reuses version numbers; the cache must notice.
    publish(store, 1)

    async def test() -> None:
        async with serving(store.root) as base, aiohttp.ClientSession() as s:
            _, _, before = await get(s, f"{base}/snapshots/1/model.onnx")
            os.rename(store.path_of(1), store.root / "moved-away")
            status, _, _ = await get(s, f"{base}/snapshots/1/model.onnx")
            assert status == 404
            (store.root / "latest").unlink()
            fresh = publish(SnapshotStore(store.root), 7)
            assert fresh.version == 1
            status, _, after = await get(s, f"{base}/snapshots/1/model.onnx")
            assert status == 200
            assert after == (fresh.path / "model.onnx").read_bytes() != before

    run(test)


def test_nothing_published_yet(store: SnapshotStore) -> None:
    async def test() -> None:
        async with serving(store.root) as base, aiohttp.ClientSession() as s:
            status, _, body = await get(s, f"{base}/snapshots")
            assert status == 200
            assert json.loads(body) == {"latest": None, "versions": []}
            status, _, body = await get(s, f"{base}/snapshots/latest/manifest.json")
            assert status == 404
            assert "no snapshot published yet" in json.loads(body)["error"]

    run(test)


def test_token_guards_snapshots_but_not_probes(store: SnapshotStore) -> None:
    publish(store, 1)

    async def test() -> None:
        async with serving(store.root, token=TOKEN) as base, aiohttp.ClientSession() as s:
            for path in ("/snapshots", "/snapshots/latest/manifest.json", "/snapshots/1/model.onnx"):
                status, headers, body = await get(s, base + path)
                assert status == 401
                assert headers["WWW-Authenticate"].startswith("Bearer")
                assert b"onnx" not in body
                assert TOKEN.encode() not in body
                for wrong in (f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", f"Basic {TOKEN}", TOKEN, "Bearer ",
                              "Bearer \u00e9t\u00e9"):
                    status, headers, body = await get(s, base + path, Authorization=wrong)
                    assert status == 401, wrong
                    assert TOKEN.encode() not in body
                status, headers, _ = await get(s, base + path, Authorization=f"Bearer {TOKEN}")
                assert status == 200
                if path.endswith("/1/model.onnx"):  # no shared cache may keep an authorized response
                    assert headers["Cache-Control"].startswith("private,")
                status, _, _ = await get(s, base + path, Authorization=f"bearer  {TOKEN} ")
                assert status == 200
            # Probes and (unprotected) metrics stay open.
            for path in ("/healthz", "/readyz", "/metrics"):
                status, _, _ = await get(s, base + path)
                assert status == 200, path

    run(test)


def test_metrics_protected_only_when_asked(store: SnapshotStore) -> None:
    async def test() -> None:
        protected = serving(store.root, token=TOKEN, protect_metrics=True)
        async with protected as base, aiohttp.ClientSession() as s:
            status, headers, _ = await get(s, f"{base}/metrics")
            assert status == 401
            assert headers["WWW-Authenticate"].startswith("Bearer")
            status, _, body = await get(s, f"{base}/metrics", Authorization=f"Bearer {TOKEN}")
            assert status == 200
            assert b"streamdqn_up" in body
            status, _, _ = await get(s, f"{base}/healthz")
            assert status == 200
        # protect_metrics without a token has nothing to check against: metrics stay open.
        async with serving(store.root, protect_metrics=True) as base, aiohttp.ClientSession() as s:
            status, _, _ = await get(s, f"{base}/metrics")
            assert status == 200

    run(test)


async def raw_get(base: str, target: str) -> tuple[int, bytes]:
    """Send the request target byte for byte, bypassing any client-side URL normalization."""
    url = URL(base)
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        writer.write(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        response = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


ATTACKS = [
    "/snapshots/../outside/model.onnx",
    "/snapshots/%2e%2e/outside/model.onnx",
    "/snapshots/%2E%2E/%2E%2E/outside/model.onnx",
    "/snapshots/..%2Foutside/model.onnx",
    "/snapshots/..%2foutside%2fmodel.onnx/model.onnx",
    "/snapshots/1/..%2F..%2Foutside%2Fmodel.onnx",
    "/snapshots/1/%2e%2e%2f%2e%2e%2foutside%2fmodel.onnx",
    "/snapshots/latest/../../outside/model.onnx",
    "/snapshots/latest%2F..%2F..%2Foutside/model.onnx",
    "/snapshots/%2Ftmp/model.onnx",
    f"/snapshots/{10**30}/model.onnx",
    "/snapshots/1000000000000/model.onnx",  # 13 digits
    "/snapshots/-1/model.onnx",
    "/snapshots/+1/model.onnx",
    "/snapshots/01/model.onnx",
    "/snapshots/01x/model.onnx",
    "/snapshots/1_0/model.onnx",
    "/snapshots/0x1/model.onnx",
    "/snapshots/%201/model.onnx",
    "/snapshots/1%00/model.onnx",
    "/snapshots/%D9%A1/model.onnx",  # Arabic-Indic digit one (U+0661): int() reads it as 1
    "/snapshots/\u0661/model.onnx",  # the same, sent as raw UTF-8
    "/snapshots/%EF%BC%91/model.onnx",  # fullwidth digit one
    "/snapshots/%C2%B9/model.onnx",  # superscript one (isdigit() is True)
    "/snapshots/1/MODEL.ONNX",
    "/snapshots/1/model.onnx%00",
    "/snapshots/1/model.onnx/",
    "/snapshots/1/.",
    "/snapshots/1/%2e",
    "/snapshots/1/secret.txt",
    "/snapshots/latest/secret.txt",
    "/snapshots/1/model.onnx/../../../outside/model.onnx",
    "/snapshots//model.onnx",
    "/snapshots/outside-link/model.onnx",
]


def test_path_attacks_never_leave_the_store(store: SnapshotStore, tmp_path: Path) -> None:
    publish(store, 1)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "model.onnx").write_bytes(OUTSIDE_MARKER)
    (outside / "manifest.json").write_text(json.dumps({"sha256": "0" * 64, "m": OUTSIDE_MARKER.decode()}))
    (store.path_of(1) / "secret.txt").write_bytes(OUTSIDE_MARKER)
    # A planted symlink under a version-like name, and a non-canonical one.
    os.symlink(outside, store.root / "outside-link")
    os.symlink(outside, store.root / "5")

    async def test() -> None:
        async with serving(store.root) as base:
            for target in [*ATTACKS, "/snapshots/5/model.onnx", "/snapshots/5/manifest.json"]:
                status, body = await raw_get(base, target)
                assert status in (400, 404), (target, status)
                assert OUTSIDE_MARKER not in body, target
            # The same through a client that sends pre-encoded paths as they are.
            async with aiohttp.ClientSession() as s:
                for target in ATTACKS:
                    if not target.isascii():
                        continue
                    async with s.get(URL(base + target, encoded=True)) as r:
                        assert r.status in (400, 404), (target, r.status)
                        assert OUTSIDE_MARKER not in await r.read()
                # Control: the honest path still works.
                async with s.get(f"{base}/snapshots/1/model.onnx") as r:
                    assert r.status == 200
                    assert OUTSIDE_MARKER not in await r.read()

    run(test)


def test_signed_manifest_is_served_verbatim(store: SnapshotStore, tmp_path: Path) -> None:
    key = tmp_path / "hmac.key"
    key.write_bytes(b"0123456789abcdef0123456789abcdef")
    snap = publish(store, 1, signer=HmacSigner.from_file(key))

    async def test() -> None:
        async with serving(store.root) as base, aiohttp.ClientSession() as s:
            _, _, body = await get(s, f"{base}/snapshots/latest/manifest.json")
            assert json.loads(body)["signature"] == snap.manifest.as_dict()["signature"]

    run(test)


def test_many_concurrent_conditional_polls_all_get_304(store: SnapshotStore) -> None:
    publish(store, 1)

    async def test() -> None:
        async with serving(store.root) as base, aiohttp.ClientSession() as s:
            _, headers, _ = await get(s, f"{base}/snapshots/latest/manifest.json")
            results = await asyncio.gather(*(
                get(s, f"{base}/snapshots/latest/manifest.json", **{"If-None-Match": headers["ETag"]})
                for _ in range(200)
            ))
            assert {status for status, _, _ in results} == {304}

    run(test)


@pytest.mark.parametrize(
    ("header", "etag", "expected"),
    [('"a"', '"a"', True), ('W/"a"', '"a"', True), ("*", '"a"', True), ('"b", "a"', '"a"', True),
     ('"b"', '"a"', False), ("", '"a"', False), ('"a', '"a"', False)],
)
def test_etag_matching(header: str, etag: str, expected: bool) -> None:
    assert etag_matches(header, etag) is expected
