"""`pull` against a real server on loopback: install, 304, new versions, tampering, signatures, errors."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import onnxruntime as ort
import pytest
from aiohttp import web

from streamdqn.client.pull import PullResult, format_pull_result, pull
from streamdqn.errors import ConfigError, SnapshotError, SnapshotVerifyError
from streamdqn.serve.app import build_app, start_http, stop_http
from streamdqn.snapshots.signing import (
    Ed25519Signer,
    Ed25519Verifier,
    HmacSigner,
    HmacVerifier,
    generate_ed25519_keypair,
)
from streamdqn.snapshots.store import Snapshot, SnapshotStore, sha256_hex
from tests.factories import publish_small

pytestmark = pytest.mark.integration

OBS_DIM, N_ACTIONS = 30, 5
TOKEN = "pull-test-token-0123"
T = TypeVar("T")


publish = publish_small


class LoopThread:
    """An event loop in a background thread, so the synchronous `pull` can talk to a real aiohttp server."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-http", daemon=True)
        self._thread.start()

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=30)
        self.loop.run_until_complete(self.loop.shutdown_default_executor())
        self.loop.close()


@contextmanager
def serving_app(app: web.Application) -> Iterator[str]:
    loops = LoopThread()
    try:
        runner, port = loops.call(start_http(app, "127.0.0.1", 0))
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            loops.call(stop_http(runner))
    finally:
        loops.close()


@contextmanager
def serving(root: Path, **options: Any) -> Iterator[str]:
    app = build_app(snapshots_dir=root, render_metrics=lambda: (b"", "text/plain"), health=dict,
                    ready=lambda: (True, {}), **options)
    with serving_app(app) as base:
        yield base


@pytest.fixture
def store(tmp_path: Path) -> SnapshotStore:
    return SnapshotStore(tmp_path / "server" / "snapshots")


@pytest.fixture
def out(tmp_path: Path) -> Path:
    return tmp_path / "sandbox" / "policy"


