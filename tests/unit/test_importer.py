"""`streamdqn import`: real API-call traces (MalBehavD-V1, CAPE and Cuckoo 2 reports) to telemetry.

The handmade reports under tests/data/importer hold known calls, so every count and flag of every
step is asserted exactly; the shipped MalBehavD CSV is converted whole.
"""

from __future__ import annotations

import copy
import json
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import streamdqn.offline.importer as importer
from streamdqn.cli import main
from streamdqn.offline.importer import (
    API_EFFECTS,
    APIS_BY_EFFECT,
    Call,
    Effect,
    LabelRow,
    TraceImportError,
    call_effects,
    cape_events,
    import_cape,
    import_files,
    import_malbehavd,
    malbehavd_events,
    read_labels,
)
from streamdqn.offline.simulator import write_events
from streamdqn.stream.wire import COUNT_FIELDS, FLAG_FIELDS, read_events_file

DATA = Path(__file__).resolve().parents[1] / "data" / "importer"
CAPE = DATA / "cape_report.json"
CUCKOO = DATA / "cuckoo2_report.json"
CAPE_SHA = "a1" * 32
CUCKOO_SHA = "c2" * 32
MALBEHAVD = Path(__file__).resolve().parents[2].parent / "shared/data/malbehavd-v1/MalBehavD-V1-dataset.csv"
SHAPE = (*COUNT_FIELDS, *FLAG_FIELDS)

Event = dict[str, Any]


def step(**nonzero: int | bool) -> dict[str, int | bool]:
    """A step's counts and flags: zero/false except the ones given."""
    unknown = set(nonzero) - set(SHAPE)
    assert not unknown, unknown
    return {f: nonzero.get(f, False if f in FLAG_FIELDS else 0) for f in SHAPE}


def shape(events: list[Event]) -> list[dict[str, int | bool]]:
    return [{f: e[f] for f in SHAPE} for e in sorted(events, key=lambda e: e["step"])]


def load(path: Path) -> dict[str, Any]:
    report: dict[str, Any] = json.loads(path.read_text())
    return report


def cape(report: Path | dict[str, Any], **options: Any) -> list[Event]:
    events: list[Any] = cape_events(report, **options)
    return events


def write_json(path: Path, value: object) -> Path:
    path.write_text(json.dumps(value))
    return path


def decode_cleanly(path: Path) -> list[Any]:
    decoded = read_events_file(path)
    assert decoded.rejects == []
    return decoded.events


# ---------------------------------------------------------------------------------------------------
# CAPE and Cuckoo 2 reports: exact counts per step


# Calls of both processes merged by time, 4 records per step: the child's first call (NtCreateKey at
# 02.500) lands between the parent's steps; the anomaly record is dropped.
CAPE_BY_4 = [
    # NtCreateFile, NtWriteFile x3 (repeated=2), NtReadFile, RegSetValueExW
    step(syscall_count=6, file_read_count=1, file_write_count=3, registry_modification=True),
    # connect, send "\x16\x03abc" = 5 bytes, recv 10 bytes, WSARecv NumberOfBytesReceived=1024
    step(syscall_count=4, network_connections=1, bytes_sent=5, bytes_received=1034),
    # CreateProcessInternalW; SeShutdownPrivilege is not sensitive; map and write into itself (-1)
    step(syscall_count=4, child_processes=1),
    # child's NtCreateKey; SeDebugPrivilege; map into the child (handle 0x1a4 from CreateProcess); APC
    step(syscall_count=4, registry_modification=True, privilege_escalation_attempt=True,
         code_injection_detected=True),
    # NtResumeThread (not injection), child's DeleteFileW
    step(syscall_count=2, file_write_count=1),
]


