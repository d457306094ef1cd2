"""Synthetic sandbox telemetry: detonations of benign programs and malware, step by step.

Each episode is one detonation in one sandbox. A benign episode runs one program kind (a browser,
an installer, a build, ...). A malicious episode runs a family's attack on top of a *cover*: the
benign-looking program it arrives in or hides behind, so its first steps look like that program.
The attack's intensity follows a sigmoid onset at an episode-specific step; "sleepers" delay the
onset for several steps to evade short detonations. Every value gets per-episode and per-step
noise, so single steps of the two classes overlap and the evidence builds up over the episode.

Sandboxes run their episodes one after another and `simulate` yields the events of all of them in
global timestamp order, as a live stream interleaves them. Everything is drawn from
`numpy.random.Generator`s seeded from `seed` (one per episode), so a seed fixes the output.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import json
import math
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal, NamedTuple

import numpy as np
import numpy.typing as npt

from streamdqn.atomic import atomic_write
from streamdqn.stream.wire import COUNT_FIELDS, FLAG_FIELDS

__all__ = [
    "BENIGN_KINDS", "MALWARE_FAMILIES", "format_for_path", "simulate", "without_labels", "write_events",
]

Event = dict[str, object]

# Column order of the activity matrices (the wire format's): the first seven are integer counts.
_COUNTS = COUNT_FIELDS
_FLAGS = FLAG_FIELDS

# Per-step multiplicative noise (lognormal sigma) per activity column: bytes are bursty, memory is smooth.
_STEP_SIGMA = (0.35, 0.5, 0.5, 0.5, 0.7, 0.7, 0.5, 0.2, 0.1)
# How much one sample, its inputs and its machine differ from the typical one (lognormal sigma).
_EPISODE_SIGMA = 0.3

_MIN_STEPS, _MAX_STEPS = 8, 30
_STEP_GAP_S = (1.0, 5.0)
_SETUP_GAP_S = (5.0, 30.0)  # VM revert and sample upload before an episode's first step


class _Mix(NamedTuple):
    """Names with weights, to draw one name at a time."""

    names: tuple[str, ...]
    cumulative: tuple[float, ...]  # normalized running total of the weights

    @classmethod
    def of(cls, weights: Mapping[str, float]) -> _Mix:
        total = sum(weights.values())
        return cls(tuple(weights), tuple(w / total for w in itertools.accumulate(weights.values())))

    def pick(self, rng: np.random.Generator) -> str:
        # bisect_right skips zero-weight names; min() guards against a total that rounds below 1.
        index = bisect.bisect_right(self.cumulative, rng.random())
        return self.names[min(index, len(self.names) - 1)]


@dataclass(frozen=True, slots=True)
class _Behaviour:
    """Typical per-step activity of a program kind, or what an attack adds on top of its cover."""

    syscalls: float
    file_reads: float
    file_writes: float
    connections: float
    bytes_sent: float
    bytes_received: float
    children: float
    cpu: float
    memory_mb: float
    syscall_types: tuple[str, ...]
    registry: float = 0.0
    privilege: float = 0.0
    injection: float = 0.0

    def rates(self) -> npt.NDArray[np.float64]:
        """Mean activity per step, in `_COUNTS` order followed by cpu % and memory MB."""
        return np.array(
            [
                self.syscalls,
                self.file_reads,
                self.file_writes,
                self.connections,
                self.bytes_sent,
                self.bytes_received,
                self.children,
                self.cpu,
                self.memory_mb,
            ]
        )

    def flag_probabilities(self) -> npt.NDArray[np.float64]:
        """Probability per step of each flag, in `_FLAGS` order."""
        return np.array([self.registry, self.privilege, self.injection])


@dataclass(frozen=True, slots=True)
class _Family:
    """A malware family: its attack, severity distribution, onset timing and preferred covers."""

    attack: _Behaviour
    severity_range: tuple[float, float]
    severity_shape: tuple[float, float]  # Beta(a, b) within severity_range
    onset_steps: tuple[float, float]  # uniform range of the sigmoid midpoint when not a sleeper
    sleeper_probability: float
    covers: _Mix  # benign kinds it arrives in or hides behind


# The tables are laid out by hand: _Behaviour(syscalls, file reads, file writes, connections,
# bytes sent, bytes received, child processes, cpu %, memory MB, syscall types, flag probabilities).
# fmt: off
_KINDS: Mapping[str, _Behaviour] = {
    "browser": _Behaviour(
        900, 25, 8, 6, 40_000, 900_000, 0.3, 18, 450,
        ("NtDeviceIoControlFile", "NtReadFile", "NtWaitForMultipleObjects", "NtCreateSection"),
        registry=0.02, injection=0.003,
    ),
    "office": _Behaviour(
        400, 15, 4, 0.5, 5_000, 20_000, 0.05, 8, 180,
        ("NtReadFile", "NtQueryAttributesFile", "NtMapViewOfSection", "NtOpenKey"),
        registry=0.05,
    ),
    # Looks risky (writes, children, registry, the odd elevation) but is benign.
    "installer": _Behaviour(
        1_500, 30, 60, 0.8, 3_000, 150_000, 1.5, 35, 220,
        ("NtCreateFile", "NtWriteFile", "NtSetValueKey", "NtCreateUserProcess"),
        registry=0.6, privilege=0.03,
    ),
    "updater": _Behaviour(
        700, 10, 20, 2.5, 15_000, 600_000, 0.4, 15, 120,
        ("NtDeviceIoControlFile", "NtWriteFile", "NtSetValueKey", "NtSetInformationFile"),
        registry=0.3, privilege=0.02,
    ),
    "compiler": _Behaviour(
        2_500, 80, 30, 0.1, 500, 2_000, 3.0, 75, 900,
        ("NtCreateUserProcess", "NtReadFile", "NtWriteFile", "NtWaitForSingleObject"),
    ),
    "backup": _Behaviour(
        1_800, 150, 5, 1.5, 1_500_000, 10_000, 0.1, 25, 300,
        ("NtReadFile", "NtQueryDirectoryFile", "NtDeviceIoControlFile", "NtQueryInformationFile"),
        registry=0.01,
    ),
}

_FAMILIES: Mapping[str, _Family] = {
    "ransomware": _Family(
        _Behaviour(
            3_000, 120, 120, 0.3, 2_000, 1_000, 0.5, 45, 150,
            ("NtReadFile", "NtWriteFile", "NtSetInformationFile", "NtCreateFile"),
            registry=0.3, privilege=0.15, injection=0.05,
        ),
        severity_range=(0.75, 1.0), severity_shape=(2.0, 1.5), onset_steps=(1.0, 4.0),
        sleeper_probability=0.3, covers=_Mix.of({"office": 3, "installer": 2, "browser": 1}),
    ),
    "dropper": _Family(
        _Behaviour(
            900, 10, 25, 4, 8_000, 1_200_000, 3, 20, 120,
            ("NtDeviceIoControlFile", "NtWriteFile", "NtCreateUserProcess", "NtAllocateVirtualMemory"),
            registry=0.35, privilege=0.1, injection=0.15,
        ),
        severity_range=(0.4, 0.7), severity_shape=(2.0, 2.0), onset_steps=(1.0, 3.0),
        sleeper_probability=0.25, covers=_Mix.of({"office": 3, "browser": 2, "installer": 1}),
    ),
    "infostealer": _Family(
        _Behaviour(
            800, 90, 3, 2, 400_000, 5_000, 0.2, 10, 60,
            ("NtQueryValueKey", "NtReadFile", "NtEnumerateKey", "NtDeviceIoControlFile"),
            registry=0.4, privilege=0.05, injection=0.2,
        ),
        severity_range=(0.4, 0.7), severity_shape=(2.0, 2.0), onset_steps=(1.5, 5.0),
        sleeper_probability=0.4, covers=_Mix.of({"browser": 2, "office": 2, "updater": 1}),
    ),
    "cryptominer": _Family(
        _Behaviour(
            150, 2, 1, 1, 6_000, 6_000, 0.2, 85, 600,
            ("NtCreateThreadEx", "NtDeviceIoControlFile", "NtYieldExecution"),
            registry=0.1, privilege=0.02, injection=0.05,
        ),
        severity_range=(0.1, 0.35), severity_shape=(2.0, 2.0), onset_steps=(1.0, 4.0),
        sleeper_probability=0.3, covers=_Mix.of({"installer": 2, "browser": 2, "updater": 1}),
    ),
    "worm": _Family(
        _Behaviour(
            1_500, 15, 15, 45, 300_000, 80_000, 3, 30, 150,
            ("NtDeviceIoControlFile", "NtCreateUserProcess", "NtWriteFile", "NtConnectPort"),
            registry=0.3, privilege=0.15, injection=0.1,
        ),
        severity_range=(0.55, 0.85), severity_shape=(2.0, 2.0), onset_steps=(1.0, 4.0),
        sleeper_probability=0.15, covers=_Mix.of({"updater": 2, "installer": 1, "office": 1}),
    ),
    "rootkit": _Family(
        _Behaviour(
            1_200, 10, 8, 0.5, 2_000, 2_000, 0.5, 15, 40,
            ("NtLoadDriver", "NtWriteVirtualMemory", "NtCreateThreadEx", "NtAdjustPrivilegesToken"),
            registry=0.5, privilege=0.7, injection=0.6,
        ),
        severity_range=(0.8, 1.0), severity_shape=(2.0, 1.5), onset_steps=(2.0, 6.0),
        sleeper_probability=0.5, covers=_Mix.of({"installer": 2, "updater": 2}),
    ),
    "adware": _Family(
        _Behaviour(
            400, 5, 6, 5, 20_000, 250_000, 0.5, 10, 120,
            ("NtSetValueKey", "NtDeviceIoControlFile", "NtCreateKey", "NtReadFile"),
            registry=0.45, injection=0.08,
        ),
        severity_range=(0.05, 0.3), severity_shape=(1.5, 2.5), onset_steps=(1.0, 5.0),
        sleeper_probability=0.2, covers=_Mix.of({"installer": 3, "browser": 2}),
    ),
}

_DEFAULT_KIND_WEIGHTS: Mapping[str, float] = {
    "browser": 0.22, "office": 0.20, "installer": 0.16, "updater": 0.14, "compiler": 0.14, "backup": 0.14,
}
_DEFAULT_FAMILY_WEIGHTS: Mapping[str, float] = {
    "ransomware": 0.18, "dropper": 0.18, "infostealer": 0.16, "cryptominer": 0.14,
    "worm": 0.10, "rootkit": 0.08, "adware": 0.16,
}
# fmt: on

BENIGN_KINDS: tuple[str, ...] = tuple(_KINDS)
"""Names of the benign program kinds, as they appear in an event's `family` field."""
MALWARE_FAMILIES: tuple[str, ...] = tuple(_FAMILIES)
"""Names of the malware families, as they appear in an event's `family` field."""


