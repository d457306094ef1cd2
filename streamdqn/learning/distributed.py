"""Data-parallel learners: join a torch.distributed group, average gradients, start from rank 0's weights.

Each member (a rank) trains on its own replay shard. After every backward pass the group all-reduces the
gradients (`Group.average_gradients`, given to DQNLearner as `after_backward`), so every rank takes the
same optimizer step and the weights stay identical. Rank 0 hosts the rendezvous, publishes, and is where
the others get their weights (and optimizer state) at start and after a restore (`share_learner_state`).

Rendezvous: rank 0 serves a TCPStore on master_addr:master_port (what a `tcp://` init method would make),
and the process group is built on that store. Before that, each member claims key `rank-<r>` with a token
of its own; a second member with the same rank finds the key taken and is refused (RankDoubled, a
ConfigError) instead of wedging the group. The claims stay for the group's life, so a late duplicate is
refused too. A daemon's learner joins with `keep_waiting`: it waits for rank 0 and the others instead of
failing, and a refused non-zero rank tries again every second (warning every timeout), since the holder
may be this very rank before a restart, in a group that ends within timeout_seconds.

Under torchrun (or its elastic agent) the agent already serves that store at MASTER_ADDR:MASTER_PORT
and hands out the ranks: `GroupSettings.from_environment` reads its variables and the members join the
agent's store instead, claiming their ranks per restart of the agent (TORCHELASTIC_RESTART_COUNT).

Backends: Gloo on the CPU, NCCL when the learner is on CUDA (`backend="auto"`). On a host whose name does
not resolve to the interface the others reach, set GLOO_SOCKET_IFNAME (Gloo binds by hostname).
"""

from __future__ import annotations

import datetime
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed import TCPStore  # type: ignore[attr-defined]  # re-exported from torch._C, no __all__
from torch.distributed.distributed_c10d import PrefixStore

from streamdqn.errors import ConfigError, StreamDQNError
from streamdqn.learning.learner import DQNLearner

Backend = Literal["auto", "gloo", "nccl"]
log = logging.getLogger(__name__)

# How long a rank 0 that cannot bind its port looks for another rank 0's store there: a store answers at
# once, and a client of something else that accepts and never answers would wait forever.
_PROBE_SECONDS = 2.0
_WAIT_SLICE = datetime.timedelta(seconds=1)  # how often a waiting member asks whether to go on waiting
# Settings that may differ between ranks: where each one computes, and its seed (the initial weights are
# rank 0's anyway; sampling may well differ).
_LOCAL_SETTINGS = ("device", "cuda_graph", "seed")


class GroupError(StreamDQNError):
    """A collective failed: a member died, hung or left. The group is unusable; restart every rank."""