def test_cape_report_steps_by_call_count() -> None:
    events = cape(CAPE, labels={CAPE_SHA: LabelRow(True, None)}, calls_per_step=4)
    assert shape(events) == CAPE_BY_4
    assert [e["final"] for e in events] == [False, False, False, False, True]
    assert {e["episode_id"] for e in events} == {f"{CAPE_SHA[:16]}-t42"}
    assert {(e["is_malicious"], e["severity"]) for e in events} == {(True, 0.75)}  # malscore 7.5 / 10
    assert events[3]["syscall_types"][0] in {"NtCreateKey", "LookupPrivilegeValueW", "NtMapViewOfSection"}
    assert {e["cpu_usage"] for e in events} == {e["memory_usage"] for e in events} == {0.0}
    assert {e["source"] for e in events} == {"sandbox-report"}
    assert events[0]["sha256"] == CAPE_SHA


def test_cape_report_steps_by_time_window() -> None:
    by_second = cape(CAPE, step_seconds=1.0)
    assert shape(by_second) == [
        CAPE_BY_4[0],
        CAPE_BY_4[1],
        step(syscall_count=5, child_processes=1, registry_modification=True),  # 02.0xx and the child's 02.500
        step(syscall_count=4, privilege_escalation_attempt=True, code_injection_detected=True),
        step(syscall_count=1, file_write_count=1),
    ]
    offsets = [e["timestamp"] - by_second[0]["timestamp"] for e in by_second]
    assert offsets == pytest.approx([0.0, 1.0, 2.0, 3.0, 4.0], abs=1e-3)
    assert "is_malicious" not in by_second[0]  # no labels: the verdict-file form

    half = shape(cape(CAPE, step_seconds=0.5))
    assert len(half) == 9  # windows 0 .. 8 from the first call; idle windows are all-zero steps
    assert [i for i, s in enumerate(half) if s == step()] == [1, 3, 7]


def test_cuckoo2_report_steps() -> None:
    events = cape(CUCKOO, labels={CUCKOO_SHA: LabelRow(True, None)}, calls_per_step=3)
    assert shape(events) == [
        step(syscall_count=3, file_write_count=1, registry_modification=True, child_processes=1),
        # WriteProcessMemory through the handle CreateProcessInternalW returned for pid 600; `sent` wins
        # over the logged buffer; InternetOpenUrlW is a connection
        step(syscall_count=3, code_injection_detected=True, bytes_sent=512, network_connections=1),
        # the child: recv of 2048 bytes, LookupPrivilegeValueW(privilege_name=SeDebugPrivilege)
        step(syscall_count=2, bytes_received=2048, privilege_escalation_attempt=True),
    ]
    assert {e["severity"] for e in events} == {1.0}  # info.score 12.4 / 10, clipped
    assert events[0]["episode_id"] == f"{CUCKOO_SHA[:16]}-t7"


def test_reports_without_timestamps_keep_report_order(tmp_path: Path) -> None:
    report = load(CAPE)
    for process in report["behavior"]["processes"]:
        for call in process["calls"]:
            del call["timestamp"]
    events = cape(write_json(tmp_path / "r.json", report), calls_per_step=4)
    # the parent's 16 calls, then the child's 2: the child's NtCreateKey moves to the last step
    assert shape(events) == [
        *CAPE_BY_4[:3],
        step(syscall_count=4, privilege_escalation_attempt=True, code_injection_detected=True),
        step(syscall_count=2, registry_modification=True, file_write_count=1),
    ]
    with pytest.raises(TraceImportError, match="no timestamp"):
        cape(report, step_seconds=1.0)


# ---------------------------------------------------------------------------------------------------
# The mapping: one call at a time

HANDLE = "0x000001a4"


