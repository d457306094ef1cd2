"""Where DQN updates run: a thread, or a process over shared-memory replay.

The boundary is narrow: rows go in through the replay buffer; weights and stats come out
through shared tensors; a full learner state (for checkpoints) is asked for explicitly. Measured
on 2 cores: a learner thread beside a busy asyncio ingest loop keeps ~0.1x of its solo update rate
(every torch call re-takes the GIL), a learner process ~1.0x. See bench/ and the README.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch
import torch.multiprocessing as mp

from streamdqn.errors import ConfigError
from streamdqn.learning.distributed import (
    Group,
    GroupError,
    GroupProgress,
    GroupSettings,
    LocalProgress,
    join_group,
    share_learner_state,
)
from streamdqn.learning.learner import DQNLearner, update_from
from streamdqn.learning.replay.buffer import ReplayBuffer
from streamdqn.learning.settings import LearnerSettings

log = logging.getLogger(__name__)

# Layout of the shared control vector (float64). The _GROUP_ slots hold the sums over a data-parallel
# group's ranks (streamdqn.learning.distributed), refreshed by the learner at every step together.
(_INSERTED, _STOP, _UPDATES, _LOSS, _TD, _QMAX, _HEARTBEAT, _WEIGHTS_VERSION, _NORM_VERSION,
 _FAILED, _EVENTS, _NORM_COUNT, _GROUP_EVENTS, _GROUP_TRANSITIONS, _GROUP_NORM_COUNT) = range(15)
_CONTROL_LEN = 15
# What _FAILED holds once the learner has stopped on an error.
_FAILED_ERROR, _FAILED_GROUP = 1.0, 2.0
# How long a learner of a group waits before asking its peers again when one of them cannot update yet:
# every ask is a collective, and a group idles often (the replay ratio is reached on some rank).
_GROUP_IDLE_SECONDS = 0.01


@dataclass(frozen=True)
class RunnerOptions:
    obs_dim: int
    n_actions: int
    min_size: int = 1000
    updates_per_transition: float = 1.0  # updates per inserted row at most; 0: as fast as possible
    publish_every_updates: int = 50
    torch_threads: int = 1
    feature_clip: float = 10.0
    nice: int = 0  # niceness added to a learner process
    group: GroupSettings | None = None  # a data-parallel group to join; None: learn alone


class LearnerStats(NamedTuple):
    updates: int
    loss: float
    td_error_abs: float
    q_max_mean: float
    heartbeat: float
    weights_version: int


class LearnedCounts(NamedTuple):
    """What a network was learned from: one daemon's counts, or a group's sums over its ranks."""

    events: int
    transitions: int
    normalizer_count: float


class LearnerRunner(Protocol):
    def start(self) -> None: ...
    def stop(self, timeout: float = 10.0) -> None: ...
    def alive(self) -> bool: ...
    def left_group(self) -> bool: ...
    def stats(self) -> LearnerStats: ...
    def group_counts(self) -> LearnedCounts: ...
    def note_ingested(self, transitions: int, events: int) -> None: ...
    def set_normalization(self, mean: np.ndarray, std: np.ndarray, count: float) -> None: ...
    def weights(self) -> tuple[dict[str, torch.Tensor], int]: ...
    def learner_state(self) -> dict[str, Any]: ...


class SharedState:
    """Tensors both sides see: control vector, normalization, and the online network's weights."""

    def __init__(self, template: dict[str, torch.Tensor], obs_dim: int, shared: bool) -> None:
        self.control = torch.zeros(_CONTROL_LEN, dtype=torch.float64)
        self.norm = torch.cat([torch.zeros(obs_dim), torch.ones(obs_dim)]).to(torch.float32)
        self.names = list(template)
        self.shapes = [tuple(t.shape) for t in template.values()]
        self.weights = torch.cat([t.detach().reshape(-1).float().cpu() for t in template.values()])
        if shared:
            for t in (self.control, self.norm, self.weights):
                t.share_memory_()

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        out, offset = {}, 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            n = int(np.prod(shape)) if shape else 1
            out[name] = flat[offset : offset + n].reshape(shape).clone()
            offset += n
        return out


