"""systemd's notify protocol against a real AF_UNIX datagram socket, as PID 1 would read it."""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.conftest import FAST

pytestmark = pytest.mark.integration


def _receive(sock: socket.socket, until: float, enough: Callable[[list[str]], bool] = lambda _: False
             ) -> list[str]:
    """Datagrams until the monotonic time `until`, or sooner once `enough` of them have come."""
    messages: list[str] = []
    while time.monotonic() < until and not enough(messages):
        try:
            messages.append(sock.recv(4096).decode())
        except TimeoutError:
            continue
    return messages


def _ready_and_pinged(messages: list[str]) -> bool:
    return any(m.startswith("READY=1") for m in messages) and sum(m == "WATCHDOG=1" for m in messages) >= 4


def test_ready_watchdog_and_stopping_notifications(topics, make_daemon, tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(0.2)
        # WATCHDOG_USEC=2 s: the daemon must ping at half of it, so 4 pings fit well within 12 s.
        # The learner thread (FAST): where the learner runs is not what this test is about.
        daemon = make_daemon(topics, env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "2000000"},
                             **FAST).start()
        messages = _receive(sock, time.monotonic() + 12, _ready_and_pinged)
        assert any(m.startswith("READY=1") for m in messages), messages
        assert sum(m == "WATCHDOG=1" for m in messages) >= 4, messages
        daemon.signal(signal.SIGTERM)
        assert daemon.wait_exit(35) == 0
        after = _receive(sock, time.monotonic() + 1, lambda received: "STOPPING=1" in received)
        assert "STOPPING=1" in after + messages, after
