"""Real behaviour as telemetry: API-call traces from MalBehavD-V1 and CAPE/Cuckoo reports, turned into
streamdqn's per-step events (the wire format of `streamdqn.stream.wire.TelemetryEvent`).

One sample (a CSV row, a report) becomes one episode; its API calls are cut into steps and each step
is summarized into the wire format's counts and flags by the tables below (`API_EFFECTS`, built from
`APIS_BY_EFFECT`). The counts of a step:

    syscall_count          every hooked call in the step (a CAPE record counts 1 + its `repeated`)
    file_read_count        calls that read file data: NtReadFile ReadFile ReadFileEx CopyFileA
                           CopyFileW CopyFileExA CopyFileExW CopyFile2
    file_write_count       calls that write, move, delete or re-stamp files and directories:
                           NtWriteFile WriteFile WriteFileEx CopyFileA CopyFileW CopyFileExA CopyFileExW
                           CopyFile2 MoveFileA MoveFileW MoveFileExA MoveFileExW MoveFileWithProgressA
                           MoveFileWithProgressW ReplaceFileA ReplaceFileW DeleteFileA DeleteFileW
                           NtDeleteFile CreateDirectoryA CreateDirectoryW CreateDirectoryExA
                           CreateDirectoryExW RemoveDirectoryA RemoveDirectoryW SetFileAttributesA
                           SetFileAttributesW SetFileTime SetEndOfFile URLDownloadToFileA URLDownloadToFileW
                           (opening a file - NtCreateFile, NtOpenFile - is neither a read nor a write)
    network_connections    outgoing and accepted connections: connect WSAConnect ConnectEx
                           WSAConnectByNameA WSAConnectByNameW WSAConnectByList accept WSAAccept
                           InternetConnectA InternetConnectW InternetOpenUrlA InternetOpenUrlW
                           URLDownloadToFileA URLDownloadToFileW WinHttpConnect
                           (DNS look-ups are not connections)
    bytes_sent             summed over send sendto WSASend WSASendTo ConnectEx InternetWriteFile
                           HttpSendRequestA HttpSendRequestW WinHttpSendRequest WinHttpWriteData
    bytes_received         summed over recv recvfrom WSARecv WSARecvFrom InternetReadFile InternetReadFileExA
                           InternetReadFileExW WinHttpReadData
                           The byte count of a call is its first length argument (`sent`, `received`,
                           `NumberOfBytesReceived`, `BufferLength`, `Length`, ... see `_LENGTH_ARGS`), else
                           the length of its logged buffer argument (`buffer`, `Buffer`, `SendBuffer`, ...),
                           with CAPE's `\\xNN` escapes counted as one byte. Monitors truncate logged buffers,
                           so the buffer length is a lower bound. Without arguments (MalBehavD): 0.
    child_processes        process creation: CreateProcessA CreateProcessW CreateProcessInternalW
                           CreateProcessAsUserA CreateProcessAsUserW CreateProcessWithLogonW
                           CreateProcessWithTokenW NtCreateProcess NtCreateProcessEx NtCreateUserProcess
                           RtlCreateUserProcess ShellExecuteExA ShellExecuteExW WinExec system

and its flags (true when at least one call of the step qualifies):

    registry_modification          RegSetValueA RegSetValueW RegSetValueExA RegSetValueExW RegSetKeyValueA
                                   RegSetKeyValueW RegCreateKeyA RegCreateKeyW RegCreateKeyExA RegCreateKeyExW
                                   RegDeleteKeyA RegDeleteKeyW RegDeleteKeyExA RegDeleteKeyExW RegDeleteValueA
                                   RegDeleteValueW RegDeleteTreeA RegDeleteTreeW RegRenameKey RegRestoreKeyA
                                   RegRestoreKeyW RegLoadKeyA RegLoadKeyW RegReplaceKeyA RegReplaceKeyW
                                   NtSetValueKey NtCreateKey NtDeleteKey NtDeleteValueKey NtRenameKey
                                   NtReplaceKey NtRestoreKey NtLoadKey NtLoadKey2 NtLoadKeyEx, and service
                                   configuration, which the service manager stores in the registry:
                                   CreateServiceA CreateServiceW ChangeServiceConfigA ChangeServiceConfigW
                                   DeleteService
    privilege_escalation_attempt   token privilege adjustment: AdjustTokenPrivileges NtAdjustPrivilegesToken
                                   RtlAdjustPrivilege LookupPrivilegeValueA LookupPrivilegeValueW. When the
                                   call names the privilege (CAPE's `PrivilegeName`), only the privileges in
                                   `SENSITIVE_PRIVILEGES` count (SeDebugPrivilege, SeTcbPrivilege,
                                   SeLoadDriverPrivilege, ...; not e.g. SeShutdownPrivilege). Without
                                   arguments (MalBehavD) every LookupPrivilegeValue counts: it is the step
                                   before enabling a privilege, but which one is unknown.
    code_injection_detected        writing, starting threads, queueing APCs, setting thread contexts or
                                   mapping sections in ANOTHER process:
                                   - cross-process by nature, counted unless the arguments show the caller
                                     itself (the current-process pseudo-handle, or its own pid):
                                     WriteProcessMemory NtWriteVirtualMemory CreateRemoteThread
                                     CreateRemoteThreadEx
                                   - counted only when the arguments show another process (so never for
                                     MalBehavD, which has no arguments): NtMapViewOfSection
                                     NtUnmapViewOfSection NtCreateThread NtCreateThreadEx RtlCreateUserThread
                                     NtQueueApcThread NtQueueApcThreadEx QueueUserAPC NtSetContextThread
                                     SetThreadContext
                                   The target is read from a process id argument (`ProcessId`,
                                   `process_identifier`), else from a process or thread handle: pseudo-handles
                                   (-1, -2) are the caller; handles the process got from NtOpenProcess,
                                   NtOpenThread or CreateProcess* are resolved to the pid logged there; any
                                   other process handle is taken as another process.

Argument names are matched case-insensitively and without underscores, so CAPE's `ProcessHandle` and
Cuckoo 2's `process_handle` are the same argument. A call's category is not used for the counts (CAPE's
`filesystem` holds NtQueryAttributesFile and NtWriteFile alike); it only drops records that are not
API calls (`anomaly`, `__notification__`). A call's `status` is not consulted either: a failed call is
still an attempt. APIs in none of the tables count in syscall_count only.

What a trace cannot tell, and the constant used instead:

    cpu_usage, memory_usage   0.0 in every step of both sources (neither records them per call), so they
                              carry no signal, and no label leaks through them.
    bytes (MalBehavD)         0: the rows are API names without arguments.
    severity                  benign: 0.0. Malicious: the `--labels` file's severity when it gives one, else
                              the report's score / 10 (CAPE `malscore`, Cuckoo `info.score`; clipped to
                              [0, 1]), else DEFAULT_MALICIOUS_SEVERITY = 0.5 (the middle third of the reward
                              table). MalBehavD has no scores: every malicious row gets 0.5.

Cutting a trace into steps:

    MalBehavD   N names per step in the order the row lists them (default 5: the 2 to 175 names per row
                become 1 to 35 steps, ~9 on average, near the simulator's 8 to 30). The dataset does not say
                that this order is chronological, and each name occurs once per row (a de-duplicated list,
                no call counts), so a step is "the next N distinct APIs", not a time slice.
    CAPE        `calls_per_step` N call records per step (default 100), after merging the calls of all
                processes in timestamp order (report order when a report has no timestamps). This is the
                default because sandbox clocks are unreliable as a step clock: CAPE and Cuckoo skip sleeps,
                and each process's times are its first-seen time plus offsets; N records give every step
                the same amount of evidence. A record stands for 1 + `repeated` identical calls; it is
                never split. `step_seconds` S cuts real time windows of S seconds from the first call
                instead (idle windows become all-zero steps; a trace longer than 100,000 windows is skipped).

Labels. MalBehavD rows carry their label (0 benign, 1 malicious, from VirusTotal). A report carries no
ground truth: labels come from a CSV file `sha256,is_malicious[,severity]` (optional header; is_malicious
1/0, true/false, malicious/benign), matched on `target.file.sha256`. A report without a matching row is
unlabelled; its label is never guessed (a malscore is not a verdict). Telemetry with labels inline needs
every episode labelled, so unlabelled reports are skipped and counted there; with `--verdicts-out` the
telemetry has no labels, and the verdicts file (`{"sandbox_id", "episode_id", "is_malicious", "severity",
"revision": 0, "source"}` per labelled episode, JSON Lines) simply has no line for them.

Ids and time. MalBehavD episode ids are `<first 16 hex of sha256>-L<line number in the CSV>`: 26 hashes
occur more than once and each row stays its own episode. Report episode ids are
`<first 16 hex of target.file.sha256>-t<info.id>` ("nosha256" for a report without one, e.g. a URL
analysis, which therefore stays unlabelled); a report given twice is skipped as a duplicate. Episodes
run back to back on `sandboxes` sandbox ids ("sbx-00", ...), the next episode on the first sandbox to free
up, with synthetic timestamps like the simulator's (a 5-30 s setup gap before each episode, 1-5 s between
steps, or exactly S with `step_seconds`, drawn from a generator seeded by `seed`), and the events of all
episodes come out in timestamp order, so a replay interleaves them as a live stream would. The last step
of an episode has `"final": true`. Extra fields: `syscall_types` (the step's up to three most frequent API
names), `source` ("malbehavd-v1" or "sandbox-report") and `sha256`.

Bad input: a row or report that cannot be read is skipped and counted with a reason (`Skip`); an input
that cannot be imported at all (an unreadable or foreign CSV, a bad labels file, nothing importable)
raises `TraceImportError`, whose message names the file and line and says what to do.
"""

