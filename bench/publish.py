"""Publish: snapshot export/check/parity/publish latency, and a 304 `pull` against a real server.

Part 1, the daemon's default network (MLP 30-256-256-5 with baked-in normalization), the probe
the daemon uses (64 rows), medians of N calls:

    export_onnx              torch -> ONNX bytes (TorchScript exporter); the first call separately
    onnx.checker             check_model(full_check=True) alone
    onnxruntime session      InferenceSession creation alone
    check_onnx               checker + session + parity run vs torch (what publish_snapshot runs)
    SnapshotStore.publish    version directory, two fsynced files, rename, `latest` symlink, prune
    publish_snapshot         all of the above, end to end

Part 2, HTTP on loopback against server.build_app/start_http (aiohttp, in a thread of this
process) with a published snapshot; every call opens a new connection, as a sandbox's poll does:

    pull() 304               pull.pull when nothing changed: conditional GET + local sha256 check
    conditional GET 304      the same request with urllib alone, no local check
    GET model.onnx           plain GET of the model file from the streamdqn server (reference)
    GET model.onnx (static)  the same file from the standard library's http.server (reference)
    pull() 200               first pull into an empty directory: manifest, model, verify, install

    python bench/publish.py [--smoke]
No target is set by the issue for these; the ratios to the plain GET are reported. The last line is
one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import http.server
import shutil
import statistics
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import onnx
import onnxruntime as ort
import torch
from _common import emit, header, ratio, table

from streamdqn.client.pull import pull
from streamdqn.learning.model import QNetwork
from streamdqn.serve.app import build_app, start_http, stop_http
from streamdqn.snapshots.export import Provenance, check_onnx, describe_policy, export_onnx, publish_snapshot
from streamdqn.snapshots.store import SnapshotStore
from streamdqn.stream.features import FEATURE_DIM
from streamdqn.stream.rewards import RewardTable
from streamdqn.stream.wire import Action

T = TypeVar("T")


def default_network() -> tuple[QNetwork, np.ndarray]:
    torch.manual_seed(0)
    q = QNetwork(FEATURE_DIM, len(Action), (256, 256))
    q.set_normalization(np.full(FEATURE_DIM, 0.5), np.full(FEATURE_DIM, 2.0), 10.0)
    # The probe the daemon's Publisher checks parity on.
    probe = np.random.default_rng(0).normal(size=(64, FEATURE_DIM)).astype(np.float32) * 3
    return q.eval(), probe


def interleaved_latency(candidates: dict[str, Callable[[], object]], calls: int) -> dict[str, float]:
    """Median seconds per call; one call of each candidate in turn, `calls` turns."""
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for fn in candidates.values():
        fn()  # warm-up
    for _ in range(calls):
        for name, fn in candidates.items():
            started = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - started)
    return {name: statistics.median(v) for name, v in samples.items()}


class LoopThread:
    """An asyncio loop in a background thread, so that synchronous clients can call its server."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="bench-http", daemon=True)
        self._thread.start()

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


def snapshot_latency(root: Path, repeats: int) -> dict[str, float]:
    q, probe = default_network()
    store = SnapshotStore(root / "snapshots", keep=5)
    started = time.perf_counter()
    model = export_onnx(q)
    first_export = time.perf_counter() - started
    provenance = Provenance()
    info = describe_policy(q, provenance, RewardTable())
    out = {
        "export_onnx (first call)": first_export,
        **interleaved_latency(
            {
                "export_onnx": lambda: export_onnx(q),
                "onnx.checker (full_check)": lambda: onnx.checker.check_model(
                    onnx.load_from_string(model), full_check=True
                ),
                "onnxruntime session": lambda: ort.InferenceSession(
                    model, providers=["CPUExecutionProvider"]
                ),
                "check_onnx (checker + session + parity)": lambda: check_onnx(model, q, probe),
                "SnapshotStore.publish (fsync, rename, symlink)": lambda: store.publish(model, info),
                "publish_snapshot (end to end)": lambda: publish_snapshot(store, q, probe, provenance),
            },
            repeats,
        ),
    }
    out["model_bytes"] = float(len(model))
    return out