@pytest.mark.parametrize(
    ("api", "args", "handles", "effect", "expected"),
    [
        # cross-process by nature: counted unless the arguments show the caller itself
        ("WriteProcessMemory", {}, {}, Effect.INJECT, True),
        ("WriteProcessMemory", {"processhandle": "0xffffffff"}, {}, Effect.INJECT, False),
        ("WriteProcessMemory", {"processhandle": "0xffffffffffffffff"}, {}, Effect.INJECT, False),
        ("WriteProcessMemory", {"processhandle": HANDLE}, {}, Effect.INJECT, True),
        ("WriteProcessMemory", {"processhandle": HANDLE}, {0x1A4: 10}, Effect.INJECT, False),
        ("CreateRemoteThread", {"processid": 10}, {}, Effect.INJECT, False),
        ("CreateRemoteThread", {"processid": 11}, {}, Effect.INJECT, True),
        # counted only when the arguments show another process
        ("NtMapViewOfSection", {}, {}, Effect.INJECT_IF_REMOTE, False),
        ("NtMapViewOfSection", {"processhandle": -1}, {}, Effect.INJECT_IF_REMOTE, False),
        ("NtMapViewOfSection", {"processhandle": HANDLE}, {}, Effect.INJECT_IF_REMOTE, True),
        ("NtMapViewOfSection", {"processhandle": HANDLE}, {0x1A4: 10}, Effect.INJECT_IF_REMOTE, False),
        ("NtQueueApcThread", {"processid": 0, "threadhandle": "0x1a8"}, {}, Effect.INJECT_IF_REMOTE, False),
        ("NtQueueApcThread", {"processid": 11}, {}, Effect.INJECT_IF_REMOTE, True),
        ("NtSetContextThread", {"threadhandle": "0xfffffffe"}, {}, Effect.INJECT_IF_REMOTE, False),
        ("NtSetContextThread", {"threadhandle": "0x1a8"}, {}, Effect.INJECT_IF_REMOTE, False),
        ("NtSetContextThread", {"threadhandle": "0x1a8"}, {0x1A8: 11}, Effect.INJECT_IF_REMOTE, True),
        # privileges: only sensitive ones when the call names it; every one when it does not
        ("LookupPrivilegeValueW", {}, {}, Effect.PRIVILEGE, True),
        ("LookupPrivilegeValueW", {"privilegename": "SeDebugPrivilege"}, {}, Effect.PRIVILEGE, True),
        ("LookupPrivilegeValueW", {"privilegename": "sedebugprivilege"}, {}, Effect.PRIVILEGE, True),
        ("LookupPrivilegeValueW", {"privilegename": "SeShutdownPrivilege"}, {}, Effect.PRIVILEGE, False),
        ("NtAdjustPrivilegesToken", {}, {}, Effect.PRIVILEGE, True),
    ],
)
def test_conditional_effects(api: str, args: dict[str, object], handles: dict[int, int], effect: Effect,
                             expected: bool) -> None:
    assert (effect in call_effects(Call(api, args, pid=10), handles)) is expected


def test_unconditional_effects_and_unknown_apis() -> None:
    assert call_effects(Call("CopyFileW", {}), {}) == {Effect.FILE_READ, Effect.FILE_WRITE}
    assert call_effects(Call("URLDownloadToFileW", {}), {}) == {Effect.CONNECT, Effect.FILE_WRITE}
    assert call_effects(Call("ConnectEx", {}), {}) == {Effect.CONNECT, Effect.SEND}
    assert call_effects(Call("NtCreateFile", {}), {}) == set()  # opening is neither a read nor a write
    assert call_effects(Call("GetTickCount", {}), {}) == set()


def test_byte_count_prefers_length_arguments_and_counts_escapes_as_one_byte() -> None:
    def sent(**args: object) -> int:
        return importer.step_counts([(Call("send", args), frozenset({Effect.SEND}))]).bytes_sent

    assert sent(sent=512, buffer="abc") == 512
    assert sent(bufferlength=0, buffer="abc") == 0
    assert sent(buffer="\\x00\\x01ab\\") == 5
    assert sent() == 0
    repeated = Call("send", {"sent": 10}, multiplicity=3)
    assert importer.step_counts([(repeated, frozenset({Effect.SEND}))]).bytes_sent == 30


def test_docstring_lists_every_api_of_the_tables() -> None:
    doc = importer.__doc__ or ""
    words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", doc))
    assert sorted(set(API_EFFECTS) - words) == []
    assert set(APIS_BY_EFFECT) == set(Effect)