from __future__ import annotations

import calendar
import csv
import heapq
import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np

from streamdqn.errors import StreamDQNError
from streamdqn.offline.simulator import format_for_path, write_events

__all__ = [
    "APIS_BY_EFFECT",
    "API_EFFECTS",
    "DEFAULT_MALICIOUS_SEVERITY",
    "SENSITIVE_PRIVILEGES",
    "Effect",
    "Episode",
    "Imported",
    "Label",
    "LabelRow",
    "Skip",
    "StepCounts",
    "TraceImportError",
    "cape_events",
    "import_cape",
    "import_files",
    "import_malbehavd",
    "malbehavd_events",
    "read_labels",
]

Event = dict[str, object]
Source = Literal["malbehavd", "cape"]


class TraceImportError(StreamDQNError):
    """An input that cannot be imported at all: unreadable, of the wrong format, or with nothing usable."""


class Effect(StrEnum):
    """What a call does, as far as the wire format cares."""

    FILE_READ = "file_read"
    FILE_WRITE = "file_write"
    CONNECT = "connect"
    SEND = "send"
    RECEIVE = "receive"
    SPAWN = "spawn"
    REGISTRY_WRITE = "registry_write"
    PRIVILEGE = "privilege"
    INJECT = "inject"  # cross-process by nature: counts unless the arguments show the caller itself
    INJECT_IF_REMOTE = "inject_if_remote"  # counts only when the arguments show another process


def _aw(*bases: str) -> tuple[str, ...]:
    """The ANSI and wide variants of Win32 API names."""
    return tuple(f"{base}{suffix}" for base in bases for suffix in "AW")


_COPY = (*_aw("CopyFile", "CopyFileEx"), "CopyFile2")
_DOWNLOAD = _aw("URLDownloadToFile")