def _learn(
    learner: DQNLearner,
    buffer: ReplayBuffer,
    shared: SharedState,
    lock: Any,
    options: RunnerOptions,
    requests: Connection | None,
    state_lock: threading.Lock,
    orphaned: Callable[[], bool] = lambda: False,
    group: Group | None = None,
) -> None:
    """The update loop, identical in a thread and in a process, alone or in a group."""
    c = shared.control
    norm_version = -1.0
    last_beat = 0.0
    while True:
        leaving = bool(c[_STOP] != 0)
        if leaving and group is None:
            return
        now = time.time()
        if now - last_beat > 0.25:
            last_beat = c[_HEARTBEAT] = now
            if orphaned():
                return
        if requests is not None and requests.poll():
            requests.recv()
            with state_lock:
                # Clones: pickling a live tensor would move the learner's own storage into shared memory.
                requests.send(_clone(learner.state_dict()))
        updates = learner.counters.updates
        budget_left = (options.updates_per_transition <= 0
                       or updates < options.updates_per_transition * c[_INSERTED])
        ready = bool(len(buffer) >= options.min_size and budget_left)
        pooled: GroupProgress | None = None
        version = float(c[_NORM_VERSION])
        if group is not None:
            together = group.step_together(_local_progress(shared, options.obs_dim, ready, leaving))
            _record(c, together)
            if leaving:
                return
            if together.leaving:
                raise GroupError(f"{together.leaving} rank(s) of the group stopped: the group cannot "
                                 f"update without them; restart every rank")
            ready, version, pooled = together.all_ready, together.normalizer_version, together
        if not ready:
            time.sleep(0.002 if group is None else _GROUP_IDLE_SECONDS)
            continue
        if version != norm_version:
            norm_version = version
            if pooled is None:
                norm = shared.norm.clone()
                learner.set_normalization(norm[: options.obs_dim].numpy(), norm[options.obs_dim :].numpy(),
                                          options.feature_clip)
            else:  # every rank normalizes with the whole group's statistics: one network, one input scale
                learner.set_normalization(pooled.mean, pooled.std, options.feature_clip)
        with state_lock:
            stats = update_from(learner, buffer)
        c[_UPDATES] = learner.counters.updates
        c[_LOSS], c[_TD], c[_QMAX] = stats
        if learner.counters.updates % options.publish_every_updates == 0:
            _publish_weights(learner, shared, lock)


def _local_progress(shared: SharedState, obs_dim: int, ready: bool, leaving: bool) -> LocalProgress:
    c, norm = shared.control, shared.norm.clone().double()
    return LocalProgress(ready=ready, leaving=leaving, events=int(c[_EVENTS]), transitions=int(c[_INSERTED]),
                         normalizer_count=float(c[_NORM_COUNT]), normalizer_version=int(c[_NORM_VERSION]),
                         mean=norm[:obs_dim].numpy(), std=norm[obs_dim:].numpy())


def _record(c: torch.Tensor, together: GroupProgress) -> None:
    c[_GROUP_EVENTS], c[_GROUP_TRANSITIONS] = together.events, together.transitions
    c[_GROUP_NORM_COUNT] = together.normalizer_count


def _join(learner: DQNLearner, settings: GroupSettings, keep_waiting: Callable[[], bool]) -> Group:
    """Join the group and take rank 0's learner (weights, optimizer, update count)."""
    group = join_group(settings, learner.device, keep_waiting)
    try:
        share_learner_state(group, learner)
    except BaseException:
        group.close()
        raise
    learner.after_backward = group.average_gradients
    return group