def http_latency(root: Path, calls: int) -> dict[str, float]:
    q, probe = default_network()
    store = SnapshotStore(root / "served", keep=5)
    snapshot = publish_snapshot(store, q, probe, Provenance())
    loop = LoopThread()
    app = build_app(
        snapshots_dir=store.root,
        render_metrics=lambda: (b"", "text/plain"),
        health=lambda: {},
        ready=lambda: (True, {}),
    )
    runner, port = loop.call(start_http(app, "127.0.0.1", 0))
    static = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0),
        functools.partial(_QuietHandler, directory=str(snapshot.path)),
    )
    static_thread = threading.Thread(target=static.serve_forever, name="bench-static", daemon=True)
    static_thread.start()
    base = f"http://127.0.0.1:{port}"
    static_url = f"http://127.0.0.1:{static.server_address[1]}/model.onnx"
    try:
        local = root / "pulled"
        first = pull(base, local)
        assert first.changed
        etag = (local / ".etag").read_text().strip()

        def conditional_get() -> None:
            request = urllib.request.Request(
                base + "/snapshots/latest/manifest.json", headers={"If-None-Match": etag}
            )
            try:
                urllib.request.urlopen(request, timeout=10).read()
                raise RuntimeError("expected 304")
            except urllib.error.HTTPError as exc:
                exc.close()
                if exc.code != 304:
                    raise

        def get(url: str) -> None:
            with urllib.request.urlopen(url, timeout=10) as response:
                response.read()

        def pull_304() -> None:
            if pull(base, local).changed:
                raise RuntimeError("expected an unchanged snapshot")

        fresh = iter(range(10**9))

        def pull_200() -> None:
            target = root / f"fresh-{next(fresh)}"
            pull(base, target)
            shutil.rmtree(target)

        out = interleaved_latency(
            {
                "pull() 304": pull_304,
                "conditional GET 304 (urllib only)": conditional_get,
                "GET model.onnx (streamdqn server)": functools.partial(
                    get, f"{base}/snapshots/{snapshot.version}/model.onnx"
                ),
                "GET model.onnx (stdlib http.server)": functools.partial(get, static_url),
                "pull() 200 (empty directory)": pull_200,
            },
            calls,
        )
    finally:
        static.shutdown()
        static.server_close()
        loop.call(stop_http(runner))
        loop.close()
    return out


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def run(smoke: bool) -> dict[str, Any]:
    repeats, calls = (3, 10) if smoke else (20, 200)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench-publish-") as tmp, warnings.catch_warnings():
        # snapshots.py picks the TorchScript exporter on purpose (~7 ms vs ~1 s); torch deprecates it.
        warnings.simplefilter("ignore", DeprecationWarning)
        snap = snapshot_latency(Path(tmp), repeats)
        web = http_latency(Path(tmp), calls)
    model_bytes = snap.pop("model_bytes")
    table(
        ["step", "median ms"],
        [[k, v * 1e3] for k, v in snap.items()],
        title=f"snapshot of the default network ({model_bytes / 1024:.0f} KiB ONNX), median of {repeats}",
    )
    reference = web["GET model.onnx (streamdqn server)"]
    table(
        ["request (new connection each)", "median ms", "vs GET model.onnx"],
        [[k, v * 1e3, ratio(v, reference)] for k, v in web.items()],
        title=f"HTTP on loopback, median of {calls} interleaved calls",
    )
    return {
        "bench": "publish",
        "smoke": smoke,
        "repeats": repeats,
        "http_calls": calls,
        "model_bytes": model_bytes,
        "snapshot_ms": {k: v * 1e3 for k, v in snap.items()},
        "http_ms": {k: v * 1e3 for k, v in web.items()},
        "pull_304_vs_plain_get": ratio(web["pull() 304"], reference),
        "pull_304_vs_static_get": ratio(web["pull() 304"], web["GET model.onnx (stdlib http.server)"]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes for CI")
    args = parser.parse_args(argv)
    header("publish", args.smoke, "snapshot export/check/publish latency and pull round trips")
    emit(run(args.smoke))
    return 0


if __name__ == "__main__":
    sys.exit(main())