api_names = st.sampled_from([*sorted(API_EFFECTS), "GetTickCount", "NtClose"])


@settings(max_examples=60, deadline=None)
@given(names=st.lists(api_names, min_size=1, max_size=60), n=st.integers(1, 12), m=st.integers(1, 12))
def test_totals_do_not_depend_on_the_cut(names: list[str], n: int, m: int) -> None:
    classified = importer._classify(Call(name, {}) for name in names)
    a, b = importer._cut_by_count(classified, n), importer._cut_by_count(classified, m)
    assert len(a) == -(-len(names) // n)
    for f in COUNT_FIELDS:
        assert sum(getattr(s, f) for s in a) == sum(getattr(s, f) for s in b)
    for f in FLAG_FIELDS:
        assert any(getattr(s, f) for s in a) == any(getattr(s, f) for s in b)
    assert sum(s.syscall_count for s in a) == len(names)


# ---------------------------------------------------------------------------------------------------
# Labels, verdicts and bad input


def test_labels_file(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    path.write_text(f"sha256,is_malicious,severity\n# a comment\n{'AB' * 32},1,0.9\n{'cd' * 32},benign\n"
                    f"{'ef' * 32},true,\n\n{'ab' * 32},1,0.9\n")
    assert read_labels(path) == {
        "ab" * 32: LabelRow(True, 0.9),
        "cd" * 32: LabelRow(False, None),
        "ef" * 32: LabelRow(True, None),
    }


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("nothex,1", "is_malicious"),
        (f"{'ab' * 32},maybe", "is_malicious 'maybe'"),
        (f"{'ab' * 32},1,1.5", "severity '1.5'"),
        (f"{'ab' * 32},1,high", "severity 'high'"),
        (f"{'ab' * 32},1\n{'ab' * 32},0", "labelled twice"),
    ],
)
def test_bad_labels_file_names_the_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "labels.csv"
    path.write_text(f"sha256,is_malicious\n{line}\n")
    with pytest.raises(TraceImportError, match=rf"labels.csv:\d: .*{message}"):
        read_labels(path)


def test_report_severity_comes_from_labels_then_score_then_default(tmp_path: Path) -> None:
    scoreless = load(CAPE)
    del scoreless["malscore"]
    scoreless["info"]["id"] = 43
    cases = {
        (CAPE_SHA, LabelRow(True, 0.2)): (True, 0.2),
        (CAPE_SHA, LabelRow(True, None)): (True, 0.75),
        (CAPE_SHA, LabelRow(False, 0.9)): (False, 0.0),
    }
    for (sha, row), expected in cases.items():
        events = cape(CAPE, labels={sha: row})
        assert {(e["is_malicious"], e["severity"]) for e in events} == {expected}
    events = cape(scoreless, labels={CAPE_SHA: LabelRow(True, None)})
    assert {e["severity"] for e in events} == {importer.DEFAULT_MALICIOUS_SEVERITY}
    assert "is_malicious" not in cape(CAPE, labels={CUCKOO_SHA: LabelRow(True, None)})[0]


def reports(tmp_path: Path) -> Path:
    """A directory of reports: the two good ones, one unlabelled copy, and four bad files."""
    root = tmp_path / "reports"
    (root / "1").mkdir(parents=True)
    (root / "1" / "report.json").write_text(CAPE.read_text())
    (root / "2").mkdir()
    (root / "2" / "report.json").write_text(CUCKOO.read_text())
    other = load(CAPE)
    other["target"]["file"]["sha256"] = "ee" * 32
    write_json(root / "unlabelled.json", other)
    write_json(root / "list.json", [1, 2])
    write_json(root / "static-only.json", {"info": {"id": 9}, "target": {}})
    (root / "broken.json").write_text('{"behavior": ')
    no_calls = load(CAPE)
    for process in no_calls["behavior"]["processes"]:
        process["calls"] = []
    write_json(root / "no-calls.json", no_calls)
    return root