class _Identity(NamedTuple):
    family: str  # the benign kind for benign episodes
    cover: _Behaviour
    attack: _Family | None
    severity: float


def simulate(
    episodes: int,
    seed: int,
    *,
    malicious_fraction: float = 0.5,
    sandboxes: int = 8,
    start_time: float = 1_767_225_600.0,
    kind_weights: Mapping[str, float] | None = None,
    family_weights: Mapping[str, float] | None = None,
) -> Iterator[dict[str, object]]:
    """Events of `episodes` detonations, interleaved across sandboxes in timestamp order.

    Each of `sandboxes` sandboxes runs one episode at a time; the next episode goes to the first
    sandbox to free up. Episode ids are 0 .. `episodes` - 1, handed out in that order.
    Each episode is malicious with probability `malicious_fraction`. `kind_weights` and
    `family_weights` set the mix of benign kinds (`BENIGN_KINDS`) and malware families
    (`MALWARE_FAMILIES`); names left out get weight 0, and None keeps the default mix.

    Episode `k` is drawn from its own generator seeded by (`seed`, `k`), so it does not depend on
    how many episodes or sandboxes there are, only its timestamps do.

    Raises ValueError for a negative `episodes` or `seed`, `sandboxes` < 1, `malicious_fraction`
    outside [0, 1], a non-finite `start_time`, or unknown, negative or all-zero weights.
    """
    if episodes < 0:
        raise ValueError(f"episodes must be >= 0, got {episodes}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if sandboxes < 1:
        raise ValueError(f"sandboxes must be >= 1, got {sandboxes}")
    if not 0.0 <= malicious_fraction <= 1.0:
        raise ValueError(f"malicious_fraction must be in [0, 1], got {malicious_fraction}")
    if not math.isfinite(start_time) or start_time < 0:
        raise ValueError(f"start_time must be a finite epoch time >= 0, got {start_time}")
    kinds = _mix("kind_weights", BENIGN_KINDS, kind_weights or _DEFAULT_KIND_WEIGHTS, malicious_fraction < 1)
    families = _mix(
        "family_weights", MALWARE_FAMILIES, family_weights or _DEFAULT_FAMILY_WEIGHTS, malicious_fraction > 0
    )
    return _stream(episodes, seed, malicious_fraction, sandboxes, start_time, kinds, families)


def write_events(
    path: Path, events: Iterable[dict[str, object]], *, fmt: Literal["jsonl", "json"] = "jsonl"
) -> int:
    """Write events as JSON Lines or one JSON array, atomically; return the count.

    Goes through `atomic.atomic_write` (temp file in the same directory, fsync, `os.replace`), so
    readers see the old file or the complete new one. Events are streamed, not collected first.
    Any failure (a non-finite float raises ValueError) leaves `path` untouched.
    """
    if fmt not in ("jsonl", "json"):
        raise ValueError(f"fmt must be 'jsonl' or 'json', got {fmt!r}")
    count = 0

    def write(out: BinaryIO) -> None:
        nonlocal count
        if fmt == "jsonl":
            for event in events:
                out.write(_dumps(event).encode() + b"\n")
                count += 1
            return
        out.write(b"[")
        for event in events:
            out.write((b"\n" if count == 0 else b",\n") + _dumps(event).encode())
            count += 1
        out.write(b"\n]\n")

    atomic_write(path, write)
    return count


def without_labels(
    events: Iterable[dict[str, object]], verdicts: list[dict[str, object]], *, delay_seconds: float = 60.0
) -> Iterator[dict[str, object]]:
    """The events without is_malicious/severity (as production sandboxes send them); each episode's
    verdict is appended to `verdicts` as its last event passes, timestamped `delay_seconds` later."""
    for event in events:
        label = {"is_malicious": event.pop("is_malicious"), "severity": event.pop("severity")}
        if event.get("final"):
            verdicts.append({"sandbox_id": event["sandbox_id"], "episode_id": event["episode_id"], **label,
                             "revision": 0, "source": "simulator",
                             "timestamp": round(float(event["timestamp"]) + delay_seconds, 3)})  # type: ignore[arg-type]
        yield event


def format_for_path(path: Path) -> Literal["jsonl", "json"]:
    """'json' for *.json, else 'jsonl'."""
    return "json" if Path(path).suffix.lower() == ".json" else "jsonl"


def _dumps(event: Event) -> str:
    return json.dumps(event, separators=(",", ":"), allow_nan=False)


def _mix(argument: str, known: tuple[str, ...], weights: Mapping[str, float], needed: bool) -> _Mix:
    """Validated weights over all `known` names; names left out get weight 0."""
    unknown = sorted(set(weights) - set(known))
    if unknown:
        raise ValueError(f"{argument}: unknown names {unknown}; expected some of {list(known)}")
    values = {name: float(weights.get(name, 0.0)) for name in known}
    if not all(math.isfinite(v) and v >= 0 for v in values.values()):
        raise ValueError(f"{argument}: weights must be finite and >= 0, got {dict(weights)}")
    if sum(values.values()) > 0:
        return _Mix.of(values)
    if needed:
        raise ValueError(f"{argument}: at least one weight must be > 0")
    return _Mix.of(dict.fromkeys(known, 1.0))  # never drawn from


def _stream(
    episodes: int,
    seed: int,
    malicious_fraction: float,
    sandboxes: int,
    start_time: float,
    kinds: _Mix,
    families: _Mix,
) -> Iterator[Event]:
    def run(episode_id: int, sandbox: int, free_at: float) -> deque[tuple[float, Event]]:
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(episode_id,)))
        identity = _draw_identity(rng, malicious_fraction, kinds, families)
        return deque(_episode(rng, identity, episode_id, f"sbx-{sandbox:02d}", free_at))

    # Each sandbox holds the rest of its current episode; `ready` orders sandboxes by next timestamp.
    pending = [run(sandbox, sandbox, start_time) for sandbox in range(min(sandboxes, episodes))]
    ready = [(queue[0][0], sandbox) for sandbox, queue in enumerate(pending)]
    heapq.heapify(ready)
    next_episode = len(pending)
    while ready:
        _, sandbox = heapq.heappop(ready)
        timestamp, event = pending[sandbox].popleft()
        yield event
        if not pending[sandbox] and next_episode < episodes:
            # The next episode starts at least a setup gap later, so the global order holds.
            pending[sandbox] = run(next_episode, sandbox, timestamp)
            next_episode += 1
        if pending[sandbox]:
            heapq.heappush(ready, (pending[sandbox][0][0], sandbox))