APIS_BY_EFFECT: Mapping[Effect, tuple[str, ...]] = {
    Effect.FILE_READ: ("NtReadFile", "ReadFile", "ReadFileEx", *_COPY),
    Effect.FILE_WRITE: (
        "NtWriteFile", "WriteFile", "WriteFileEx", *_COPY,
        *_aw("MoveFile", "MoveFileEx", "MoveFileWithProgress", "ReplaceFile", "DeleteFile"), "NtDeleteFile",
        *_aw("CreateDirectory", "CreateDirectoryEx", "RemoveDirectory", "SetFileAttributes"),
        "SetFileTime", "SetEndOfFile", *_DOWNLOAD,
    ),
    Effect.CONNECT: (
        "connect", "WSAConnect", "ConnectEx", *_aw("WSAConnectByName"), "WSAConnectByList", "accept",
        "WSAAccept", *_aw("InternetConnect", "InternetOpenUrl"), *_DOWNLOAD, "WinHttpConnect",
    ),
    Effect.SEND: (
        "send", "sendto", "WSASend", "WSASendTo", "ConnectEx", "InternetWriteFile", *_aw("HttpSendRequest"),
        "WinHttpSendRequest", "WinHttpWriteData",
    ),
    Effect.RECEIVE: (
        "recv", "recvfrom", "WSARecv", "WSARecvFrom", "InternetReadFile", *_aw("InternetReadFileEx"),
        "WinHttpReadData",
    ),
    Effect.SPAWN: (
        *_aw("CreateProcess"), "CreateProcessInternalW", *_aw("CreateProcessAsUser"),
        "CreateProcessWithLogonW", "CreateProcessWithTokenW", "NtCreateProcess", "NtCreateProcessEx",
        "NtCreateUserProcess", "RtlCreateUserProcess", *_aw("ShellExecuteEx"), "WinExec", "system",
    ),
    Effect.REGISTRY_WRITE: (
        *_aw("RegSetValue", "RegSetValueEx", "RegSetKeyValue", "RegCreateKey", "RegCreateKeyEx",
             "RegDeleteKey", "RegDeleteKeyEx", "RegDeleteValue", "RegDeleteTree"),
        "RegRenameKey", *_aw("RegRestoreKey", "RegLoadKey", "RegReplaceKey"),
        "NtSetValueKey", "NtCreateKey", "NtDeleteKey", "NtDeleteValueKey", "NtRenameKey", "NtReplaceKey",
        "NtRestoreKey", "NtLoadKey", "NtLoadKey2", "NtLoadKeyEx",
        *_aw("CreateService", "ChangeServiceConfig"), "DeleteService",
    ),
    Effect.PRIVILEGE: (
        "AdjustTokenPrivileges", "NtAdjustPrivilegesToken", "RtlAdjustPrivilege",
        *_aw("LookupPrivilegeValue"),
    ),
    Effect.INJECT: (
        "WriteProcessMemory", "NtWriteVirtualMemory", "CreateRemoteThread", "CreateRemoteThreadEx",
    ),
    Effect.INJECT_IF_REMOTE: (
        "NtMapViewOfSection", "NtUnmapViewOfSection", "NtCreateThread", "NtCreateThreadEx",
        "RtlCreateUserThread", "NtQueueApcThread", "NtQueueApcThreadEx", "QueueUserAPC",
        "NtSetContextThread", "SetThreadContext",
    ),
}


def _by_api(by_effect: Mapping[Effect, tuple[str, ...]]) -> dict[str, frozenset[Effect]]:
    effects: dict[str, set[Effect]] = {}
    for effect, apis in by_effect.items():
        for api in apis:
            effects.setdefault(api, set()).add(effect)
    return {api: frozenset(e) for api, e in effects.items()}


API_EFFECTS: Mapping[str, frozenset[Effect]] = _by_api(APIS_BY_EFFECT)

# Privileges that give control over other processes, the kernel, or any file; a program enabling
# SeShutdownPrivilege or SeIncreaseQuotaPrivilege is not escalating.
SENSITIVE_PRIVILEGES = frozenset({
    "SeDebugPrivilege", "SeTcbPrivilege", "SeLoadDriverPrivilege", "SeTakeOwnershipPrivilege",
    "SeBackupPrivilege", "SeRestorePrivilege", "SeImpersonatePrivilege", "SeAssignPrimaryTokenPrivilege",
    "SeCreateTokenPrivilege", "SeSecurityPrivilege",
})
_SENSITIVE_LOWER = frozenset(p.lower() for p in SENSITIVE_PRIVILEGES)

# Wire fields fed by each effect: counts add the call's multiplicity, bytes add its byte count.
_COUNT_OF: Mapping[Effect, str] = {
    Effect.FILE_READ: "file_read_count",
    Effect.FILE_WRITE: "file_write_count",
    Effect.CONNECT: "network_connections",
    Effect.SPAWN: "child_processes",
}
_BYTES_OF: Mapping[Effect, str] = {Effect.SEND: "bytes_sent", Effect.RECEIVE: "bytes_received"}
_FLAG_OF: Mapping[Effect, str] = {
    Effect.REGISTRY_WRITE: "registry_modification",
    Effect.PRIVILEGE: "privilege_escalation_attempt",
    Effect.INJECT: "code_injection_detected",
    Effect.INJECT_IF_REMOTE: "code_injection_detected",
}

# Normalized argument names (lower case, no underscores), first match wins.
_LENGTH_ARGS = (
    "sent", "received", "numberofbytessent", "numberofbytesreceived", "numberofbytesrecvd",
    "numberofbytesread", "numberofbyteswritten", "bytessent", "bytesreceived", "bytesread", "byteswritten",
    "bufferlength", "length", "len",
)
_BUFFER_ARGS = ("buffer", "sendbuffer", "buf", "optional", "postdata")
_PID_ARGS = ("processid", "processidentifier")
_PRIVILEGE_ARGS = ("privilegename", "privilege", "name")
# APIs whose logged handles can be resolved to a pid (the pid argument of the same call).
_HANDLE_SOURCES = frozenset({
    "NtOpenProcess", "OpenProcess", "NtOpenThread", "OpenThread", "CreateProcessInternalW",
    *_aw("CreateProcess", "CreateProcessAsUser"), "CreateProcessWithLogonW", "CreateProcessWithTokenW",
    "NtCreateUserProcess",
})
# The pseudo-handles -1 (this process) and -2 (this thread) as 32- and 64-bit monitors log them.
_CURRENT_PROCESS = frozenset({0xFFFFFFFF, 2**64 - 1})
_CURRENT_THREAD = frozenset({0xFFFFFFFE, 2**64 - 2})
IGNORED_CATEGORIES = frozenset({"anomaly", "__notification__"})