def _learn_in(
    learner: DQNLearner, buffer: ReplayBuffer, shared: SharedState, lock: Any, options: RunnerOptions,
    requests: Connection | None, state_lock: threading.Lock, orphaned: Callable[[], bool] = lambda: False,
) -> None:
    """_learn, in the group of `options` when there is one. Any failure is marked in the control vector,
    a failure to join or of the group as such (the daemon exits with its own code for it)."""
    try:
        if options.group is None:
            _learn(learner, buffer, shared, lock, options, requests, state_lock, orphaned)
        else:
            _learn_in_group(learner, buffer, shared, lock, options, options.group, requests, state_lock,
                            orphaned)
    except BaseException:
        if shared.control[_FAILED] == 0:
            shared.control[_FAILED] = _FAILED_ERROR
        raise


def _learn_in_group(
    learner: DQNLearner, buffer: ReplayBuffer, shared: SharedState, lock: Any, options: RunnerOptions,
    settings: GroupSettings, requests: Connection | None, state_lock: threading.Lock,
    orphaned: Callable[[], bool],
) -> None:
    c = shared.control

    def keep_waiting() -> bool:
        """Until the daemon stops: a rank waits for the others in the learner, and goes on ingesting,
        rather than exiting (each exit of rank 0 would take the rendezvous away from the others)."""
        c[_HEARTBEAT] = time.time()
        return bool(c[_STOP] == 0) and not orphaned()

    try:
        group = _join(learner, settings, keep_waiting)
    except (ConfigError, GroupError) as e:
        if not keep_waiting():
            return  # stopped while waiting for the group
        shared.control[_FAILED] = _FAILED_GROUP
        log.error("the learner could not join its group: %s", e)
        raise
    shared.control[_UPDATES] = learner.counters.updates
    _publish_weights(learner, shared, lock)
    try:
        _learn(learner, buffer, shared, lock, options, requests, state_lock, orphaned, group)
    except GroupError as e:
        shared.control[_FAILED] = _FAILED_GROUP
        log.error("the learner left its group: %s", e)
        raise
    finally:
        group.close()


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clone(v) for v in value]
    return value


def _publish_weights(learner: DQNLearner, shared: SharedState, lock: Any) -> None:
    flat = torch.cat([t.detach().reshape(-1).float().cpu() for t in learner.online.state_dict().values()])
    with lock:
        shared.weights.copy_(flat)
        shared.control[_WEIGHTS_VERSION] += 1


class _RunnerBase:
    def __init__(self, shared: SharedState, lock: Any) -> None:
        self._shared = shared
        self._lock = lock

    def stats(self) -> LearnerStats:
        c = self._shared.control.tolist()
        return LearnerStats(int(c[_UPDATES]), c[_LOSS], c[_TD], c[_QMAX], c[_HEARTBEAT],
                            int(c[_WEIGHTS_VERSION]))

    def group_counts(self) -> LearnedCounts:
        """The group's sums as of the learners' last step together (zeros before the group assembles)."""
        c = self._shared.control.tolist()
        return LearnedCounts(int(c[_GROUP_EVENTS]), int(c[_GROUP_TRANSITIONS]), c[_GROUP_NORM_COUNT])

    def left_group(self) -> bool:
        """Whether the learner stopped because it could not join its group or the group failed."""
        return bool(self._shared.control[_FAILED] == _FAILED_GROUP)

    def note_ingested(self, transitions: int, events: int) -> None:
        self._shared.control[_INSERTED] = float(transitions)
        self._shared.control[_EVENTS] = float(events)

    def set_normalization(self, mean: np.ndarray, std: np.ndarray, count: float) -> None:
        n = len(mean)
        self._shared.norm[:n] = torch.as_tensor(mean, dtype=torch.float32)
        self._shared.norm[n:] = torch.as_tensor(std, dtype=torch.float32)
        self._shared.control[_NORM_COUNT] = float(count)
        self._shared.control[_NORM_VERSION] += 1

    def weights(self) -> tuple[dict[str, torch.Tensor], int]:
        with self._lock:
            flat = self._shared.weights.clone()
            version = int(self._shared.control[_WEIGHTS_VERSION])
        return self._shared.unflatten(flat), version


