"""The online daemon (`streamdqn run`): a lifecycle Server over components that each own one concern.

    Ingestor      fetch, stream pipeline, backpressure, dead letters, offsets   (ingestor.py)
    Checkpointer  state + offsets together, atomically, then the commit        (checkpointer.py)
    Publisher     gate, export, publish and announce snapshots                   (publisher.py)
    Watchdog      loop lag, learner alive, progress, systemd watchdog, broker    (watchdog.py)
    HealthView    /metrics, /healthz, /readyz                                    (health.py)
    Server        signals -> start -> run -> ordered shutdown                    (server.py)
    build()       settings -> a Server of components                             (build.py)
"""

from streamdqn.daemon.build import build, serve
from streamdqn.daemon.exits import EXIT_FAILURE, EXIT_LEARNER_DIED, EXIT_OK, EXIT_STALLED
from streamdqn.daemon.server import Server

__all__ = ["EXIT_FAILURE", "EXIT_LEARNER_DIED", "EXIT_OK", "EXIT_STALLED", "Server", "build", "serve"]
