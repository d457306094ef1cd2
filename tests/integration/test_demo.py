"""`streamdqn demo`: the README's one command, shortened, as a user runs it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def test_demo_runs_learns_publishes_and_stops_everything(tmp_path: Path) -> None:
    state = tmp_path / "state"
    done = subprocess.run(
        [sys.executable, "-m", "streamdqn", "demo", "--duration", "15", "--rate", "300", "--port", "0",
         "--publish-interval", "3", "--state-dir", str(state), "--quiet"],
        capture_output=True, text=True, timeout=150, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "/metrics" in done.stdout
    assert "/snapshots" in done.stdout
    summary = re.search(r"produced (\d+) events; ingested (\d+); updates (\d+); latest snapshot (\d+)",
                        done.stdout)
    assert summary, done.stdout + done.stderr
    produced, ingested, updates, snapshot = map(int, summary.groups())
    assert produced > 1000
    assert ingested > 0
    assert updates > 0
    assert snapshot >= 1
    assert (state / "snapshots" / "latest" / "model.onnx").is_file()
    # The broker it started does not outlive it.
    port = re.search(r"broker\s+127\.0\.0\.1:(\d+)", done.stdout)
    assert port, done.stdout
    leftovers = subprocess.run(["pgrep", "-f", f"tcp://127.0.0.1:{port.group(1)}"], capture_output=True,
                               text=True)
    assert leftovers.stdout.strip() == ""
