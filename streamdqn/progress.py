"""Progress of long work that suits where it is written: a live bar on a terminal, plain lines elsewhere.

On a TTY, tqdm redraws one line in place. Written to a file or a pipe (systemd's journal, CI, `| tee`)
those redraws become thousands of carriage-return frames, so there a plain line is printed every
`every_items` items or `every_seconds` seconds instead, and each message is its own line.
"""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import TextIO

from tqdm import tqdm


class Progress:
    def __init__(
        self,
        total: int,
        what: str,
        *,
        unit: str = "it",
        enabled: bool = True,
        stream: TextIO | None = None,
        every_items: int = 0,
        every_seconds: float = 30.0,
    ) -> None:
        self.total = total
        self.what = what
        self.unit = unit
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.every_items = every_items or max(1, total // 10)
        self.every_seconds = every_seconds
        self.done = 0
        self._started = time.monotonic()
        self._last_line = self._started
        self._last_done = 0
        self._bar: tqdm[None] | None = None
        if enabled and self.stream.isatty():
            self._bar = tqdm(total=total, desc=what, unit=unit, file=self.stream)

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        due = self.done - self._last_done >= self.every_items or now - self._last_line >= self.every_seconds
        if self.enabled and (due or self.done == self.total):
            self._line(now)

    def write(self, message: str) -> None:
        """A message of its own line (above the bar on a terminal)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _line(self, now: float) -> None:
        elapsed = now - self._started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        left = (self.total - self.done) / rate if rate > 0 else float("nan")
        eta = f", {left:.0f} s left" if left == left else ""
        share = 100 * self.done / max(1, self.total)
        line = f"{self.what}: {self.done}/{self.total} {self.unit} ({share:.0f} %, {rate:.1f} {self.unit}/s"
        line += f"{eta})"
        print(line, file=self.stream, flush=True)
        self._last_line = now
        self._last_done = self.done