def _draw_identity(
    rng: np.random.Generator, malicious_fraction: float, kinds: _Mix, families: _Mix
) -> _Identity:
    if rng.random() >= malicious_fraction:
        kind = kinds.pick(rng)
        return _Identity(kind, _KINDS[kind], None, 0.0)
    name = families.pick(rng)
    family = _FAMILIES[name]
    cover = family.covers.pick(rng)
    low, high = family.severity_range
    severity = low + (high - low) * rng.beta(*family.severity_shape)
    return _Identity(name, _KINDS[cover], family, round(float(severity), 3))


def _onset_curve(rng: np.random.Generator, family: _Family, length: int) -> npt.NDArray[np.float64]:
    """Attack intensity in [0, 1] per step: a sigmoid around an onset step."""
    if rng.random() < family.sleeper_probability:
        # Sleepers stay dormant for several steps but still act before the detonation ends.
        latest = max(6.0, min(0.65 * length, length - 3.0))
        midpoint = rng.uniform(5.0, latest)
        width = rng.uniform(0.5, 1.5)
    else:
        midpoint = rng.uniform(*family.onset_steps)
        width = rng.uniform(0.8, 2.5)
    return _ramp(length, midpoint, width)


def _phase_curve(rng: np.random.Generator, length: int) -> npt.NDArray[np.float64]:
    """Benign activity level per step: programs change phase too (an installer starts extracting)."""
    amplitude = rng.uniform(-0.4, 1.0)
    midpoint = rng.uniform(0.0, length)
    width = rng.uniform(0.5, 3.0)
    return 1.0 + amplitude * _ramp(length, midpoint, width)


