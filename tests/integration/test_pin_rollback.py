"""Pin and rollback under load: the daemon as a subprocess on the real broker ingests and publishes (a
new canary every second) while `streamdqn snapshots pin|unpin|rollback` and the admin endpoint change
stable. Each change is served by the running daemon, holds against the publishing, survives a restart,
and a SIGKILL of the command (at random moments) or of the daemon (while it publishes) leaves a valid
stable: its version exists and its model matches its manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from streamdqn.snapshots.channels import read_channels, read_history
from streamdqn.snapshots.store import SnapshotStore
from tests.integration.conftest import FAST, DaemonProcess, Topics, encode_events, produce, sim_events

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ADMIN = "admin-token-for-pin-tests"
SERVED_WITHIN = 10.0  # generous bound on waiting; what is observed is printed
CLI_KILLS = 6


@contextmanager
def traffic(topics: Topics) -> Iterator[None]:
    """Sandboxes keep sending episodes (a few every 0.3 s) until the block ends."""
    stop = threading.Event()

    def send() -> None:
        batch = 0
        while not stop.is_set():
            batch += 1
            episodes: list[dict[str, Any]] = sim_events(3, seed=1000 + batch)
            events = [{**e, "episode_id": int(e["episode_id"]) + 1000 * batch} for e in episodes]
            produce(topics.bootstrap, topics.telemetry, encode_events(events))
            stop.wait(0.3)

    thread = threading.Thread(target=send, name="sandboxes", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=30)


def get_json(daemon: DaemonProcess, path: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(daemon.get(path))
    return result


def newest(daemon: DaemonProcess) -> int:
    return max(get_json(daemon, "/snapshots")["versions"], default=0)


def admin(daemon: DaemonProcess, action: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(f"{daemon.url}/admin/snapshots/{action}", data=json.dumps(body).encode(),
                                     headers={"Authorization": f"Bearer {ADMIN}"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def cli_argv(state_dir: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "streamdqn", "snapshots", *args, "--state-dir", str(state_dir)]


def cli(state_dir: Path, *args: str) -> str:
    done = subprocess.run(cli_argv(state_dir, *args), capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def wait_served(daemon: DaemonProcess, stable: int, pinned: int | None) -> float:
    """Seconds until both the channel listing and what a sandbox pulls say stable is `stable`."""
    started = time.monotonic()

    def served() -> bool:
        channels = get_json(daemon, "/snapshots/channels")
        manifest = get_json(daemon, "/snapshots/latest/manifest.json")
        return (channels["stable"], channels["stable_pin"], manifest["version"]) == (stable, pinned, stable)

    daemon.wait_for(served, SERVED_WITHIN, f"stable {stable} (pinned: {pinned}) served")
    return time.monotonic() - started


def wait_publishes(daemon: DaemonProcess, count: int) -> None:
    target = newest(daemon) + count
    daemon.wait_for(lambda: newest(daemon) >= target, 60, f"{count} more published versions")


def assert_valid_stable(root: Path, daemon: DaemonProcess | None) -> int:
    """Stable exists and verifies on disk; a pin, if any, is what stable serves; the daemon serves it."""
    record = read_channels(root)
    assert record.stable is not None
    SnapshotStore(root).verify(record.stable)  # exists, manifest readable, model matches its sha256
    assert record.stable_pin in (None, record.stable)
    if daemon is not None:
        manifest = get_json(daemon, "/snapshots/latest/manifest.json")
        model = daemon.get(f"/snapshots/{manifest['version']}/model.onnx")
        assert (manifest["version"], hashlib.sha256(model).hexdigest()) == (record.stable, manifest["sha256"])
    return record.stable


def test_pin_and_rollback_under_load_survive_restarts_and_sigkill(topics: Topics, make_daemon: Any) -> None:
    daemon: DaemonProcess = make_daemon(
        topics, publish={"interval_seconds": 1.0, "min_updates": 10, "gate": False, "keep": 200},
        rollout={"canary_fraction": 0.5, "check_interval_seconds": 0.5},
        http={"admin_token": ADMIN}, **FAST)
    root = daemon.state_dir / "snapshots"
    seconds: list[float] = []
    with traffic(topics):
        daemon.start()
        daemon.wait_for(lambda: newest(daemon) >= 3, 90, "three published versions")
        first = get_json(daemon, "/snapshots/channels")
        assert first["stable"] == 1  # the first version went to stable, the others to the canary
        assert first["canary"] not in (None, 1)

        # Pin by command: stable moves to 2 and stays there while canaries keep arriving.
        out = cli(daemon.state_dir, "pin", "2", "--reason", "hold for the incident")
        assert "stable pinned to 2" in out
        seconds.append(wait_served(daemon, 2, 2))
        daemon.wait_for(lambda: daemon.metric('streamdqn_channel_version{channel="stable"}') == 2,
                        SERVED_WITHIN, "the stable gauge at 2")
        wait_publishes(daemon, 1)
        assert get_json(daemon, "/snapshots/channels")["stable"] == 2
        assert assert_valid_stable(root, daemon) == 2
        # Pin again through the admin endpoint: the pin moves; a rollback is refused while pinned.
        status, body = admin(daemon, "pin", {"version": 3})
        assert (status, body["channels"]["stable_pin"]) == (200, 3), body
        seconds.append(wait_served(daemon, 3, 3))
        status, body = admin(daemon, "rollback", {})
        assert (status, "stable is pinned to 3" in body["error"]) == (409, True), body

        # SIGTERM, start again: still pinned (the final publish went to the canary).
        daemon.stop()
        daemon.start()
        wait_served(daemon, 3, 3)

        # Unpin by command, roll back through the admin endpoint (3 -> 2, the stable before it) and
        # by command to a named version.
        cli(daemon.state_dir, "unpin")
        seconds.append(wait_served(daemon, 3, None))
        status, body = admin(daemon, "rollback", {"reason": "3 misbehaves"})
        assert (status, body["channels"]["stable"]) == (200, 2), body
        seconds.append(wait_served(daemon, 2, None))
        target = max(spare_versions(root))
        assert f"to {target}" in cli(daemon.state_dir, "rollback", "--to", str(target))
        seconds.append(wait_served(daemon, target, None))

        # SIGTERM, start again: still rolled back, and each rollback abandoned the version it left.
        daemon.stop()
        daemon.start()
        wait_served(daemon, target, None)
        assert get_json(daemon, "/snapshots/channels")["previous_stable"] == 1
        print(f"pin/rollback: served {max(seconds):.3f} s after the change at most "
              f"({', '.join(f'{s:.3f}' for s in seconds)})")

        kill_commands_at_random(daemon, root)

        # SIGKILL the daemon at a random moment of its publishing: stable and the canary stay valid.
        wait_publishes(daemon, 1)
        time.sleep(random.Random().uniform(0.0, 1.0))
        assert daemon.process is not None
        daemon.process.send_signal(signal.SIGKILL)
        daemon.process.wait(timeout=10)
    assert_valid_stable(root, None)
    canary = read_channels(root).canary
    assert canary is not None
    SnapshotStore(root).verify(canary)


def spare_versions(root: Path) -> list[int]:
    """Published versions that neither stable nor the canary serves."""
    record = read_channels(root)
    return [v for v in SnapshotStore(root).versions() if v not in (record.stable, record.canary)]


def operator_state(root: Path) -> tuple[int | None, int | None, int]:
    """What a pin or rollback changes: stable, its pin, and how many of them the history logged."""
    record = read_channels(root)
    return record.stable, record.stable_pin, sum(e.action in ("pin", "rollback") for e in read_history(root))


# The real CLI entry point, started ahead and held at a line of stdin, so that a kill can be aimed at
# the change itself rather than at the interpreter starting.
HELD_CLI = """
import json, sys
import streamdqn.learning.settings, streamdqn.snapshots.rollout_cli  # what main() imports as it runs
from streamdqn.cli import main
print("ready", flush=True)
sys.exit(main(json.loads(sys.stdin.readline())))
"""


def held_cli() -> subprocess.Popen[bytes]:
    """`streamdqn` with its imports done, waiting for its arguments on stdin."""
    return subprocess.Popen([sys.executable, "-c", HELD_CLI], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)


def go(process: subprocess.Popen[bytes], state_dir: Path, *args: str) -> None:
    assert process.stdin is not None
    assert process.stdout is not None
    assert process.stdout.readline() == b"ready\n"
    process.stdin.write(json.dumps(cli_argv(state_dir, *args)[3:]).encode() + b"\n")
    process.stdin.flush()


def reap(process: subprocess.Popen[bytes]) -> int:
    returncode = process.wait(timeout=30)
    for stream in (process.stdin, process.stdout):
        if stream is not None:
            stream.close()
    return returncode


def kill_commands_at_random(daemon: DaemonProcess, root: Path) -> None:
    """SIGKILL `snapshots pin` and `snapshots rollback --to` at a random moment of the change (drawn
    over 1.2 times what one change took, go to exit); the tally says where the kills landed."""
    rng = random.Random()
    if read_channels(root).stable_pin is not None:
        SnapshotStore(root).unpin_stable(actor="test")
    probe, *held = [held_cli() for _ in range(CLI_KILLS + 1)]  # their interpreters start side by side
    go(probe, daemon.state_dir, "rollback", "--to", str(rng.choice(spare_versions(root))))
    started = time.monotonic()
    assert reap(probe) == 0
    full = time.monotonic() - started
    tally = {"before the change": 0, "mid-change (not logged)": 0, "after the change": 0, "completed": 0}
    for i, process in enumerate(held):
        if read_channels(root).stable_pin is not None:
            SnapshotStore(root).unpin_stable(actor="test")  # else the rollbacks would be refused
        before = operator_state(root)
        version = str(rng.choice(spare_versions(root)))
        go(process, daemon.state_dir, *(("pin", version) if i % 2 == 0 else ("rollback", "--to", version)))
        time.sleep(rng.uniform(0.0, 1.2) * full)
        os.kill(process.pid, signal.SIGKILL)
        returncode = reap(process)
        assert returncode in (0, -signal.SIGKILL)
        after = operator_state(root)
        if returncode == 0:
            tally["completed"] += 1
        elif after == before:
            tally["before the change"] += 1
        elif after[2] == before[2]:
            tally["mid-change (not logged)"] += 1
        else:
            tally["after the change"] += 1
        assert_valid_stable(root, daemon)
    print(f"SIGKILL of {CLI_KILLS} pin/rollback commands (a change takes ~{full * 1000:.0f} ms): {tally}")
