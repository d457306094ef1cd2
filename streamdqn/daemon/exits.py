"""The daemon's exit codes, and how a component asks for one."""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_LEARNER_DIED = 70
EXIT_STALLED = 75  # EX_TEMPFAIL: systemd's Restart=on-failure brings us back
EXIT_GROUP_LOST = 76  # a data-parallel group failed: every rank restarts and they meet again


class FatalExit(Exception):
    """Raised by a component's run() when the daemon must stop now with `code` (no final checkpoint)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