DEFAULT_MALICIOUS_SEVERITY = 0.5
MALBEHAVD_NAMES_PER_STEP = 5
CAPE_CALLS_PER_STEP = 100
MAX_TIME_WINDOWS = 100_000
START_TIME = 1_767_225_600.0  # the simulator's default start, 2026-01-01
_STEP_GAP_S = (1.0, 5.0)
_SETUP_GAP_S = (5.0, 30.0)  # VM revert and sample upload before an episode's first step
MALBEHAVD_SOURCE = "malbehavd-v1"
REPORT_SOURCE = "sandbox-report"
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
_API_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ESCAPED_BYTE = re.compile(r"\\x[0-9a-fA-F]{2}")


class Call(NamedTuple):
    """One logged call record: `multiplicity` = 1 + `repeated`; `args` keyed by normalized name."""

    api: str
    args: Mapping[str, object]
    multiplicity: int = 1
    time: float | None = None
    pid: int | None = None


class StepCounts(NamedTuple):
    """One step's activity in wire-format fields, and its up to three most frequent API names."""

    syscall_count: int
    file_read_count: int
    file_write_count: int
    network_connections: int
    bytes_sent: int
    bytes_received: int
    child_processes: int
    registry_modification: bool
    privilege_escalation_attempt: bool
    code_injection_detected: bool
    syscall_types: tuple[str, ...]


class Label(NamedTuple):
    """Ground truth of one episode and where it came from (the verdict's `source`)."""

    is_malicious: bool
    severity: float
    source: str


class LabelRow(NamedTuple):
    """One line of a labels file; `severity` None when the file leaves it out."""

    is_malicious: bool
    severity: float | None


@dataclass(frozen=True)
class Episode:
    """One imported sample: its steps, label (None: unlabelled) and extra event fields."""

    episode_id: str
    steps: tuple[StepCounts, ...]
    label: Label | None
    extra: Mapping[str, object] = field(default_factory=dict)
    step_seconds: float | None = None  # the real step length when cut into time windows


class Skip(NamedTuple):
    """A row or report that did not become an episode: where, a short reason code, and what to do."""

    where: str
    reason: str
    detail: str


@dataclass(frozen=True)
class Imported:
    """The episodes of an import and what was skipped; `unit` is "row" or "report"."""

    episodes: list[Episode]
    skipped: list[Skip]
    unit: str

    def labelled_only(self) -> Imported:
        """Unlabelled episodes moved to `skipped`: telemetry with labels inline needs every label."""
        keep = [e for e in self.episodes if e.label is not None]
        dropped = [
            Skip(e.episode_id, "unlabelled",
                 "no --labels entry for its sha256; add one, or import with --verdicts-out")
            for e in self.episodes if e.label is None
        ]
        return replace(self, episodes=keep, skipped=[*self.skipped, *dropped])

    def events(self, *, sandboxes: int = 8, seed: int = 0, inline_labels: bool = True,
               start_time: float = START_TIME) -> Iterator[Event]:
        """Telemetry events of all episodes in timestamp order; see the module docstring for placement."""
        return _telemetry(_place(self.episodes, sandboxes, seed, start_time), inline_labels)

    def verdicts(self, *, sandboxes: int = 8, seed: int = 0,
                 start_time: float = START_TIME) -> Iterator[Event]:
        """One verdict per labelled episode; the same arguments give the same sandbox ids as `events`."""
        for placed in _place(self.episodes, sandboxes, seed, start_time):
            label = placed.episode.label
            if label is not None:
                yield {"sandbox_id": placed.sandbox_id, "episode_id": placed.episode.episode_id,
                       "is_malicious": label.is_malicious, "severity": label.severity, "revision": 0,
                       "source": label.source}


class _Malformed(Exception):
    """A row or report that cannot be used; carries the Skip reason and detail."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


# ----------------------------------------------------------------------------------------------------
# From calls to steps


def _normalize(name: str) -> str:
    return name.replace("_", "").lower()


def _as_int(value: object) -> int | None:
    """An int from a logged value: an int, or a decimal or 0x-hex string; None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text, 16) if text.lower().startswith(("0x", "-0x")) else int(text)
        except ValueError:
            return None
    return None


def _first(args: Mapping[str, object], names: Sequence[str]) -> object | None:
    return next((args[n] for n in names if n in args), None)


def _target(call: Call, handles: Mapping[int, int]) -> Literal["self", "other", "unknown"]:
    """Whose memory or threads a call touches: the caller's, another process's, or unknown."""
    pid = _as_int(_first(call.args, _PID_ARGS))
    if pid:  # 0: the monitor could not resolve it
        if call.pid is None:
            return "unknown"
        return "self" if pid == call.pid else "other"
    for name, pseudo, real_is_other in (("processhandle", _CURRENT_PROCESS, True),
                                        ("threadhandle", _CURRENT_THREAD, False)):
        handle = _as_int(call.args.get(name))
        if handle is None:
            continue
        handle %= 2**64
        if handle in pseudo:
            return "self"
        if handle in handles and call.pid is not None:
            return "self" if handles[handle] == call.pid else "other"
        # Processes reach their own memory through the pseudo-handle; a real process handle is another's.
        return "other" if real_is_other else "unknown"
    return "unknown"


def _remember_handles(call: Call, handles: dict[int, int]) -> None:
    if call.api not in _HANDLE_SOURCES:
        return
    pid = _as_int(_first(call.args, _PID_ARGS))
    if not pid:
        return
    for name in ("processhandle", "threadhandle"):
        handle = _as_int(call.args.get(name))
        if handle is not None and handle % 2**64 not in _CURRENT_PROCESS | _CURRENT_THREAD:
            handles[handle % 2**64] = pid


def _privilege_counts(call: Call) -> bool:
    named = _first(call.args, _PRIVILEGE_ARGS)
    return not isinstance(named, str) or named.strip().lower() in _SENSITIVE_LOWER


def call_effects(call: Call, handles: Mapping[int, int]) -> frozenset[Effect]:
    """The effects that apply to this call: its table entry, less the conditional ones that fail."""
    effects = API_EFFECTS.get(call.api, frozenset())
    if not effects & {Effect.PRIVILEGE, Effect.INJECT, Effect.INJECT_IF_REMOTE}:
        return effects
    target = _target(call, handles)
    dropped: set[Effect] = set()
    if Effect.PRIVILEGE in effects and not _privilege_counts(call):
        dropped.add(Effect.PRIVILEGE)
    if Effect.INJECT in effects and target == "self":
        dropped.add(Effect.INJECT)
    if Effect.INJECT_IF_REMOTE in effects and target != "other":
        dropped.add(Effect.INJECT_IF_REMOTE)
    return effects - dropped