def labels_csv(tmp_path: Path) -> Path:
    path = tmp_path / "labels.csv"
    path.write_text(f"sha256,is_malicious,severity\n{CAPE_SHA},1,0.9\n{CUCKOO_SHA},0\n")
    return path


def test_import_cape_skips_and_counts_bad_reports(tmp_path: Path) -> None:
    imported = import_cape([reports(tmp_path)], labels=read_labels(labels_csv(tmp_path)),
                           labels_source="labels:labels.csv")
    assert len(imported.episodes) == 3
    assert Counter(s.reason for s in imported.skipped) == {"not_a_report": 2, "not_json": 1, "no_calls": 1}
    assert all(s.where.endswith(".json") and s.detail for s in imported.skipped)
    assert sum(e.label is None for e in imported.episodes) == 1
    inline = imported.labelled_only()
    assert len(inline.episodes) == 2
    assert Counter(s.reason for s in inline.skipped)["unlabelled"] == 1


def test_duplicate_report_is_skipped(tmp_path: Path) -> None:
    imported = import_cape([CAPE, CAPE])
    assert len(imported.episodes) == 1
    assert [s.reason for s in imported.skipped] == ["duplicate"]


def test_malformed_calls_skip_the_report_with_a_reason(tmp_path: Path) -> None:
    def broken(change: Any) -> list[str]:
        report = copy.deepcopy(load(CAPE))
        change(report["behavior"]["processes"][0]["calls"])
        skipped = import_cape([write_json(tmp_path / "r.json", report)]).skipped
        return [f"{s.reason}: {s.detail}" for s in skipped]

    assert broken(lambda calls: calls.append("NtClose")) == [
        "malformed_report: behavior.processes[0].calls[17] is not an object"]
    assert "repeated is -1" in broken(lambda calls: calls[0].update(repeated=-1))[0]
    assert broken(lambda calls: calls[0].update(timestamp="yesterday"))[0].startswith("bad_timestamp")
    assert "no api name" in broken(lambda calls: calls[0].pop("api"))[0]


def test_verdicts_out_keeps_labels_out_of_the_telemetry(tmp_path: Path) -> None:
    out, verdicts = tmp_path / "events.jsonl", tmp_path / "verdicts.jsonl"
    summary = import_files("cape", [reports(tmp_path)], out, verdicts_out=verdicts,
                           labels=labels_csv(tmp_path), calls_per_step=4, sandboxes=2)
    events = [json.loads(line) for line in out.read_text().splitlines()]
    rows = [json.loads(line) for line in verdicts.read_text().splitlines()]
    assert not any("is_malicious" in e or "severity" in e for e in events)
    assert sorted(rows, key=lambda r: r["episode_id"]) == [
        {"sandbox_id": rows_sandbox(events, f"{CAPE_SHA[:16]}-t42"), "episode_id": f"{CAPE_SHA[:16]}-t42",
         "is_malicious": True, "severity": 0.9, "revision": 0, "source": "labels:labels.csv"},
        {"sandbox_id": rows_sandbox(events, f"{CUCKOO_SHA[:16]}-t7"), "episode_id": f"{CUCKOO_SHA[:16]}-t7",
         "is_malicious": False, "severity": 0.0, "revision": 0, "source": "labels:labels.csv"},
    ]
    assert len({e["episode_id"] for e in events}) == 3  # the unlabelled one is telemetry without a verdict
    assert summary.line() == ("imported 3 episodes, 12 events, 2 verdicts: 1 malicious, 1 benign, "
                              "1 unlabelled; 4 reports skipped (2 not_a_report, 1 not_json, 1 no_calls)")


def rows_sandbox(events: list[Event], episode_id: str) -> str:
    (sandbox,) = {e["sandbox_id"] for e in events if e["episode_id"] == episode_id}
    return str(sandbox)