def local_state(out: Path) -> dict[str, bytes]:
    """Every file in the sandbox's directory (temp leftovers included), by name."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())} if out.exists() else {}


def assert_installed(out: Path, snap: Snapshot, result: PullResult) -> None:
    assert result.version == snap.version
    assert result.sha256 == snap.manifest.sha256
    model = (out / "model.onnx").read_bytes()
    assert model == (snap.path / "model.onnx").read_bytes()
    assert sha256_hex(model) == result.sha256
    assert (out / "manifest.json").read_bytes() == (snap.path / "manifest.json").read_bytes()
    assert sorted(local_state(out)) == [".etag", "manifest.json", "model.onnx"]  # no temp leftovers


def test_pull_installs_then_304_then_new_version(store: SnapshotStore, out: Path) -> None:
    first = publish(store, 1)
    with serving(store.root) as base:
        result = pull(base + "/", out, timeout=10)  # a trailing slash is fine
        assert result.changed
        assert result.signature is None
        assert_installed(out, first, result)
        assert format_pull_result(result).startswith(f"pulled snapshot 1 into {out}")

        stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
        again = pull(base, out, timeout=10)
        assert not again.changed
        assert again.version == 1
        assert again.sha256 == first.manifest.sha256
        assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps  # nothing rewritten
        assert "is current" in format_pull_result(again)

        second = publish(store, 2)
        assert second.manifest.sha256 != first.manifest.sha256
        result = pull(base, out, timeout=10)
        assert result.changed
        assert_installed(out, second, result)


def test_a_damaged_local_copy_is_downloaded_again(store: SnapshotStore, out: Path) -> None:
    snap = publish(store, 1)
    with serving(store.root) as base:
        pull(base, out, timeout=10)
        (out / "model.onnx").write_bytes(b"truncated")
        result = pull(base, out, timeout=10)
        assert result.changed
        assert_installed(out, snap, result)
        (out / "manifest.json").unlink()
        assert pull(base, out, timeout=10).changed
        assert_installed(out, snap, result)


def test_the_pulled_model_runs_in_onnxruntime(store: SnapshotStore, out: Path) -> None:
    publish(store, 3)
    with serving(store.root) as base:
        pull(base, out, timeout=10)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    features = np.random.default_rng(0).normal(size=(7, OBS_DIM)).astype(np.float32)
    q_values, action = session.run(["q_values", "action"], {"features": features})
    assert q_values.shape == (7, N_ACTIONS)
    assert np.isfinite(q_values).all()
    assert np.array_equal(action, q_values.argmax(axis=1))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["onnx"]["inputs"]["features"] == ["N", OBS_DIM]


def test_a_tampered_model_on_the_server_is_refused(store: SnapshotStore, out: Path) -> None:
    first = publish(store, 1)
    with serving(store.root) as base:
        pull(base, out, timeout=10)
        before = local_state(out)
        second = publish(store, 2)
        model = bytearray((second.path / "model.onnx").read_bytes())
        model[len(model) // 2] ^= 0xFF  # one flipped byte, in place, before the server first reads v2
        (second.path / "model.onnx").write_bytes(bytes(model))
        with pytest.raises(SnapshotVerifyError, match=r"snapshot 2 .*sha256 .* does not match"):
            pull(base, out, timeout=10)
        assert local_state(out) == before  # the previous copy, byte for byte, and no temp files
        assert json.loads(before["manifest.json"])["version"] == first.version


Keys = tuple[Ed25519Signer | HmacSigner, Ed25519Verifier | HmacVerifier]


def _keys(algorithm: str, where: Path) -> Keys:
    """A fresh key pair (or HMAC secret) in files under `where`, loaded as the daemon and a sandbox would."""
    where.mkdir(parents=True, exist_ok=True)
    if algorithm == "ed25519":
        private, public = where / "sign.pem", where / "sign.pub"
        generate_ed25519_keypair(private, public)
        return Ed25519Signer.from_pem_file(private), Ed25519Verifier.from_pem_file(public)
    (where / "hmac.key").write_bytes(os.urandom(32).hex().encode())
    return HmacSigner.from_file(where / "hmac.key"), HmacVerifier.from_file(where / "hmac.key")


@pytest.mark.parametrize("algorithm", ["ed25519", "hmac-sha256"])
def test_signed_snapshots_verify_and_tampered_manifests_are_refused(
    algorithm: str, store: SnapshotStore, out: Path, tmp_path: Path
) -> None:
    signer, verifier = _keys(algorithm, tmp_path)
    first = publish(store, 1, signer=signer)
    with serving(store.root) as base:
        result = pull(base, out, verifier=verifier, timeout=10)
        assert result.changed
        assert result.signature == algorithm
        assert_installed(out, first, result)
        assert f"{algorithm} signature verified" in format_pull_result(result)
        assert pull(base, out, verifier=verifier, timeout=10).signature == algorithm  # 304, still verified
        before = local_state(out)

        # The attack a signature exists for: swap in another (valid, loadable) model and fix up the
        # manifest's sha256 so that the hash check alone would pass.
        second = publish(store, 2, signer=signer)
        evil_model = (publish(SnapshotStore(tmp_path / "evil"), 66).path / "model.onnx").read_bytes()
        manifest = json.loads((second.path / "manifest.json").read_bytes())
        manifest["sha256"] = sha256_hex(evil_model)
        (second.path / "model.onnx").write_bytes(evil_model)
        (second.path / "manifest.json").write_text(json.dumps(manifest, indent=2))
        with pytest.raises(SnapshotVerifyError, match=f"snapshot 2: bad {algorithm} signature"):
            pull(base, out, verifier=verifier, timeout=10)
        assert local_state(out) == before

        # A plain edit of one field, model untouched.
        third = publish(store, 3, signer=signer)
        manifest = json.loads((third.path / "manifest.json").read_bytes())
        manifest["updates"] += 1
        (third.path / "manifest.json").write_text(json.dumps(manifest, indent=2))
        with pytest.raises(SnapshotVerifyError, match=f"bad {algorithm} signature"):
            pull(base, out, verifier=verifier, timeout=10)
        assert local_state(out) == before

        # Stripping the signature does not help either.
        fourth = publish(store, 4, signer=signer)
        manifest = json.loads((fourth.path / "manifest.json").read_bytes())
        del manifest["signature"]
        (fourth.path / "manifest.json").write_text(json.dumps(manifest, indent=2))
        with pytest.raises(SnapshotVerifyError, match="not signed"):
            pull(base, out, verifier=verifier, timeout=10)
        assert local_state(out) == before


def test_unsigned_or_foreign_signed_snapshots_are_refused_when_verifying(
    store: SnapshotStore, out: Path, tmp_path: Path
) -> None:
    _, verifier = _keys("ed25519", tmp_path / "ours")
    publish(store, 1)
    with serving(store.root) as base:
        with pytest.raises(SnapshotVerifyError, match="snapshot 1 is not signed"):
            pull(base, out, verifier=verifier, timeout=10)
        assert local_state(out) == {}
        # Signed, but by someone else's key, or with the other algorithm.
        other_signer, _ = _keys("ed25519", tmp_path / "theirs")
        publish(store, 2, signer=other_signer)
        with pytest.raises(SnapshotVerifyError, match="bad ed25519 signature"):
            pull(base, out, verifier=verifier, timeout=10)
        hmac_signer, _ = _keys("hmac-sha256", tmp_path / "hmac")
        publish(store, 3, signer=hmac_signer)
        with pytest.raises(SnapshotVerifyError, match="signed with 'hmac-sha256'"):
            pull(base, out, verifier=verifier, timeout=10)
        assert local_state(out) == {}
        # Without a verifier a signed snapshot is still pulled (its signature unchecked).
        assert pull(base, out, timeout=10).signature is None


def test_token(store: SnapshotStore, out: Path) -> None:
    snap = publish(store, 1)
    with serving(store.root, token=TOKEN) as base:
        with pytest.raises(SnapshotError, match=r"bearer token is required \(401\).*--token-file"):
            pull(base, out, timeout=10)
        with pytest.raises(SnapshotError, match=r"bearer token rejected \(401\)") as info:
            pull(base, out, token="wrong-token", timeout=10)
        assert "wrong-token" not in str(info.value)
        assert local_state(out) == {}
        result = pull(base, out, token=TOKEN + "\n", timeout=10)  # as read from a token file
        assert_installed(out, snap, result)
        assert not pull(base, out, token=TOKEN, timeout=10).changed
    with pytest.raises(ConfigError, match="control characters"):
        pull(base, out, token="a\r\nX-Injected: 1", timeout=10)


def test_clear_errors_for_unreachable_empty_and_wrong_servers(store: SnapshotStore, out: Path) -> None:
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(SnapshotError, match="connection refused; is the streamdqn daemon running"):
        pull(f"http://127.0.0.1:{port}", out, timeout=10)

    with serving(store.root) as base, pytest.raises(SnapshotError, match=r"no snapshot published yet"):
        pull(base, out, timeout=10)
    assert local_state(out) == {}

    for bad in ("file:///etc/passwd", "127.0.0.1:8765", "ftp://host/x", "http://host:1/?q=1"):
        with pytest.raises(ConfigError, match="snapshot server URL"):
            pull(bad, out, timeout=10)


def test_redirects_are_not_followed(out: Path) -> None:
    # urllib would otherwise resend the Authorization header to wherever the redirect points.
    async def moved(request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound("http://127.0.0.1:1/elsewhere")

    app = web.Application()
    app.router.add_get("/snapshots/latest/manifest.json", moved)
    with serving_app(app) as base, pytest.raises(SnapshotError, match=r"redirected \(302\)"):
        pull(base, out, token=TOKEN, timeout=10)


def test_a_manifest_that_is_not_a_snapshot_manifest_is_refused(out: Path) -> None:
    bodies = iter([b"<html>", b"[1]", json.dumps({"version": True, "sha256": "0" * 64}).encode(),
                   json.dumps({"version": 10**30, "sha256": "0" * 64}).encode(),
                   json.dumps({"version": 1, "sha256": "../x"}).encode()])

    async def manifest(request: web.Request) -> web.StreamResponse:
        return web.Response(body=next(bodies), content_type="application/json")

    app = web.Application()
    app.router.add_get("/snapshots/latest/manifest.json", manifest)
    with serving_app(app) as base:
        for expected in ("not valid JSON", "not a JSON object", "no valid version", "no valid version",
                         "no valid sha256"):
            with pytest.raises(SnapshotVerifyError, match=expected):
                pull(base, out, timeout=10)
    assert local_state(out) == {}