def _byte_count(args: Mapping[str, object]) -> int:
    length = _as_int(_first(args, _LENGTH_ARGS))
    if length is not None and length >= 0:
        return length
    buffer = _first(args, _BUFFER_ARGS)
    if isinstance(buffer, str):
        return len(_ESCAPED_BYTE.sub("_", buffer))
    return 0


def _classify(calls: Iterable[Call]) -> list[tuple[Call, frozenset[Effect]]]:
    """Effects of each call in order; handle tables are per process and grow as calls come."""
    handles: dict[int | None, dict[int, int]] = {}
    out = []
    for call in calls:
        table = handles.setdefault(call.pid, {})
        out.append((call, call_effects(call, table)))
        _remember_handles(call, table)
    return out


def step_counts(group: Sequence[tuple[Call, frozenset[Effect]]]) -> StepCounts:
    """Summarize one step's classified calls into wire-format counts and flags."""
    totals: Counter[str] = Counter()
    apis: Counter[str] = Counter()
    for call, effects in group:
        totals["syscall_count"] += call.multiplicity
        apis[call.api] += call.multiplicity
        for effect in effects:
            if effect in _COUNT_OF:
                totals[_COUNT_OF[effect]] += call.multiplicity
            elif effect in _BYTES_OF:
                totals[_BYTES_OF[effect]] += call.multiplicity * _byte_count(call.args)
            else:
                totals[_FLAG_OF[effect]] = 1
    return StepCounts(
        syscall_count=totals["syscall_count"],
        file_read_count=totals["file_read_count"],
        file_write_count=totals["file_write_count"],
        network_connections=totals["network_connections"],
        bytes_sent=totals["bytes_sent"],
        bytes_received=totals["bytes_received"],
        child_processes=totals["child_processes"],
        registry_modification=totals["registry_modification"] > 0,
        privilege_escalation_attempt=totals["privilege_escalation_attempt"] > 0,
        code_injection_detected=totals["code_injection_detected"] > 0,
        syscall_types=tuple(api for api, _ in apis.most_common(3)),
    )


def _cut_by_count(classified: Sequence[tuple[Call, frozenset[Effect]]], n: int) -> list[StepCounts]:
    return [step_counts(classified[i:i + n]) for i in range(0, len(classified), n)]