def test_inline_labels_decode_and_skip_unlabelled(tmp_path: Path) -> None:
    out = tmp_path / "events.jsonl"
    summary = import_files("cape", [reports(tmp_path)], out, labels=labels_csv(tmp_path), step_seconds=0.5)
    events = decode_cleanly(out)
    assert {e.episode_id for e in events} == {f"{CAPE_SHA[:16]}-t42", f"{CUCKOO_SHA[:16]}-t7"}
    line = summary.line()
    assert "1 malicious, 1 benign, 0 unlabelled; 5 reports skipped" in line
    assert "1 unlabelled)" in line


def test_nothing_importable_raises_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "events.jsonl"
    with pytest.raises(TraceImportError, match=r"no episodes to write.*--labels"):
        import_files("cape", [CAPE], out)
    with pytest.raises(TraceImportError, match="no episodes to write"):
        import_files("cape", [write_json(tmp_path / "x.json", {})], out, verdicts_out=tmp_path / "v.jsonl")
    assert not out.exists()
    assert not (tmp_path / "v.jsonl").exists()


# ---------------------------------------------------------------------------------------------------
# MalBehavD-V1


def small_csv(tmp_path: Path, *rows: str) -> Path:
    path = tmp_path / "mbd.csv"
    path.write_text("sha256,labels,0,1,2,3,4,5,6\n" + "".join(f"{r}\n" for r in rows))
    return path


def test_malbehavd_rows_become_episodes_of_n_names_per_step(tmp_path: Path) -> None:
    path = small_csv(
        tmp_path,
        f"{'ab' * 32},1,NtWriteFile,CreateRemoteThread,connect,RegSetValueExW,NtMapViewOfSection,,",
        f"{'ab' * 32},1,LookupPrivilegeValueW,CreateProcessInternalW,,,,,",
        f"{'cd' * 32},0,NtReadFile,,,,,,",
    )
    imported = import_malbehavd([path], names_per_step=2)
    assert [e.episode_id for e in imported.episodes] == [f"{'ab' * 8}-L2", f"{'ab' * 8}-L3", f"{'cd' * 8}-L4"]
    events: list[Any] = list(imported.events(sandboxes=1))
    by_episode: dict[str, list[Event]] = defaultdict(list)
    for e in events:
        by_episode[e["episode_id"]].append(e)
    assert shape(by_episode[f"{'ab' * 8}-L2"]) == [
        step(syscall_count=2, file_write_count=1, code_injection_detected=True),
        step(syscall_count=2, network_connections=1, registry_modification=True),
        step(syscall_count=1),  # NtMapViewOfSection: no arguments, so no evidence of another process
    ]
    assert shape(by_episode[f"{'ab' * 8}-L3"]) == [
        step(syscall_count=2, privilege_escalation_attempt=True, child_processes=1)]
    assert [(e["is_malicious"], e["severity"], e["final"]) for e in by_episode[f"{'cd' * 8}-L4"]] == [
        (False, 0.0, True)]
    assert {e["severity"] for e in events if e["is_malicious"]} == {importer.DEFAULT_MALICIOUS_SEVERITY}
    # one sandbox: its episodes run back to back, each after a setup gap, in timestamp order
    stamps = [e["timestamp"] for e in events]
    assert stamps == sorted(stamps)
    assert len(set(stamps)) == len(stamps)
    assert [e["episode_id"] for e in events] == [e.episode_id for e in imported.episodes for _ in e.steps]


def test_malbehavd_malformed_rows_are_skipped_with_their_line(tmp_path: Path) -> None:
    path = small_csv(tmp_path, f"{'ab' * 32},1,NtClose", f"{'ab' * 32},2,NtClose", "xyz,0,NtClose",
                     f"{'ab' * 32},0,,,", f"{'ab' * 32},0,Nt Close")
    imported = import_malbehavd([path])
    assert len(imported.episodes) == 1
    assert [(s.where, s.reason) for s in imported.skipped] == [
        (f"{path}:{line}", "malformed_row") for line in (3, 4, 5, 6)]
    assert "expected 0 (benign) or 1 (malicious)" in imported.skipped[0].detail
    with pytest.raises(TraceImportError, match=r"4 rows cannot be imported; first: .*mbd.csv:3"):
        malbehavd_events(path)