class ThreadRunner(_RunnerBase):
    """Updates in a thread of the daemon process (simple; shares the GIL with ingest)."""

    def __init__(self, learner: DQNLearner, buffer: ReplayBuffer, options: RunnerOptions) -> None:
        super().__init__(SharedState(learner.online.state_dict(), options.obs_dim, shared=False),
                         threading.Lock())
        self.learner = learner
        self.buffer = buffer
        self.options = options
        self._state_lock = threading.Lock()
        self._shared.control[_UPDATES] = learner.counters.updates
        _publish_weights(learner, self._shared, self._lock)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def start(self) -> None:
        if self.options.torch_threads > 0:
            torch.set_num_threads(self.options.torch_threads)
        self._thread = threading.Thread(target=self._run, name="streamdqn-learner", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            _learn_in(self.learner, self.buffer, self._shared, self._lock, self.options, None,
                      self._state_lock)
        except BaseException as exc:
            self._error = exc
            log.exception("learner thread failed")

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        self._shared.control[_STOP] = 1
        if self._thread is not None:
            self._thread.join(timeout)

    def learner_state(self) -> dict[str, Any]:
        with self._state_lock:
            return self.learner.state_dict()


def _process_main(
    settings: LearnerSettings,
    state: dict[str, Any] | None,
    buffer: ReplayBuffer,
    shared: SharedState,
    lock: Any,
    options: RunnerOptions,
    requests: Connection,
    parent: int,
) -> None:
    # The daemon stops this process itself; a terminal's Ctrl-C or systemd's SIGTERM to the whole
    # cgroup must not kill it before the final checkpoint has asked for its state.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if options.torch_threads > 0:
        torch.set_num_threads(options.torch_threads)
    if options.nice > 0:
        os.nice(options.nice)
    learner = DQNLearner(settings, options.obs_dim, options.n_actions, clip=options.feature_clip)
    if state is not None:
        learner.load_state_dict(state)
    try:
        # If the daemon was SIGKILLed nobody will stop us: notice being orphaned and exit.
        _learn_in(learner, buffer, shared, lock, options, requests, threading.Lock(),
                  lambda: os.getppid() != parent)
    finally:
        shared.control[_HEARTBEAT] = 0


class ProcessRunner(_RunnerBase):
    """Updates in a child process over shared-memory replay: the GIL of ingest does not bind it.

    The replay buffer must have been created with shared=True and the lock this runner is given.
    """

    def __init__(
        self,
        settings: LearnerSettings,
        state: dict[str, Any] | None,
        buffer: ReplayBuffer,
        lock: Any,
        options: RunnerOptions,
        initial_weights: dict[str, torch.Tensor],
        initial_updates: int = 0,
    ) -> None:
        super().__init__(SharedState(initial_weights, options.obs_dim, shared=True), lock)
        self._shared.control[_UPDATES] = initial_updates
        self.settings = settings
        self.state = state
        self.buffer = buffer
        self.options = options
        self._ctx = mp.get_context("spawn")
        self._parent_conn, self._child_conn = self._ctx.Pipe()
        self._process: Any = None
        self._request_lock = threading.Lock()

    @staticmethod
    def make_lock() -> Any:
        return mp.get_context("spawn").Lock()

    def start(self) -> None:
        self._process = self._ctx.Process(
            target=_process_main,
            args=(self.settings, self.state, self.buffer, self._shared, self._lock, self.options,
                  self._child_conn, os.getpid()),
            name="streamdqn-learner",
            daemon=True,
        )
        self._process.start()
        self.state = None  # the child has its own copy now

    def alive(self) -> bool:
        return self._process is not None and self._process.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        self._shared.control[_STOP] = 1
        if self._process is not None:
            self._process.join(timeout)
            if self._process.is_alive():
                self._process.kill()
                self._process.join(5)
        self._parent_conn.close()
        self._child_conn.close()

    def learner_state(self) -> dict[str, Any]:
        if not self.alive():
            raise RuntimeError("the learner process is not running")
        with self._request_lock:
            self._parent_conn.send("state")
            if not self._parent_conn.poll(60):
                raise TimeoutError("the learner process did not answer a state request within 60 s")
            state: dict[str, Any] = self._parent_conn.recv()
        return state
