"""Channels over real HTTP on 127.0.0.1: routing by X-Sandbox-Id, pins, conditional GETs per channel,
the admin endpoints and their tokens, and changes (admin, CLI) served by the very next request."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from streamdqn.cli import main
from streamdqn.client.pull import pull
from streamdqn.errors import ConfigError
from streamdqn.serve.app import build_app, start_http, stop_http
from streamdqn.snapshots.channels import in_canary_share, read_history
from streamdqn.snapshots.store import SnapshotStore
from tests.factories import policy_info

pytestmark = pytest.mark.integration

TOKEN = "read-token-for-the-tests"
ADMIN = "admin-token-for-the-tests"
SANDBOXES = 2000


@asynccontextmanager
async def serving(root: Path, **options: Any) -> AsyncIterator[str]:
    app = build_app(snapshots_dir=root, render_metrics=lambda: (b"", "text/plain"), health=dict,
                    ready=lambda: (True, {}), **options)
    runner, port = await start_http(app, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await stop_http(runner)


def run(test: Callable[[], Any]) -> None:
    asyncio.run(test())


@pytest.fixture
def store(tmp_path: Path) -> SnapshotStore:
    s = SnapshotStore(tmp_path / "snapshots")
    s.publish(b"model one", policy_info(updates=1))
    s.publish(b"model two", policy_info(updates=2))
    s.publish(b"model three", policy_info(updates=3), channel="canary")
    return s  # stable 2 (rollback target 1), canary 3


async def latest(s: aiohttp.ClientSession, base: str, sandbox: str | None = None,
                 **headers: str) -> tuple[int, Any, bytes]:
    if sandbox is not None:
        headers["X-Sandbox-Id"] = sandbox
    async with s.get(f"{base}/snapshots/latest/manifest.json", headers=headers) as r:
        return r.status, r.headers, await r.read()


async def admin(s: aiohttp.ClientSession, base: str, action: str, body: Any = None,
                token: str | None = ADMIN) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    data = body if isinstance(body, bytes) else json.dumps(body if body is not None else {}).encode()
    async with s.post(f"{base}/admin/snapshots/{action}", data=data, headers=headers) as r:
        raw = await r.read()
        return r.status, json.loads(raw) if r.content_type == "application/json" else raw.decode()


def test_canary_share_follows_the_hash_and_the_fraction(store: SnapshotStore) -> None:
    ids = [f"sandbox-{i:05d}" for i in range(SANDBOXES)]

    async def test() -> None:
        async with serving(store.root, canary_fraction=0.1) as base, aiohttp.ClientSession() as s:
            answers = await asyncio.gather(*(latest(s, base, i) for i in ids))
            channels = Counter(h["X-Snapshot-Channel"] for _, h, _ in answers)
            share = channels["canary"] / SANDBOXES
            print(f"canary share over {SANDBOXES} sandbox ids at canary_fraction=0.1: {share:.4f}")
            assert abs(share - 0.1) < 0.02
            assert set(channels) == {"stable", "canary"}
            for sandbox, (status, headers, body) in zip(ids, answers, strict=True):
                assert status == 200
                expected = 3 if in_canary_share(sandbox, 0.1) else 2
                assert json.loads(body)["version"] == expected
                assert headers["X-Snapshot-Version"] == str(expected)
                assert headers["Vary"] == "X-Sandbox-Id"
            # Without the header: stable, whatever the fraction.
            status, headers, body = await latest(s, base)
            assert (status, headers["X-Snapshot-Channel"], json.loads(body)["version"]) == (200, "stable", 2)
        # A fraction of 0 (the default) sends nobody to the canary; no canary out: nobody either.
        async with serving(store.root) as base, aiohttp.ClientSession() as s:
            answers = await asyncio.gather(*(latest(s, base, i) for i in ids[:200]))
            assert {h["X-Snapshot-Channel"] for _, h, _ in answers} == {"stable"}
        store.demote()
        async with serving(store.root, canary_fraction=1.0) as base, aiohttp.ClientSession() as s:
            answers = await asyncio.gather(*(latest(s, base, i) for i in ids[:200]))
            assert {h["X-Snapshot-Channel"] for _, h, _ in answers} == {"stable"}

    run(test)


def test_conditional_gets_per_channel_and_pins(store: SnapshotStore) -> None:
    canary_id = next(f"sb-{i}" for i in range(1000) if in_canary_share(f"sb-{i}", 0.5))
    stable_id = next(f"sb-{i}" for i in range(1000) if not in_canary_share(f"sb-{i}", 0.5))

    async def test() -> None:
        async with serving(store.root, canary_fraction=0.5) as base, aiohttp.ClientSession() as s:
            _, stable_headers, _ = await latest(s, base, stable_id)
            _, canary_headers, _ = await latest(s, base, canary_id)
            assert stable_headers["ETag"] != canary_headers["ETag"]
            status, headers, _ = await latest(s, base, canary_id, **{"If-None-Match": canary_headers["ETag"]})
            assert (status, headers["X-Snapshot-Channel"]) == (304, "canary")
            # A sandbox moved to another channel gets the other manifest, not a 304.
            status, _, body = await latest(s, base, canary_id, **{"If-None-Match": stable_headers["ETag"]})
            assert (status, json.loads(body)["version"]) == (200, 3)

            store.pin(canary_id, 1)
            old_etag = {"If-None-Match": canary_headers["ETag"]}
            status, headers, body = await latest(s, base, canary_id, **old_etag)
            assert (status, headers["X-Snapshot-Channel"], json.loads(body)["version"]) == (200, "pinned", 1)
            status, headers, _ = await latest(s, base, canary_id, **{"If-None-Match": headers["ETag"]})
            assert (status, headers["X-Snapshot-Channel"]) == (304, "pinned")
            async with s.get(f"{base}/snapshots/latest/model.onnx", headers={"X-Sandbox-Id": canary_id}) as r:
                assert await r.read() == b"model one"
            status, _, body = await latest(s, base, "x" * 300)
            assert status == 400
            assert "sandbox id" in json.loads(body)["error"]

            async with s.get(f"{base}/snapshots/channels") as r:
                assert r.status == 200
                assert await r.json() == {"stable": 2, "canary": 3, "latest": 2, "previous_stable": 1,
                                          "pins": {canary_id: 1}, "stable_pin": None, "canary_fraction": 0.5}
            store.unpin(canary_id)
            status, headers, _ = await latest(s, base, canary_id)
            assert headers["X-Snapshot-Channel"] == "canary"

    run(test)


def test_admin_tokens_401_403_and_404_when_disabled(store: SnapshotStore) -> None:
    async def test() -> None:
        async with serving(store.root, token=TOKEN) as base, aiohttp.ClientSession() as s:
            status, _ = await admin(s, base, "demote", token=TOKEN)
            assert status == 404  # no admin token configured: no admin endpoints
        async with serving(store.root, token=TOKEN, admin_token=ADMIN) as base, aiohttp.ClientSession() as s:
            status, body = await admin(s, base, "demote", token=None)
            assert status == 401
            assert "missing" in body["error"]
            for wrong in (TOKEN, ADMIN + "x", ADMIN[:-1], "\u00e9t\u00e9"):
                status, body = await admin(s, base, "demote", token=wrong)
                assert status == 403, wrong
                assert ADMIN not in json.dumps(body)
            assert store.channels().canary == 3  # nothing changed
            status, body = await admin(s, base, "no-such-action")
            assert status == 404
            # The admin token opens admin only; reading still takes the read token.
            status, _, _ = await latest(s, base, Authorization=f"Bearer {ADMIN}")
            assert status == 401
            status, body = await admin(s, base, "demote", {"reason": "test"})
            assert status == 200
            assert body["channels"]["canary"] is None
    with pytest.raises(ValueError, match="must differ"):
        build_app(snapshots_dir=store.root, render_metrics=lambda: (b"", ""), health=dict,
                  ready=lambda: (True, {}), token=TOKEN, admin_token=TOKEN)
    with pytest.raises(ValueError, match="canary_fraction"):
        build_app(snapshots_dir=store.root, render_metrics=lambda: (b"", ""), health=dict,
                  ready=lambda: (True, {}), canary_fraction=1.5)

    run(test)


def test_admin_changes_are_served_by_the_next_request(store: SnapshotStore) -> None:
    async def test() -> None:
        async with serving(store.root, admin_token=ADMIN) as base, aiohttp.ClientSession() as s:
            _, before, _ = await latest(s, base, "sb-1")
            assert before["X-Snapshot-Version"] == "2"
            status, body = await admin(s, base, "promote", {"reason": "canary healthy"})
            assert status == 200, body
            assert (body["channels"]["stable"], body["channels"]["canary"]) == (3, None)
            status, headers, _ = await latest(s, base, "sb-1", **{"If-None-Match": before["ETag"]})
            assert (status, headers["X-Snapshot-Version"]) == (200, "3")

            status, body = await admin(s, base, "rollback", {})
            assert (status, body["channels"]["stable"]) == (200, 2)
            _, headers, _ = await latest(s, base, "sb-1")
            assert headers["X-Snapshot-Version"] == "2"
            status, body = await admin(s, base, "rollback", {"to": "3"})
            assert (status, body["channels"]["stable"]) == (200, 3)

            status, body = await admin(s, base, "pin", {"sandbox_id": "sb-1", "version": 1})
            assert status == 200
            _, headers, _ = await latest(s, base, "sb-1")
            assert (headers["X-Snapshot-Version"], headers["X-Snapshot-Channel"]) == ("1", "pinned")
            status, body = await admin(s, base, "unpin", {"sandbox_id": "sb-1"})
            assert (status, body["channels"]["pins"]) == (200, {})

            # Bad input: refused with a reason, nothing changed.
            before_log = (store.root / "channels.log").read_bytes()
            for action, bad, code, says in [
                ("pin", {"sandbox_id": "sb-1", "version": "\u0661"}, 400, "not a snapshot version"),
                ("pin", {"sandbox_id": "sb-1", "version": True}, 400, "not a snapshot version"),
                ("pin", {"sandbox_id": "sb-1", "version": "01"}, 400, "not a snapshot version"),
                ("pin", {"sandbox_id": "sb-1"}, 400, "needs"),
                ("pin", {"sandbox_id": "", "version": 1}, 400, "sandbox_id"),
                ("pin", {"sandbox_id": "sb-1", "version": 99}, 422, "does not exist"),
                ("rollback", {"to": 99}, 422, "does not exist"),
                ("promote", {"versoin": 2}, 400, "not ['versoin']"),
                ("promote", b"{not json", 400, "not valid JSON"),
                ("promote", [], 400, "JSON object"),
                ("promote", {}, 409, "no canary"),
                ("demote", {}, 409, "no canary"),
                ("unpin", {"sandbox_id": "sb-9"}, 409, "not pinned"),
            ]:
                status, body = await admin(s, base, action, bad)
                assert (status, says in body["error"]) == (code, True), (action, bad, body)
            assert (store.root / "channels.log").read_bytes() == before_log
        actors = {e.actor.split(" ")[0] for e in read_history(store.root) if e.action != "publish"}
        assert actors == {"http"}

    run(test)


def test_admin_pins_stable_refuses_rollback_while_pinned_and_unpins(store: SnapshotStore) -> None:
    async def test() -> None:
        async with serving(store.root, admin_token=ADMIN, canary_fraction=1.0) as base, \
                aiohttp.ClientSession() as s:
            _, before, _ = await latest(s, base)
            status, body = await admin(s, base, "pin", {"version": 1, "reason": "incident"})
            assert status == 200, body
            channels = body["channels"]
            assert (channels["stable"], channels["stable_pin"], body["sandbox_id"]) == (1, 1, None)
            status, headers, answer = await latest(s, base, **{"If-None-Match": before["ETag"]})
            assert (status, headers["X-Snapshot-Channel"]) == (200, "stable")
            assert json.loads(answer)["version"] == 1
            async with s.get(f"{base}/snapshots/channels") as r:
                listed = await r.json()
            assert (listed["stable"], listed["stable_pin"], listed["canary"]) == (1, 1, 3)

            before_log = (store.root / "channels.log").read_bytes()
            for action, body_sent, code, says in [
                ("rollback", {}, 409, "stable is pinned to 1"),
                ("rollback", {"to": 2}, 409, "stable is pinned to 1"),
                ("promote", {}, 409, "stable is pinned to 1"),
                ("pin", {"version": 99}, 422, "does not exist"),
                ("pin", {}, 400, "needs"),
                ("pin", {"version": "01"}, 400, "not a snapshot version"),
            ]:
                status, answer_body = await admin(s, base, action, body_sent)
                assert (status, says in answer_body["error"]) == (code, True), (action, answer_body)
            (store.path_of(2) / "model.onnx").write_bytes(b"tampered")
            status, answer_body = await admin(s, base, "pin", {"version": 2})
            assert (status, "corrupt" in answer_body["error"]) == (422, True)
            assert (store.root / "channels.log").read_bytes() == before_log
            assert (store.channels().stable, store.channels().stable_pin) == (1, 1)

            # The canary can still be taken out; unpin releases stable, and a second unpin is a 409.
            status, answer_body = await admin(s, base, "demote", {})
            assert (status, answer_body["channels"]["stable_pin"]) == (200, 1)
            status, answer_body = await admin(s, base, "unpin", {"reason": "resolved"})
            channels = answer_body["channels"]
            assert (status, channels["stable_pin"], channels["stable"]) == (200, None, 1)
            status, answer_body = await admin(s, base, "unpin", {})
            assert (status, "not pinned" in answer_body["error"]) == (409, True)
        pins = [(e.action, e.version, e.from_version, e.reason) for e in read_history(store.root)
                if e.channel == "stable" and e.action in ("pin", "unpin")]
        assert pins == [("pin", 1, 2, "incident"), ("unpin", None, 1, "resolved")]

    run(test)


def test_cli_change_and_pull_with_a_sandbox_id(store: SnapshotStore, tmp_path: Path) -> None:
    out = tmp_path / "sandbox"

    async def test() -> None:
        async with serving(store.root, canary_fraction=0.0) as base:
            result = await asyncio.to_thread(pull, base, out, sandbox_id="sb-7", timeout=10)
            assert (result.version, result.channel, result.changed) == (2, "stable", True)
            assert main(["snapshots", "pin", "1", "--sandbox-id", "sb-7", "--dir", str(store.root)]) == 0
            result = await asyncio.to_thread(pull, base, out, sandbox_id="sb-7", timeout=10)
            assert (result.version, result.channel, result.changed) == (1, "pinned", True)
            assert (out / "model.onnx").read_bytes() == b"model one"
            result = await asyncio.to_thread(pull, base, out, sandbox_id="sb-7", timeout=10)
            assert (result.changed, result.channel) == (False, "pinned")
            # Another sandbox (or none) is not affected by sb-7's pin.
            other = await asyncio.to_thread(pull, base, tmp_path / "other", sandbox_id="sb-8", timeout=10)
            assert (other.version, other.channel) == (2, "stable")
            # The command line too (in a thread: the server answers on this event loop).
            argv = ["pull", "--url", base, "--out", str(out), "--sandbox-id", "sb-7"]
            assert await asyncio.to_thread(main, argv) == 0

    run(test)
    with pytest.raises(ConfigError, match="sandbox-id"):
        pull("http://127.0.0.1:9", out, sandbox_id="bad\tid")