def _ramp(length: int, midpoint: float, width: float) -> npt.NDArray[np.float64]:
    """A sigmoid over steps 0..length-1, 0.5 at `midpoint`, rising over about `width` steps."""
    return 1.0 / (1.0 + np.exp((midpoint - np.arange(length, dtype=np.float64)) / width))


def _episode(
    rng: np.random.Generator, identity: _Identity, episode_id: int, sandbox_id: str, free_at: float
) -> list[tuple[float, Event]]:
    """The events of one episode, each with its timestamp as a float for ordering."""
    length = int(rng.integers(_MIN_STEPS, _MAX_STEPS + 1))
    first = free_at + rng.uniform(*_SETUP_GAP_S)
    offsets = np.concatenate(([0.0], np.cumsum(rng.uniform(*_STEP_GAP_S, length - 1))))
    timestamps: list[float] = np.round(first + offsets, 3).tolist()

    phase = _phase_curve(rng, length)[:, None]
    cover = identity.cover
    mean = cover.rates() * rng.lognormal(0.0, _EPISODE_SIGMA, 9) * phase
    flag_p = np.broadcast_to(cover.flag_probabilities(), (length, 3))
    if identity.attack is None:
        intensity = np.zeros(length)
    else:
        attack = identity.attack.attack
        intensity = _onset_curve(rng, identity.attack, length)
        strength = rng.lognormal(0.0, 0.25) * rng.lognormal(0.0, _EPISODE_SIGMA, 9)
        mean = mean + intensity[:, None] * (attack.rates() * strength)
        flag_p = 1.0 - (1.0 - flag_p) * (1.0 - intensity[:, None] * attack.flag_probabilities())

    # Mean-one lognormal noise, then Poisson draws for the counts.
    sigma = np.asarray(_STEP_SIGMA)
    noisy = mean * rng.lognormal(-0.5 * sigma**2, sigma, (length, 9))
    counts = rng.poisson(noisy[:, :7]).tolist()
    cpu = np.round(np.clip(noisy[:, 7], 0.0, 100.0), 3).tolist()
    memory = np.round(noisy[:, 8], 3).tolist()
    flags = (rng.random((length, 3)) < flag_p).tolist()
    syscall_types = _syscall_types(rng, cover, identity.attack, intensity)

    common = {"sandbox_id": sandbox_id, "episode_id": episode_id}
    malicious = identity.attack is not None
    events: list[tuple[float, Event]] = []
    for step in range(length):
        event: Event = {
            **common,
            "step": step,
            "timestamp": timestamps[step],
            "final": step == length - 1,
            "is_malicious": malicious,
            "severity": identity.severity,
        }
        event.update(zip(_COUNTS, counts[step], strict=True))
        event["cpu_usage"] = cpu[step]
        event["memory_usage"] = memory[step]
        event.update(zip(_FLAGS, flags[step], strict=True))
        event["family"] = identity.family
        event["syscall_types"] = syscall_types[step]
        events.append((timestamps[step], event))
    return events


def _syscall_types(
    rng: np.random.Generator, cover: _Behaviour, attack: _Family | None, intensity: npt.NDArray[np.float64]
) -> list[list[str]]:
    """Up to three dominant syscalls per step, from the attack in proportion to its intensity."""
    length = len(intensity)
    attack_names = attack.attack.syscall_types if attack is not None else ()
    pool = cover.syscall_types + attack_names
    from_attack = rng.random((length, 3)) < intensity[:, None]
    cover_pick = rng.integers(0, len(cover.syscall_types), (length, 3))
    # Benign episodes have zero intensity, so their attack picks (into an empty list) are never used.
    attack_pick = len(cover.syscall_types) + rng.integers(0, max(len(attack_names), 1), (length, 3))
    picks = np.where(from_attack, attack_pick, cover_pick).tolist()
    return [list(dict.fromkeys(pool[i] for i in row)) for row in picks]