def test_foreign_csv_is_an_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    path.write_text(f"sha256,is_malicious\n{'ab' * 32},1\n")
    with pytest.raises(TraceImportError, match=r"labels.csv:1: not a MalBehavD-V1 CSV"):
        import_malbehavd([path])
    with pytest.raises(TraceImportError, match="cannot read"):
        import_malbehavd([tmp_path / "missing.csv"])


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not MALBEHAVD.is_file():
        pytest.skip(f"the MalBehavD-V1 CSV is not at {MALBEHAVD} (CI keeps shared/ beside the repository)")
    out = tmp_path_factory.mktemp("malbehavd") / "events.jsonl"
    write_events(out, malbehavd_events(MALBEHAVD))
    return out


def test_shipped_malbehavd_converts_to_2570_episodes(shipped: Path) -> None:
    events = decode_cleanly(shipped)
    episodes: dict[tuple[str, str], list[Any]] = defaultdict(list)
    for e in events:
        episodes[e.episode_key].append(e)
    assert len(episodes) == 2570
    assert sum(steps[0].is_malicious for steps in episodes.values()) == 1285
    assert all([e.step for e in steps] == list(range(len(steps))) for steps in episodes.values())
    assert all([e.final for e in steps] == [False] * (len(steps) - 1) + [True] for steps in episodes.values())
    assert {e.sandbox_id for e in events} == {f"sbx-{i:02d}" for i in range(8)}
    stamps = [e.timestamp for e in events]
    assert stamps == sorted(stamps)
    # the 26 repeated hashes stay separate episodes
    hashes = Counter(episode_id.split("-")[0] for _, episode_id in episodes)
    assert sum(1 for n in hashes.values() if n > 1) == 26


# ---------------------------------------------------------------------------------------------------
# The command line


def test_cli_import(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    csv_path = small_csv(tmp_path, f"{'ab' * 32},1,NtWriteFile,connect", f"{'cd' * 32},0,NtClose", "bad,row")
    out = tmp_path / "mbd.jsonl"
    assert main(["import", "malbehavd", str(csv_path), "--out", str(out), "--calls-per-step", "1",
                 "--sandboxes", "1"]) == 0
    captured = capsys.readouterr()
    assert captured.out == ("imported 2 episodes, 3 events: 1 malicious, 1 benign, 0 unlabelled; "
                            "1 rows skipped (1 malformed_row)\n")
    assert f"skipped {csv_path}:4: malformed_row" in captured.err
    assert len(decode_cleanly(out)) == 3

    out = tmp_path / "cape.jsonl"
    assert main(["import", "cape", str(CAPE), str(CUCKOO), "--out", str(out), "--labels",
                 str(labels_csv(tmp_path)), "--step-seconds", "1"]) == 0
    assert capsys.readouterr().out.startswith("imported 2 episodes, 8 events: 1 malicious, 1 benign")
    assert len(decode_cleanly(out)) == 8


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["malbehavd", "{missing}"], "cannot read"),
        (["malbehavd", "{csv}", "--step-seconds", "1"], "no timestamps"),
        (["malbehavd", "{csv}", "--labels", "{csv}"], "carry their own labels"),
        (["cape", "{cape}"], "no episodes to write"),
        (["cape", "{cape}", "--calls-per-step", "0"], "calls per step must be >= 1"),
        (["cape", "{cape}", "--labels", "{missing}"], "cannot read the labels file"),
    ],
)
def test_cli_bad_input_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        args: list[str], message: str) -> None:
    names = {"missing": str(tmp_path / "missing.csv"), "cape": str(CAPE),
             "csv": str(small_csv(tmp_path, f"{'ab' * 32},1,NtClose"))}
    out = tmp_path / "out.jsonl"
    assert main(["import", *[a.format(**names) for a in args], "--out", str(out)]) == 1
    assert message in capsys.readouterr().err
    assert not out.exists()
