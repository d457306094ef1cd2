"""The watchdog component: is the daemon alive and making progress?

Every half second it measures the event loop's lag, checks that the learner still runs, pings the
systemd watchdog, and every few seconds asks whether the broker answers. With events waiting (lag)
and no progress for `progress_timeout_seconds` it stops the daemon with EXIT_STALLED, so systemd
restarts it from its last checkpoint.
"""

from __future__ import annotations

import asyncio
import logging
import time

from streamdqn.daemon.exits import EXIT_GROUP_LOST, EXIT_LEARNER_DIED, EXIT_STALLED, FatalExit
from streamdqn.daemon.ingestor import Ingestor
from streamdqn.daemon.sdnotify import SystemdNotifier
from streamdqn.learning.runners import LearnerRunner
from streamdqn.logs import last_kafka_error, log_event

log = logging.getLogger("streamdqn.daemon")

TICK_SECONDS = 0.5
BROKER_CHECK_SECONDS = 5.0


class Watchdog:
    def __init__(
        self,
        runner: LearnerRunner,
        ingestor: Ingestor,
        notifier: SystemdNotifier,
        *,
        progress_timeout_seconds: float,
    ) -> None:
        self.runner = runner
        self.ingestor = ingestor
        self.notifier = notifier
        self.progress_timeout_seconds = progress_timeout_seconds
        self.loop_lag = 0.0
        self.broker_connected = False

    async def run(self, stop: asyncio.Event) -> None:
        last_broker_check = last_ping = 0.0
        while not stop.is_set():
            before = time.monotonic()
            await asyncio.sleep(TICK_SECONDS)
            now = time.monotonic()
            self.loop_lag = max(0.0, now - before - TICK_SECONDS)
            if not self.runner.alive():
                if self.runner.left_group():
                    log.error("the learner lost its group (a rank stopped or died); exiting "
                              "with code %d so that every rank restarts from its checkpoint", EXIT_GROUP_LOST)
                    raise FatalExit(EXIT_GROUP_LOST, "the group failed")
                log.error("the learner stopped unexpectedly; exiting so that systemd restarts the service")
                raise FatalExit(EXIT_LEARNER_DIED, "the learner stopped")
            if now - last_broker_check >= BROKER_CHECK_SECONDS:
                last_broker_check = now
                await self._check_broker()
            if self._stalled(now):
                waiting = sum(self.ingestor.lag().values())
                log.error("no progress for %.0fs while %d events wait (lag); exiting with code %d for a "
                          "restart", self.progress_timeout_seconds, waiting, EXIT_STALLED)
                raise FatalExit(EXIT_STALLED, "no progress")
            interval = self.notifier.watchdog_interval
            if interval and now - last_ping >= interval:
                last_ping = now
                self.notifier.watchdog()

    async def _check_broker(self) -> None:
        sink = self.ingestor.sink
        if sink is None:
            return
        connected = await sink.broker_reachable()
        if connected != self.broker_connected:
            cause = {} if connected else {"cause": last_kafka_error()}
            log_event("broker reconnected" if connected else "broker disconnected",
                      bootstrap_servers=self.ingestor.clients.bootstrap_servers, **cause)
        self.broker_connected = connected

    def _stalled(self, now: float) -> bool:
        timeout = self.progress_timeout_seconds
        if now - self.ingestor.last_progress < timeout:
            return False
        if sum(self.ingestor.lag().values()) > 0 and not self.ingestor.learner_lagging():
            return True
        # Nothing waits, or backpressure holds ingest on purpose: not a stall; look again later.
        self.ingestor.last_progress = now - timeout / 2
        return False
