"""systemd's notify protocol against a real AF_UNIX datagram socket, as PID 1 would read it."""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def _receive(sock: socket.socket, until: float) -> list[str]:
    messages = []
    while time.monotonic() < until:
        try:
            messages.append(sock.recv(4096).decode())
        except TimeoutError:
            continue
    return messages


def test_ready_watchdog_and_stopping_notifications(topics, make_daemon, tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(0.2)
        # WATCHDOG_USEC=2 s: the daemon must ping at half of it.
        daemon = make_daemon(topics, env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "2000000"}).start()
        messages = _receive(sock, time.monotonic() + 12)
        assert any(m.startswith("READY=1") for m in messages), messages
        assert sum(m == "WATCHDOG=1" for m in messages) >= 4, messages
        daemon.signal(signal.SIGTERM)
        assert daemon.wait_exit(35) == 0
        after = _receive(sock, time.monotonic() + 1)
        assert "STOPPING=1" in after + messages, after