def _cut_by_time(classified: Sequence[tuple[Call, frozenset[Effect]]], seconds: float) -> list[StepCounts]:
    times = [call.time for call, _ in classified]
    if any(t is None for t in times):
        raise _Malformed("no_timestamps", "some calls have no timestamp; cut with --calls-per-step instead")
    start = min(t for t in times if t is not None)
    windows = [int((t - start) // seconds) for t in times if t is not None]
    count = max(windows) + 1
    if count > MAX_TIME_WINDOWS:
        raise _Malformed("too_many_steps",
                         f"{count} windows of {seconds} s > {MAX_TIME_WINDOWS}; "
                         "use a larger --step-seconds or --calls-per-step")
    groups: list[list[tuple[Call, frozenset[Effect]]]] = [[] for _ in range(count)]
    for window, item in zip(windows, classified, strict=True):
        groups[window].append(item)
    return [step_counts(g) for g in groups]


# ----------------------------------------------------------------------------------------------------
# MalBehavD-V1


def import_malbehavd(paths: Sequence[Path], *, names_per_step: int = MALBEHAVD_NAMES_PER_STEP) -> Imported:
    """Episodes of MalBehavD-V1 CSV files (`sha256,labels,0..`); malformed rows are skipped and counted.

    Raises TraceImportError when a file cannot be read or is not a MalBehavD CSV.
    """
    if names_per_step < 1:
        raise TraceImportError(f"names per step must be >= 1, got {names_per_step}")
    episodes: list[Episode] = []
    skipped: list[Skip] = []
    for path in paths:
        for line, row in _malbehavd_rows(Path(path)):
            try:
                episodes.append(_malbehavd_episode(row, line, names_per_step))
            except _Malformed as bad:
                skipped.append(Skip(f"{path}:{line}", bad.reason, bad.detail))
    return _dedupe(Imported(episodes, skipped, "row"))


def _malbehavd_rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader, [])
            if [h.strip().lower() for h in header[:2]] != ["sha256", "labels"]:
                raise TraceImportError(
                    f"{path}:1: not a MalBehavD-V1 CSV: the header starts {header[:3]!r}, expected "
                    "'sha256,labels,0,1,...'; for sandbox reports use `streamdqn import cape`")
            for row in reader:
                if any(cell.strip() for cell in row):
                    yield reader.line_num, row
    except OSError as exc:
        raise TraceImportError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise TraceImportError(f"{path}: not a UTF-8 CSV ({exc}); is it the MalBehavD file?") from None


def _malbehavd_episode(row: list[str], line: int, names_per_step: int) -> Episode:
    if len(row) < 3:
        raise _Malformed("malformed_row", f"{len(row)} columns; expected sha256, label and API names")
    sha256, label_text = row[0].strip(), row[1].strip()
    if not _SHA256.fullmatch(sha256):
        raise _Malformed("malformed_row", f"sha256 {sha256[:80]!r} is not 64 hex digits")
    if label_text not in ("0", "1"):
        raise _Malformed("malformed_row", f"label {label_text[:20]!r}; expected 0 (benign) or 1 (malicious)")
    names = [cell.strip() for cell in row[2:] if cell.strip()]
    bad = [n for n in names if not _API_NAME.fullmatch(n)]
    if bad:
        raise _Malformed("malformed_row", f"{bad[0][:80]!r} is not an API name")
    if not names:
        raise _Malformed("malformed_row", "no API names")
    malicious = label_text == "1"
    steps = _cut_by_count(_classify(Call(name, {}) for name in names), names_per_step)
    return Episode(
        episode_id=f"{sha256[:16].lower()}-L{line}",
        steps=tuple(steps),
        label=Label(malicious, DEFAULT_MALICIOUS_SEVERITY if malicious else 0.0, MALBEHAVD_SOURCE),
        extra={"source": MALBEHAVD_SOURCE, "sha256": sha256.lower()},
    )


def malbehavd_events(csv_path: Path, *, names_per_step: int = MALBEHAVD_NAMES_PER_STEP, sandboxes: int = 8,
                     seed: int = 0) -> Iterator[Event]:
    """Telemetry events (labels inline) of a MalBehavD-V1 CSV. Strict: raises TraceImportError if any row
    is malformed (`import_malbehavd` skips and counts them instead)."""
    imported = import_malbehavd([csv_path], names_per_step=names_per_step)
    _raise_on_skips(imported)
    return imported.events(sandboxes=sandboxes, seed=seed)


# ----------------------------------------------------------------------------------------------------
# CAPE / Cuckoo reports


def read_labels(path: Path) -> dict[str, LabelRow]:
    """A labels file: CSV `sha256,is_malicious[,severity]`, optional header, `#` comments.

    Raises TraceImportError naming the line for anything it cannot use: labels are never guessed.
    """
    labels: dict[str, LabelRow] = {}
    try:
        with Path(path).open(newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            for row in reader:
                cells = [c.strip() for c in row]
                if not any(cells) or cells[0].startswith("#"):
                    continue
                if reader.line_num == 1 and cells[0].lower() == "sha256":
                    continue
                sha256, entry = _label_row(cells, f"{path}:{reader.line_num}")
                if labels.get(sha256, entry) != entry:
                    raise TraceImportError(f"{path}:{reader.line_num}: {sha256} labelled twice, differently")
                labels[sha256] = entry
    except OSError as exc:
        raise TraceImportError(f"{path}: cannot read the labels file: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise TraceImportError(f"{path}: not a readable UTF-8 CSV ({exc})") from None
    return labels


_TRUE = frozenset({"1", "true", "yes", "malicious"})
_FALSE = frozenset({"0", "false", "no", "benign"})


def _label_row(cells: list[str], where: str) -> tuple[str, LabelRow]:
    usage = "expected sha256,is_malicious[,severity] (is_malicious 1/0, severity 0..1)"
    if not 2 <= len(cells) <= 3 or not _SHA256.fullmatch(cells[0]):
        raise TraceImportError(f"{where}: {','.join(cells)[:120]!r}: {usage}")
    verdict = cells[1].lower()
    if verdict not in _TRUE | _FALSE:
        raise TraceImportError(f"{where}: is_malicious {cells[1]!r}: {usage}")
    severity = None
    if len(cells) == 3 and cells[2]:
        try:
            severity = float(cells[2])
        except ValueError:
            severity = math.nan
        if not 0.0 <= severity <= 1.0:
            raise TraceImportError(f"{where}: severity {cells[2]!r}: {usage}")
    return cells[0].lower(), LabelRow(verdict in _TRUE, severity)


def import_cape(inputs: Sequence[Path], *, labels: Mapping[str, LabelRow] | None = None,
                labels_source: str = "labels", calls_per_step: int | None = None,
                step_seconds: float | None = None) -> Imported:
    """Episodes of CAPE or Cuckoo 2 `report.json` files (a directory: every *.json under it).

    Reports that cannot be read or used are skipped and counted. Reports without a `labels` entry are
    unlabelled. Cut by `calls_per_step` records (default 100) or by `step_seconds` windows, not both.
    """
    calls_per_step, step_seconds = _cutting(calls_per_step, step_seconds)
    episodes: list[Episode] = []
    skipped: list[Skip] = []
    for path in _report_paths(inputs):
        try:
            report = _load_report(path)
            episode = _report_episode(report, labels or {}, labels_source, calls_per_step, step_seconds)
            episodes.append(episode)
        except _Malformed as bad:
            skipped.append(Skip(str(path), bad.reason, bad.detail))
    return _dedupe(Imported(episodes, skipped, "report"))


def cape_events(report: Mapping[str, object] | Path, *, labels: Mapping[str, LabelRow] | None = None,
                calls_per_step: int | None = None, step_seconds: float | None = None,
                sandbox_id: str = "sbx-00", start_time: float = START_TIME) -> list[Event]:
    """The events of one report on one sandbox. Labels inline when `labels` has the report's sha256,
    else none (the verdict-file form). Raises TraceImportError if the report cannot be used."""
    calls_per_step, step_seconds = _cutting(calls_per_step, step_seconds)
    where = str(report) if isinstance(report, Path) else "report"
    try:
        loaded = _load_report(report) if isinstance(report, Path) else report
        episode = _report_episode(loaded, labels or {}, "labels", calls_per_step, step_seconds)
    except _Malformed as bad:
        raise TraceImportError(f"{where}: {bad.detail}") from None
    placed = _place([episode], 1, 0, start_time)
    placed = [p._replace(sandbox_id=sandbox_id) for p in placed]
    return list(_telemetry(placed, inline_labels=episode.label is not None))


def _cutting(calls_per_step: int | None, step_seconds: float | None) -> tuple[int, float | None]:
    if calls_per_step is not None and step_seconds is not None:
        raise TraceImportError("cut by --calls-per-step or by --step-seconds, not both")
    if step_seconds is not None and not (math.isfinite(step_seconds) and step_seconds > 0):
        raise TraceImportError(f"step seconds must be a positive number, got {step_seconds}")
    n = CAPE_CALLS_PER_STEP if calls_per_step is None else calls_per_step
    if n < 1:
        raise TraceImportError(f"calls per step must be >= 1, got {n}")
    return n, step_seconds


def _report_paths(inputs: Sequence[Path]) -> Iterator[Path]:
    for path in map(Path, inputs):
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*.json") if p.is_file())
        else:
            yield path


def _load_report(path: Path) -> Mapping[str, object]:
    try:
        with path.open("rb") as f:
            value = json.load(f)
    except OSError as exc:
        raise _Malformed("unreadable", f"cannot read: {exc.strerror or exc}") from None
    except (ValueError, RecursionError) as exc:
        raise _Malformed("not_json", f"not JSON ({str(exc)[:200]}); expected a CAPE/Cuckoo report.json") \
            from None
    if not isinstance(value, dict):
        raise _Malformed("not_a_report", "the JSON is not an object; expected a CAPE/Cuckoo report.json")
    return value


def _dict_at(value: object, *keys: str) -> Mapping[str, object]:
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return value if isinstance(value, dict) else {}


def _report_episode(report: Mapping[str, object], labels: Mapping[str, LabelRow], labels_source: str,
                    calls_per_step: int, step_seconds: float | None) -> Episode:
    processes = _dict_at(report, "behavior").get("processes")
    if not isinstance(processes, list):
        raise _Malformed("not_a_report",
                         "no behavior.processes list: not a CAPE/Cuckoo report.json, or one without "
                         "behavioural analysis (nothing to import)")
    calls = _report_calls(processes)
    if not calls:
        raise _Malformed("no_calls", "behavior.processes has no API calls: was the report written with "
                                     "API calls left out? (check the sandbox's JSON report options)")
    if all(c.time is not None for c in calls):
        calls.sort(key=lambda c: c.time or 0.0)  # stable: ties keep process order
    classified = _classify(calls)
    if step_seconds is None:
        steps = _cut_by_count(classified, calls_per_step)
    else:
        steps = _cut_by_time(classified, step_seconds)
    sha256 = _report_sha256(report)
    task = _dict_at(report, "info").get("id")
    extra: dict[str, object] = {"source": REPORT_SOURCE}
    if sha256:
        extra["sha256"] = sha256
    return Episode(
        episode_id=f"{(sha256 or 'nosha256')[:16]}-t{task if isinstance(task, int | str) else 'none'}",
        steps=tuple(steps),
        label=_report_label(labels.get(sha256 or ""), _report_score(report), labels_source),
        extra=extra,
        step_seconds=step_seconds,
    )


def _report_calls(processes: list[object]) -> list[Call]:
    calls: list[Call] = []
    for index, process in enumerate(processes):
        if not isinstance(process, dict):
            raise _Malformed("malformed_report", f"behavior.processes[{index}] is not an object")
        pid = _as_int(process.get("process_id", process.get("pid")))
        records = process.get("calls", [])
        if not isinstance(records, list):
            raise _Malformed("malformed_report", f"behavior.processes[{index}].calls is not a list")
        for number, record in enumerate(records):
            call = _report_call(record, pid, f"behavior.processes[{index}].calls[{number}]")
            if call is not None:
                calls.append(call)
    return calls


def _report_call(record: object, pid: int | None, where: str) -> Call | None:
    if not isinstance(record, dict):
        raise _Malformed("malformed_report", f"{where} is not an object")
    api, category = record.get("api"), record.get("category")
    if category in IGNORED_CATEGORIES or api == "":
        return None
    if not isinstance(api, str):
        raise _Malformed("malformed_report", f"{where} has no api name")
    repeated = record.get("repeated", 0)
    if isinstance(repeated, bool) or not isinstance(repeated, int) or repeated < 0:
        raise _Malformed("malformed_report", f"{where}.repeated is {repeated!r}; expected a count >= 0")
    stamp = record.get("timestamp", record.get("time"))
    time = None if stamp is None else _parse_time(stamp)
    if stamp is not None and time is None:
        raise _Malformed("bad_timestamp", f"{where}: timestamp {str(stamp)[:60]!r} is not a time")
    return Call(api, _arguments(record.get("arguments"), where), 1 + repeated, time, pid)


def _arguments(value: object, where: str) -> dict[str, object]:
    """CAPE's [{"name", "value"}] or Cuckoo 2's {name: value}, keyed by normalized name."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return {_normalize(str(k)): v for k, v in value.items()}
    if isinstance(value, list):
        args: dict[str, object] = {}
        for item in value:
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                raise _Malformed("malformed_report", f"{where}.arguments has an entry without a name")
            args.setdefault(_normalize(item["name"]), item.get("value"))
        return args
    raise _Malformed("malformed_report", f"{where}.arguments is neither a list nor an object")


_TIME_FORMATS = ("%Y-%m-%d %H:%M:%S,%f", "%Y-%m-%d %H:%M:%S.%f", "%Y-%m-%d %H:%M:%S")


def _parse_time(value: object) -> float | None:
    """Epoch seconds of CAPE's "YYYY-MM-DD HH:MM:SS,mmm" (UTC assumed), or of a number (Cuckoo)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value) if math.isfinite(value) else None
    if not isinstance(value, str):
        return None
    for fmt in _TIME_FORMATS:
        try:
            parsed = datetime.strptime(value.strip(), fmt)
        except ValueError:
            continue
        return calendar.timegm(parsed.timetuple()) + parsed.microsecond / 1e6
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        try:
            number = float(value)
        except ValueError:
            return None
        return number if math.isfinite(number) else None
    aware = parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return aware.timestamp()


def _report_sha256(report: Mapping[str, object]) -> str | None:
    sha256 = _dict_at(report, "target", "file").get("sha256")
    return sha256.lower() if isinstance(sha256, str) and _SHA256.fullmatch(sha256) else None


def _report_score(report: Mapping[str, object]) -> float | None:
    """CAPE's malscore or Cuckoo's info.score, both on a 0-10 scale (Cuckoo's can exceed 10)."""
    for score in (report.get("malscore"), _dict_at(report, "info").get("score")):
        if isinstance(score, int | float) and not isinstance(score, bool) and math.isfinite(score):
            return float(score)
    return None


def _report_label(row: LabelRow | None, score: float | None, source: str) -> Label | None:
    if row is None:
        return None
    if not row.is_malicious:
        return Label(False, 0.0, source)
    if row.severity is not None:
        severity = row.severity
    elif score is not None:
        severity = min(max(score / 10.0, 0.0), 1.0)
    else:
        severity = DEFAULT_MALICIOUS_SEVERITY
    return Label(True, round(severity, 3), source)


# ----------------------------------------------------------------------------------------------------
# Placement on sandboxes and output


class _Placed(NamedTuple):
    episode: Episode
    sandbox_id: str
    timestamps: tuple[float, ...]


def _place(episodes: Sequence[Episode], sandboxes: int, seed: int, start_time: float) -> list[_Placed]:
    """Episodes back to back on sandboxes, each on the first one to free up (ties: lowest id)."""
    if sandboxes < 1:
        raise TraceImportError(f"sandboxes must be >= 1, got {sandboxes}")
    rng = np.random.default_rng(seed)
    free = [(start_time, sandbox) for sandbox in range(sandboxes)]
    placed = []
    for episode in episodes:
        free_at, sandbox = heapq.heappop(free)
        first = free_at + rng.uniform(*_SETUP_GAP_S)
        n = len(episode.steps)
        gaps = (np.full(n - 1, episode.step_seconds) if episode.step_seconds
                else rng.uniform(*_STEP_GAP_S, n - 1))
        timestamps = tuple(np.round(first + np.concatenate(([0.0], np.cumsum(gaps))), 3).tolist())
        heapq.heappush(free, (timestamps[-1], sandbox))
        placed.append(_Placed(episode, f"sbx-{sandbox:02d}", timestamps))
    return placed


def _telemetry(placed: Sequence[_Placed], inline_labels: bool) -> Iterator[Event]:
    streams = [_episode_events(p, inline_labels) for p in placed]
    # merge is stable: events with equal timestamps keep the order of their episodes.
    return (event for _, event in heapq.merge(*streams, key=lambda pair: pair[0]))


def _episode_events(placed: _Placed, inline_labels: bool) -> Iterator[tuple[float, Event]]:
    episode, label = placed.episode, placed.episode.label
    last = len(episode.steps) - 1
    for step, (counts, timestamp) in enumerate(zip(episode.steps, placed.timestamps, strict=True)):
        event: Event = {"sandbox_id": placed.sandbox_id, "episode_id": episode.episode_id, "step": step,
                        "timestamp": timestamp, "final": step == last}
        if inline_labels:
            if label is None:
                raise ValueError(f"episode {episode.episode_id} is unlabelled; use labelled_only() first")
            event["is_malicious"] = label.is_malicious
            event["severity"] = label.severity
        event.update(counts._asdict())
        event["syscall_types"] = list(counts.syscall_types)
        event["cpu_usage"] = 0.0
        event["memory_usage"] = 0.0
        event.update(episode.extra)
        yield timestamp, event


def _dedupe(imported: Imported) -> Imported:
    seen: set[str] = set()
    keep, dropped = [], []
    for episode in imported.episodes:
        if episode.episode_id in seen:
            dropped.append(Skip(episode.episode_id, "duplicate",
                                "the same sample and task were already imported; pass each input once"))
        else:
            seen.add(episode.episode_id)
            keep.append(episode)
    return replace(imported, episodes=keep, skipped=[*imported.skipped, *dropped])


def _raise_on_skips(imported: Imported) -> None:
    if imported.skipped:
        first = imported.skipped[0]
        raise TraceImportError(f"{len(imported.skipped)} {imported.unit}s cannot be imported; first: "
                               f"{first.where}: {first.reason}: {first.detail}")


@dataclass(frozen=True)
class ImportSummary:
    """What `import_files` wrote: counts for the summary line, and the skips to report."""

    imported: Imported
    events: int
    verdicts: int | None

    def line(self) -> str:
        episodes = self.imported.episodes
        malicious = sum(1 for e in episodes if e.label is not None and e.label.is_malicious)
        benign = sum(1 for e in episodes if e.label is not None and not e.label.is_malicious)
        unlabelled = len(episodes) - malicious - benign
        reasons = Counter(s.reason for s in self.imported.skipped)
        why = f" ({', '.join(f'{n} {r}' for r, n in reasons.most_common())})" if reasons else ""
        verdicts = "" if self.verdicts is None else f", {self.verdicts} verdicts"
        return (f"imported {len(episodes)} episodes, {self.events} events{verdicts}: "
                f"{malicious} malicious, {benign} benign, {unlabelled} unlabelled; "
                f"{len(self.imported.skipped)} {self.imported.unit}s skipped{why}")

    def warnings(self, limit: int = 20) -> list[str]:
        skipped = self.imported.skipped
        lines = [f"skipped {s.where}: {s.reason}: {s.detail}" for s in skipped[:limit]]
        if len(skipped) > limit:
            lines.append(f"... and {len(skipped) - limit} more skipped {self.imported.unit}s")
        return lines


def import_files(source: Source, inputs: Sequence[Path], out: Path, *, verdicts_out: Path | None = None,
                 labels: Path | None = None, calls_per_step: int | None = None,
                 step_seconds: float | None = None, sandboxes: int = 8, seed: int = 0) -> ImportSummary:
    """The `streamdqn import` command: read the inputs, write telemetry to `out` (labels inline, or
    none plus a verdicts file with `verdicts_out`), both atomically. Raises TraceImportError for input
    that cannot be imported at all, and when no episode is left to write."""
    if sandboxes < 1:
        raise TraceImportError(f"--sandboxes must be >= 1, got {sandboxes}")
    if source == "malbehavd":
        if step_seconds is not None:
            raise TraceImportError("MalBehavD rows have no timestamps; cut them with --calls-per-step N")
        if labels is not None:
            raise TraceImportError("MalBehavD rows carry their own labels; --labels is for sandbox reports")
        per_step = MALBEHAVD_NAMES_PER_STEP if calls_per_step is None else calls_per_step
        imported = import_malbehavd(inputs, names_per_step=per_step)
    else:
        table = read_labels(labels) if labels is not None else None
        imported = import_cape(inputs, labels=table, labels_source=f"labels:{labels.name}" if labels else "",
                               calls_per_step=calls_per_step, step_seconds=step_seconds)
    if verdicts_out is None:
        imported = imported.labelled_only()
    if not imported.episodes:
        reasons = Counter(s.reason for s in imported.skipped)
        hint = " (pass --labels FILE.csv, or use --verdicts-out)" if "unlabelled" in reasons else ""
        raise TraceImportError(f"no episodes to write: {len(imported.skipped)} {imported.unit}s skipped "
                               f"{dict(reasons)}{hint}; nothing was written")
    verdicts = None
    if verdicts_out is not None:
        verdicts = write_events(verdicts_out, imported.verdicts(sandboxes=sandboxes, seed=seed))
    events = write_events(out, imported.events(sandboxes=sandboxes, seed=seed,
                                               inline_labels=verdicts_out is None), fmt=format_for_path(out))
    return ImportSummary(imported, events, verdicts)