@dataclass(frozen=True, kw_only=True)
class GroupSettings:
    """Where a member stands in its group and how to reach rank 0."""

    rank: int
    """This member's rank, 0..world_size-1; rank 0 hosts the rendezvous and publishes."""
    world_size: int
    """How many members the group has."""
    master_addr: str = "127.0.0.1"
    """Rank 0's address, as every member reaches it (loopback: all members on this host)."""
    master_port: int
    """The TCP port of rank 0's rendezvous store."""
    timeout_seconds: float = 120.0
    """How long to wait for the whole group to assemble, and for any collective to complete."""
    backend: Backend = "auto"
    """auto: NCCL when the learner is on CUDA, else Gloo."""
    agent_store: bool = False
    """Join the store torchrun's agent serves at master_addr:master_port instead of serving one on rank 0."""
    generation: int = 0
    """Which start of the group this is (torchrun's restart count): ranks are claimed once per generation."""

    @classmethod
    def from_environment(
        cls, environ: Mapping[str, str], *, timeout_seconds: float = 120.0, backend: Backend = "auto"
    ) -> GroupSettings:
        """The settings torchrun (or any torch.distributed launcher) passes: RANK, WORLD_SIZE, MASTER_ADDR,
        MASTER_PORT; under torchrun's agent also TORCHELASTIC_USE_AGENT_STORE and _RESTART_COUNT."""
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in environ]
        if missing:
            raise ConfigError(f"the launcher's environment lacks {missing}: start under torchrun, or set "
                              f"distributed.rank, world_size, master_addr and master_port")
        try:
            return cls(
                rank=int(environ["RANK"]), world_size=int(environ["WORLD_SIZE"]),
                master_addr=environ["MASTER_ADDR"], master_port=int(environ["MASTER_PORT"]),
                timeout_seconds=timeout_seconds, backend=backend,
                agent_store=environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True",
                generation=int(environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
            )
        except ValueError as e:
            raise ConfigError(f"the launcher's RANK, WORLD_SIZE or MASTER_PORT is not an integer: {e}") from e

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ConfigError(f"distributed.world_size must be >= 1, not {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ConfigError(
                f"distributed.rank must be in 0..{self.world_size - 1} (world_size {self.world_size}), "
                f"not {self.rank}"
            )
        if not 1 <= self.master_port <= 65535:
            raise ConfigError(f"distributed.master_port must be in 1..65535, not {self.master_port}")
        if not self.timeout_seconds > 0:
            raise ConfigError(f"distributed.timeout_seconds must be > 0, not {self.timeout_seconds}")
        if self.generation < 0:
            raise ConfigError(f"distributed.generation must be >= 0, not {self.generation}")

    @property
    def endpoint(self) -> str:
        return f"{self.master_addr}:{self.master_port}"

    @property
    def timeout(self) -> datetime.timedelta:
        return datetime.timedelta(seconds=self.timeout_seconds)


def resolve_backend(backend: Backend, device: torch.device) -> str:
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    return backend


def join_group(
    settings: GroupSettings, device: torch.device | str = "cpu",
    keep_waiting: Callable[[], bool] | None = None,
) -> Group:
    """Join (rank 0: host) the group and return once all world_size members are in it.

    `device` is where the learner's tensors live (the backend must reach them). Raises ConfigError when
    rank 0's port is taken, a rank is claimed twice, the group does not assemble within the timeout, or
    the rendezvous goes away during the join. With `keep_waiting`, a member waits instead for as long as
    keep_waiting() (asked about every second) is true, with a warning every timeout: for rank 0's
    rendezvous to appear, to come back (a member joins again), and for the others to arrive.
    """
    device = torch.device(device)
    backend = resolve_backend(settings.backend, device)
    # Only a member of someone else's store can join again; rank 0's own store is what failed.
    retry = keep_waiting if _joins_a_store(settings) else None
    again = _Waiting(settings, retry)
    while True:
        served = _open_store(settings, keep_waiting)
        # Each generation's claims apart: a restarted agent's members must not find their previous selves.
        store = _generation(served, settings)
        try:
            _claim_rank(store, settings)
            _wait_for_everyone(store, settings, keep_waiting)
            if backend == "nccl" and device.index is not None:
                torch.cuda.set_device(device)  # NCCL binds each rank to the current device
            dist.init_process_group(
                backend, store=PrefixStore("process_group", store), rank=settings.rank,
                world_size=settings.world_size, timeout=settings.timeout,
            )
            return Group(settings, served, backend)
        except RankDoubled as e:
            # Also this member before a restart, in a group that has not noticed yet: it ends within
            # timeout_seconds, and rank 0 comes back with a new store.
            if not again.goes_on(str(e)):
                raise
            time.sleep(_WAIT_SLICE.total_seconds())
        except dist.DistError as e:  # seen when rank 0 exits for a restart while a rank joins
            failed = ConfigError(
                f"the rendezvous at {settings.endpoint} failed while rank {settings.rank} joined (a rank "
                f"stopped or restarted): {str(e)[:200]}"
            )
            if dist.is_initialized():
                dist.destroy_process_group()
            if retry is None or not retry():
                raise failed from e
            log.warning("%s; joining again", failed)


def _joins_a_store(settings: GroupSettings) -> bool:
    return settings.rank != 0 or settings.agent_store


class _Waiting:
    """Slices of at most a second between keep_waiting() calls, a warning every timeout."""

    def __init__(self, settings: GroupSettings, keep_waiting: Callable[[], bool] | None) -> None:
        self.keep_waiting = keep_waiting
        self.slice = settings.timeout if keep_waiting is None else min(settings.timeout, _WAIT_SLICE)
        self.started = time.monotonic()
        self.warned = -math.inf  # the first wait is reported at once
        self.timeout_seconds = settings.timeout_seconds

    def goes_on(self, what: str) -> bool:
        if self.keep_waiting is None or not self.keep_waiting():
            return False
        now = time.monotonic()
        if now - self.warned >= self.timeout_seconds:
            self.warned = now
            log.warning("%s (waiting %.0f s so far; the learner starts once the group is complete)", what,
                        now - self.started)
        return True


def _open_store(settings: GroupSettings, keep_waiting: Callable[[], bool] | None = None) -> TCPStore:
    host, port = settings.master_addr, settings.master_port
    if _joins_a_store(settings):
        waiting = _Waiting(settings, keep_waiting)
        while True:
            try:
                store = TCPStore(host, port, is_master=False, timeout=waiting.slice)
                store.set_timeout(settings.timeout)
                return store
            except dist.DistError as e:
                if not waiting.goes_on(f"rank {settings.rank} waits for rank 0's rendezvous at "
                                       f"{settings.endpoint}"):
                    raise ConfigError(
                        f"rank {settings.rank} could not reach the rendezvous at {settings.endpoint} within "
                        f"{settings.timeout_seconds:g} s: start rank 0 (or torchrun), or check "
                        f"distributed.master_addr and master_port ({e})"
                    ) from e
    try:
        return TCPStore(host, port, is_master=True, timeout=settings.timeout, wait_for_workers=False)
    except dist.DistNetworkError as e:
        if "EADDRINUSE" not in str(e):
            raise ConfigError(f"rank 0 could not serve the rendezvous on {settings.endpoint}: {e}") from e
        if _rank_claimed_at(settings, 0):
            raise _doubled(settings) from e
        raise ConfigError(
            f"distributed.master_port {port} on {host} is taken by another process: stop it or choose "
            f"another master_port (the same on every rank)"
        ) from e


def _generation(store: TCPStore, settings: GroupSettings) -> PrefixStore:
    return PrefixStore(f"streamdqn/{settings.generation}", store)


def _rank_claimed_at(settings: GroupSettings, rank: int) -> bool:
    """Whether a rendezvous store that answers at the endpoint holds a claim on `rank`."""
    found: list[bool] = []

    def probe() -> None:
        try:
            client = TCPStore(
                settings.master_addr, settings.master_port, is_master=False,
                timeout=datetime.timedelta(seconds=_PROBE_SECONDS),
            )
            found.append(_generation(client, settings).check([f"rank-{rank}"]))
        except dist.DistError:
            found.append(False)

    # A thread, because a store client of a server that accepts and never answers blocks for good.
    thread = threading.Thread(target=probe, name="rendezvous-probe", daemon=True)
    thread.start()
    thread.join(_PROBE_SECONDS + 1.0)
    return bool(found and found[0])


def _claim_rank(store: PrefixStore, settings: GroupSettings) -> None:
    token = uuid.uuid4().hex
    # compare_set with an empty expected value sets the key only if it is absent, and returns the value
    # the key holds afterwards: our token exactly when the claim is ours.
    owner = store.compare_set(f"rank-{settings.rank}", "", token)
    if owner != token.encode():
        raise _doubled(settings)


class RankDoubled(ConfigError):
    """Another member holds this member's rank in the group's store."""


def _doubled(settings: GroupSettings) -> RankDoubled:
    return RankDoubled(
        f"rank {settings.rank} is doubled: another member of the group at {settings.endpoint} already "
        f"claimed it. Give every member a distinct distributed.rank in 0..{settings.world_size - 1}. "
        f"If that member is this daemon before a restart, its old group ends within "
        f"{settings.timeout_seconds:g} s (timeout_seconds); start again then."
    )


def _wait_for_everyone(
    store: PrefixStore, settings: GroupSettings, keep_waiting: Callable[[], bool] | None = None,
) -> None:
    keys = [f"rank-{r}" for r in range(settings.world_size)]
    waiting = _Waiting(settings, keep_waiting)
    while True:
        try:
            store.wait(keys, waiting.slice)
            return
        except dist.DistStoreError as e:  # a timeout; a store that went away raises DistNetworkError
            missing = [r for r, key in enumerate(keys) if not store.check([key])]
            if not waiting.goes_on(f"rank {settings.rank} waits for rank(s) {missing} of world_size "
                                   f"{settings.world_size} at {settings.endpoint}"):
                raise ConfigError(
                    f"the group at {settings.endpoint} did not assemble within "
                    f"{settings.timeout_seconds:g} s: rank(s) {missing} of world_size {settings.world_size} "
                    f"never joined. Start them (same master_addr and master_port), or raise "
                    f"distributed.timeout_seconds"
                ) from e


NORMALIZER_EPS = 1e-8  # as RunningNormalizer's


@dataclass(frozen=True)
class LocalProgress:
    """What one rank brings to `Group.step_together`."""

    ready: bool  # its replay and replay ratio allow an update now
    leaving: bool  # it is stopping: the others stop learning too instead of waiting out the timeout
    events: int  # events it has consumed (its checkpointed count)
    transitions: int  # replay rows it has inserted
    normalizer_count: float
    normalizer_version: int  # bumped whenever its statistics change
    mean: np.ndarray
    std: np.ndarray


@dataclass(frozen=True)
class GroupProgress:
    """The group's answer: the sums over ranks and the pooled normalizer (every rank gets the same)."""

    all_ready: bool
    leaving: int
    events: int
    transitions: int
    normalizer_count: float
    normalizer_version: float  # changes whenever any rank's statistics changed
    mean: np.ndarray
    std: np.ndarray


class Group:
    """A joined group: gradient averaging and weight broadcasts over the default process group."""

    def __init__(self, settings: GroupSettings, store: TCPStore, backend: str) -> None:
        self.settings = settings
        self.backend = backend
        # Rank 0's store is the rendezvous itself: it lives as long as the group.
        self._store: TCPStore | None = store

    @property
    def rank(self) -> int:
        return self.settings.rank

    @property
    def world_size(self) -> int:
        return self.settings.world_size

    @property
    def is_publisher(self) -> bool:
        """Rank 0 runs the gate, publishes snapshots and writes the learner's checkpoints."""
        return self.settings.rank == 0

    @torch.no_grad()
    def average_gradients(self, module: torch.nn.Module) -> None:
        """Replace each parameter's gradient with its mean over the ranks: one all-reduce per dtype.

        A parameter with no gradient counts as zeros, so every rank reduces the same layout.
        """
        params = [p for p in module.parameters() if p.requires_grad]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        for bucket, members in _buckets(grads):
            with self._collective("all_reduce"):
                dist.all_reduce(bucket, op=dist.ReduceOp.SUM)
            bucket.div_(self.world_size)
            _unflatten(bucket, members)
        for p, g in zip(params, grads, strict=True):
            if p.grad is None:
                p.grad = g

    @torch.no_grad()
    def broadcast_parameters(self, module: torch.nn.Module, src: int = 0) -> None:
        """Overwrite `module`'s parameters and buffers, in place, with rank `src`'s."""
        tensors = [*module.parameters(), *module.buffers()]
        for bucket, members in _buckets(tensors):
            with self._collective("broadcast"):
                dist.broadcast(bucket, src=src)
            _unflatten(bucket, members)

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank `src`'s `obj` (picklable), on every rank."""
        holder = [obj if self.rank == src else None]
        with self._collective("broadcast_object_list"):
            dist.broadcast_object_list(holder, src=src)
        return holder[0]

    def step_together(self, local: LocalProgress) -> GroupProgress:
        """The top of every learner iteration, on every rank: one all-reduce that says whether all ranks
        can update now (so that they run the update's collectives together or not at all), whether one
        is leaving, and the group's summed counts and pooled normalizer statistics."""
        n = local.normalizer_count
        mean = torch.as_tensor(local.mean, dtype=torch.float64)
        var = torch.as_tensor(local.std, dtype=torch.float64) ** 2
        head = torch.tensor([float(not local.ready), float(local.leaving), float(local.events),
                             float(local.transitions), n, float(local.normalizer_version)],
                            dtype=torch.float64)
        vector = torch.cat([head, n * mean, n * (var + mean**2)])
        with self._collective("all_reduce"):
            dist.all_reduce(vector, op=dist.ReduceOp.SUM)
        dim = len(mean)
        total = float(vector[4])
        pooled_mean = vector[6:6 + dim] / total if total > 0 else torch.zeros(dim, dtype=torch.float64)
        pooled_var = (vector[6 + dim:] / total - pooled_mean**2 if total > 1
                      else torch.ones(dim, dtype=torch.float64))
        return GroupProgress(
            all_ready=float(vector[0]) == 0, leaving=int(vector[1]), events=int(vector[2]),
            transitions=int(vector[3]), normalizer_count=total, normalizer_version=float(vector[5]),
            mean=pooled_mean.numpy(), std=torch.sqrt(pooled_var.clamp_min(0) + NORMALIZER_EPS).numpy(),
        )

    def barrier(self) -> None:
        with self._collective("barrier"):
            dist.barrier()

    def close(self) -> None:
        """Leave the group (destroy the process group, stop serving the rendezvous); safe twice."""
        if self._store is None:
            return
        if dist.is_initialized():
            dist.destroy_process_group()
        self._store = None

    @contextmanager
    def _collective(self, name: str) -> Iterator[None]:
        if self._store is None:
            raise GroupError(f"{name} on a closed group")
        try:
            yield
        except RuntimeError as e:  # what Gloo and NCCL raise for a dead, hung or departed peer
            raise GroupError(
                f"{name} failed on rank {self.rank} of {self.world_size} (a member died, hung past "
                f"{self.settings.timeout_seconds:g} s or left): restart every rank; they restore their "
                f"checkpoints and take rank 0's weights again ({e})"
            ) from e


def _buckets(tensors: list[torch.Tensor]) -> Iterator[tuple[torch.Tensor, list[torch.Tensor]]]:
    """Each dtype's tensors as one flat tensor (a copy), with the tensors it was made from."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for members in by_dtype.values():
        yield torch.cat([t.reshape(-1) for t in members]), members


def _unflatten(bucket: torch.Tensor, members: list[torch.Tensor]) -> None:
    offset = 0
    for t in members:
        t.copy_(bucket[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def share_learner_state(group: Group, learner: DQNLearner) -> None:
    """Make every rank's learner rank 0's: networks, optimizer state and update count.

    Call it on every rank at start and after any rank restores a checkpoint: equal weights are not
    enough, since Adam's moments decide the next step. Raises ConfigError on a rank whose learning
    settings differ from rank 0's (their updates would drift apart).
    """
    state = group.broadcast_object(learner.state_dict() if group.is_publisher else None)
    if not group.is_publisher:
        mine, theirs = learner.settings.as_dict(), state["settings"]
        differ = sorted(k for k in mine if k not in _LOCAL_SETTINGS and mine[k] != theirs.get(k))
        if differ:
            raise ConfigError(
                f"rank {group.rank}'s learner settings differ from rank 0's in {differ}: every rank must "
                f"learn with the same [learner] section"
            )
        learner.load_state_dict(state)
