"""The daemon's lifecycle: signals -> start -> run -> ordered shutdown under a timeout.

    HTTP up -> connect to the broker (retrying) -> learner starts
    -> components run: ingest | checkpoint timer | publish timer | watchdog
    -> on SIGTERM/SIGINT: stop fetching, finish the batch, final checkpoint and snapshot, commit, exit 0

A component that raises FatalExit ends the daemon with its code and without a final checkpoint
(systemd restarts it from the last one); a second signal exits at once. The components themselves
are built and wired by streamdqn.daemon.build.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from streamdqn.daemon.checkpointer import Checkpointer
from streamdqn.daemon.exits import EXIT_FAILURE, EXIT_OK, FatalExit
from streamdqn.daemon.health import HealthView
from streamdqn.daemon.ingestor import Ingestor
from streamdqn.daemon.publisher import Publisher
from streamdqn.daemon.rollout import Rollout
from streamdqn.daemon.sdnotify import SystemdNotifier
from streamdqn.daemon.watchdog import Watchdog
from streamdqn.learning.runners import LearnerRunner
from streamdqn.logs import log_event
from streamdqn.serve.app import App, start_http, stop_http

log = logging.getLogger("streamdqn.daemon")

# A poll batch keeps its parsed records and events alive together; at CPython's default gen-0
# threshold (700) the collector rescans them, and all the daemon holds, many times per batch.
GC_THRESHOLDS = (20_000, 50, 1_000)


def tune_gc() -> None:
    """Freeze what startup allocated (never rescanned again) and collect young objects less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


@dataclass(frozen=True)
class HttpBinding:
    app: App
    host: str
    port: int


class Server:
    """`streamdqn run`: components in, exit code out."""

    def __init__(
        self,
        ingestor: Ingestor,
        checkpointer: Checkpointer,
        publisher: Publisher,
        rollout: Rollout,
        watchdog: Watchdog,
        health: HealthView,
        runner: LearnerRunner,
        http: HttpBinding,
        notifier: SystemdNotifier,
        *,
        stop_timeout_seconds: float,
    ) -> None:
        self.ingestor = ingestor
        self.checkpointer = checkpointer
        self.publisher = publisher
        self.rollout = rollout
        self.watchdog = watchdog
        self.health = health
        self.runner = runner
        self.http = http
        self.notifier = notifier
        self.stop_timeout_seconds = stop_timeout_seconds
        self.stop_event = asyncio.Event()
        self.listening = asyncio.Event()  # set once HTTP is up (http_port known)
        self.http_port: int | None = None
        self._signals = 0

    def stop(self) -> None:
        """Ask for the ordered shutdown (what SIGTERM does)."""
        self.stop_event.set()

    async def serve(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            return await self._serve()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    def _on_signal(self, sig: int) -> None:
        self._signals += 1
        if self._signals > 1:
            log.error("second %s: exiting now without a final checkpoint", signal.Signals(sig).name)
            os._exit(EXIT_FAILURE)
        log_event("shutdown requested", signal=signal.Signals(sig).name)
        self.stop_event.set()

    async def _serve(self) -> int:
        http_runner, self.http_port = await start_http(self.http.app, self.http.host, self.http.port)
        log_event("http listening", host=self.http.host, port=self.http_port)
        self.listening.set()
        tasks: list[asyncio.Task[None]] = []
        try:
            if not await self.ingestor.connect(self.stop_event):
                return EXIT_OK  # asked to stop before the broker ever answered
            self.watchdog.broker_connected = True
            self.runner.start()
            tune_gc()
            log_event("learner started", mode=type(self.runner).__name__, device=self.health.build["device"])
            self.notifier.ready("consuming")
            tasks = [self._task(c.run(self.stop_event), name) for name, c in self._components()]
            code = await self._until_stop_or_failure(tasks)
            if code is not None:
                return code
            self.notifier.stopping()
            try:
                await asyncio.wait_for(self._shutdown(tasks), timeout=self.stop_timeout_seconds)
            except TimeoutError:
                log.error("shutdown took longer than %.0fs; exiting without finishing it",
                          self.stop_timeout_seconds)
                return EXIT_FAILURE
            return EXIT_OK
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.to_thread(self.runner.stop)
            await self.ingestor.close()
            await stop_http(http_runner)
            log_event("stopped")

    def _components(self) -> list[tuple[str, Ingestor | Checkpointer | Publisher | Rollout | Watchdog]]:
        return [("ingest", self.ingestor), ("checkpoint", self.checkpointer), ("publish", self.publisher),
                ("rollout", self.rollout), ("watchdog", self.watchdog)]

    @staticmethod
    def _task(coroutine: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        return asyncio.create_task(coroutine, name=name)

    async def _until_stop_or_failure(self, tasks: list[asyncio.Task[None]]) -> int | None:
        """None once a stop is asked for; an exit code when a component failed first."""
        stop_wait = asyncio.create_task(self.stop_event.wait())
        done, _ = await asyncio.wait([stop_wait, *tasks], return_when=asyncio.FIRST_COMPLETED)
        stop_wait.cancel()
        code: int | None = None
        for task in done:
            if task is stop_wait or task.cancelled() or (exc := task.exception()) is None:
                continue
            if isinstance(exc, FatalExit):
                code = code or exc.code
            else:
                log.error("task %s failed: %r", task.get_name(), exc)
                code = code or EXIT_FAILURE
        self.stop_event.set()
        return code

    async def _shutdown(self, tasks: list[asyncio.Task[None]]) -> None:
        ingest, others = tasks[0], tasks[1:]
        await ingest  # it sees the stop event after the batch in hand
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)
        if self.ingestor.resume_from_last_checkpoint:
            return
        await self.checkpointer.save(final=True)
        await self.publisher.publish(final=True)
