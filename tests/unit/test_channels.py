"""Channels, pins, history and retention of the snapshot store, on real files; concurrent writers as
real processes and threads."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from streamdqn.cli import main
from streamdqn.errors import (
    SnapshotConflictError,
    SnapshotError,
    SnapshotNotFoundError,
    SnapshotVerifyError,
)
from streamdqn.snapshots.channels import canary_bucket, in_canary_share, read_history, stable_lineage
from streamdqn.snapshots.layout import (
    HISTORY_FILE,
    LATEST,
    MODEL_FILE,
    PINS_FILE,
    STABLE_PIN_FILE,
    channel_version,
)
from streamdqn.snapshots.store import SnapshotStore
from tests.factories import policy_info

REPO = Path(__file__).resolve().parents[2]


def put(store: SnapshotStore, tag: str, **kwargs: object) -> int:
    return store.publish(f"model {tag}".encode(), policy_info(), **kwargs).version  # type: ignore[arg-type]


def links(root: Path) -> dict[str, str | None]:
    return {name: os.readlink(root / name) if (root / name).is_symlink() else None
            for name in ("stable", "canary", LATEST)}


def test_publish_points_the_named_channel_and_latest_follows_stable(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    assert store.channels().stable is None
    assert put(store, "a") == 1
    assert links(tmp_path) == {"stable": "1", "canary": None, LATEST: "1"}
    assert put(store, "b", channel="canary") == 2
    assert put(store, "c", channel=None) == 3
    assert links(tmp_path) == {"stable": "1", "canary": "2", LATEST: "1"}
    record = store.channels()
    assert (record.stable, record.canary, record.previous_stable, record.pins) == (1, 2, None, {})
    assert record.as_dict() == {"stable": 1, "canary": 2, "latest": 1, "previous_stable": None, "pins": {},
                                "stable_pin": None}
    assert store.latest_version() == 1
    assert store.read().version == 1
    history = read_history(tmp_path)
    assert [(e.action, e.channel, e.version, e.from_version) for e in history] == [
        ("publish", "stable", 1, None), ("publish", "canary", 2, None)]
    assert history[0].actor == "publisher"
    with pytest.raises(ValueError, match="unknown channel"):
        store.publish(b"x", policy_info(), channel="beta")  # type: ignore[arg-type]


def test_promote_demote_and_rollback_walk_the_history(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    for tag in "abc":
        put(store, tag)
    with pytest.raises(SnapshotConflictError, match="no canary"):
        store.promote()
    with pytest.raises(SnapshotConflictError, match="no canary"):
        store.demote()
    put(store, "canary", channel="canary")
    record = store.promote(actor="alice", reason="looked good")
    assert (record.stable, record.canary, record.previous_stable) == (4, None, 3)
    assert links(tmp_path) == {"stable": "4", "canary": None, LATEST: "4"}
    assert read_history(tmp_path)[-2].reason == "looked good"
    # Rolling back twice goes back twice, not back and forth.
    assert store.rollback().stable == 3
    record = store.rollback()
    assert (record.stable, record.previous_stable) == (2, 1)
    # Forward again, by name; every rollback abandons the version it leaves (2 here).
    assert store.rollback(to=4).stable == 4
    assert store.channels().previous_stable == 1
    with pytest.raises(SnapshotConflictError, match="already serves 4"):
        store.rollback(to=4)
    put(store, "second canary", channel="canary")
    assert store.demote(reason="bad").canary is None
    assert store.channels().stable == 4
    assert store.promote(1).stable == 1  # an explicit version
    with pytest.raises(SnapshotConflictError, match="already serves 1"):
        store.promote(1)
    assert read_history(tmp_path)[-1].action == "promote"


def test_rollback_with_no_previous_stable_is_refused(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    with pytest.raises(SnapshotConflictError, match="no previous stable"):
        store.rollback()
    put(store, "a")
    with pytest.raises(SnapshotConflictError, match="--to"):
        store.rollback()
    assert store.channels().stable == 1


def test_pins_are_written_atomically_and_logged(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    put(store, "a")
    put(store, "b")
    record = store.pin("sandbox-7", 1, actor="bob")
    assert record.pins == {"sandbox-7": 1}
    assert json.loads((tmp_path / PINS_FILE).read_text()) == {"sandbox-7": 1}
    store.pin("sandbox-8", 2)
    store.pin("sandbox-7", 2)
    assert store.unpin("sandbox-8").pins == {"sandbox-7": 2}
    with pytest.raises(SnapshotConflictError, match="not pinned"):
        store.unpin("sandbox-8")
    pins = [(e.action, e.sandbox_id, e.version, e.from_version) for e in read_history(tmp_path)
            if e.channel is None]
    assert pins == [("pin", "sandbox-7", 1, None), ("pin", "sandbox-8", 2, None), ("pin", "sandbox-7", 2, 1),
                    ("unpin", "sandbox-8", None, 2)]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".pins")) == []  # no temp leftovers
    for bad in ("", " padded", "tab\there", "x" * 257):
        with pytest.raises(SnapshotError, match="sandbox id"):
            store.pin(bad, 1)


def test_a_pinned_stable_is_held_against_promotion_publishing_and_rollback(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    for tag in "abc":
        put(store, tag)  # stable 3, rollback target 2
    record = store.pin_stable(1, actor="carol", reason="incident 42")
    assert (record.stable, record.stable_pin, record.previous_stable) == (1, 1, 3)
    assert links(tmp_path) == {"stable": "1", "canary": None, LATEST: "1"}
    assert json.loads((tmp_path / STABLE_PIN_FILE).read_text())["version"] == 1
    assert record.as_dict()["stable_pin"] == 1
    pin = read_history(tmp_path)[-1]
    assert (pin.action, pin.channel, pin.version, pin.from_version, pin.actor, pin.reason) == (
        "pin", "stable", 1, 3, "carol", "incident 42")

    # Publishing to stable writes the version but leaves stable where it is pinned.
    held = store.publish(b"model d", policy_info())
    assert (held.version, held.channel) == (4, None)
    assert store.channels().stable == 1
    canary = store.publish(b"model e", policy_info(), channel="canary")
    assert (canary.version, canary.channel) == (5, "canary")
    before = (links(tmp_path), (tmp_path / HISTORY_FILE).read_bytes())
    refused: list[Callable[[], object]] = [store.promote, lambda: store.promote(4), store.rollback,
                                          lambda: store.rollback(to=2)]
    for change in refused:
        with pytest.raises(SnapshotConflictError, match=r"stable is pinned to 1.*unpin"):
            change()
    assert (links(tmp_path), (tmp_path / HISTORY_FILE).read_bytes()) == before
    # Demoting the canary still works; so does pinning another version (it moves the pin).
    assert store.demote().canary is None
    record = store.pin_stable(4)
    assert (record.stable, record.stable_pin) == (4, 4)
    assert store.pin_stable(4).stable_pin == 4  # pinning the pinned version again changes nothing

    record = store.unpin_stable(reason="over")
    assert (record.stable, record.stable_pin) == (4, None)
    assert not (tmp_path / STABLE_PIN_FILE).exists()
    unpin = read_history(tmp_path)[-1]
    assert (unpin.action, unpin.channel, unpin.version, unpin.from_version) == ("unpin", "stable", None, 4)
    with pytest.raises(SnapshotConflictError, match="stable is not pinned"):
        store.unpin_stable()
    # Released: rollback walks the lineage through the pins (4 <- 1 <- 3), publishing moves stable.
    assert store.rollback().stable == 1
    assert store.publish(b"model f", policy_info()).channel == "stable"
    assert store.channels().stable == 6


def test_pinning_stable_to_a_pinned_sandbox_version_and_a_sandbox_pin_are_independent(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    put(store, "a")
    put(store, "b")
    store.pin("sb-1", 1)
    store.pin_stable(2)  # the version stable already serves: only the hold is added
    record = store.channels()
    assert (record.stable, record.stable_pin, record.pins) == (2, 2, {"sb-1": 1})
    assert store.unpin("sb-1").stable_pin == 2
    assert store.unpin_stable().pins == {}


def test_a_stable_pin_to_an_unknown_or_corrupt_version_is_refused_and_nothing_changes(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    for tag in "abc":
        put(store, tag)
    (store.path_of(2) / MODEL_FILE).write_bytes(b"tampered")
    (store.path_of(1) / "manifest.json").write_text("{")
    before = (links(tmp_path), (tmp_path / HISTORY_FILE).read_bytes())
    with pytest.raises(SnapshotNotFoundError, match="snapshot 99 does not exist"):
        store.pin_stable(99)
    with pytest.raises(SnapshotVerifyError, match="corrupt"):
        store.pin_stable(2)
    with pytest.raises(SnapshotError, match="manifest"):
        store.pin_stable(1)
    for not_a_version in (0, True, 10**12):
        with pytest.raises(SnapshotNotFoundError, match="not a snapshot version"):
            store.pin_stable(not_a_version)
    assert (links(tmp_path), (tmp_path / HISTORY_FILE).read_bytes()) == before
    assert not (tmp_path / STABLE_PIN_FILE).exists()


def test_an_unreadable_stable_pin_holds_stable_and_says_which_file(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    put(store, "a")
    put(store, "b", channel="canary")
    for bad in (b"{", b'{"version": "1"}', b'{"version": 0}', b"[1]"):
        (tmp_path / STABLE_PIN_FILE).write_bytes(bad)
        with pytest.raises(SnapshotError, match=STABLE_PIN_FILE):
            store.promote()
        with pytest.raises(SnapshotError, match=STABLE_PIN_FILE):
            store.publish(b"model c", policy_info())
    assert store.versions() == [1, 2]
    (tmp_path / STABLE_PIN_FILE).unlink()  # the message's remedy: removing it unpins stable
    assert store.promote().stable == 2


def test_unknown_pruned_corrupt_and_non_canonical_versions_are_refused_and_nothing_changes(
    tmp_path: Path,
) -> None:
    store = SnapshotStore(tmp_path, keep=2)
    for tag in "abcd":
        put(store, tag)
    assert store.versions() == [3, 4]  # 1 pruned; 2 is gone too (3 is the rollback target)
    before = (links(tmp_path), (tmp_path / HISTORY_FILE).read_bytes())
    for bad in (99, 1):
        with pytest.raises(SnapshotNotFoundError, match=f"snapshot {bad} does not exist"):
            store.pin("s", bad)
        with pytest.raises(SnapshotNotFoundError):
            store.rollback(to=bad)
        with pytest.raises(SnapshotNotFoundError):
            store.promote(bad)
    for not_a_version in (0, -3, True, 10**12):
        with pytest.raises(SnapshotNotFoundError, match="not a snapshot version"):
            store.pin("s", not_a_version)
    (store.path_of(3) / MODEL_FILE).write_bytes(b"tampered")
    with pytest.raises(SnapshotVerifyError, match="corrupt"):
        store.rollback()
    (store.path_of(3) / "manifest.json").write_text("{")
    with pytest.raises(SnapshotError, match="manifest"):
        store.promote(3)
    assert (links(tmp_path), (tmp_path / HISTORY_FILE).read_bytes()) == before
    assert not (tmp_path / PINS_FILE).exists()


def test_retention_keeps_every_version_a_channel_pin_or_rollback_needs(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path, keep=2)
    put(store, "a")
    store.pin("old-sandbox", 1)
    for tag in "bc":
        put(store, tag)
    put(store, "canary", channel="canary")  # 4
    for tag in "defg":
        put(store, tag, channel=None)  # 5..8: never pointed at
    # keep=2 keeps 7 and 8; the pin (1), the canary (4), stable (3) and its rollback target (2) stay.
    assert store.versions() == [1, 2, 3, 4, 7, 8]
    store.unpin("old-sandbox")
    store.demote()
    assert store.prune() == [1, 4]
    assert store.versions() == [2, 3, 7, 8]
    assert store.rollback().stable == 2
    assert store.prune() == [3]  # rolled back from: nothing needs it any more


def test_a_store_from_before_channels_reads_latest_as_stable_and_adopts_it(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    put(store, "a")
    put(store, "b")
    (tmp_path / "stable").unlink()
    (tmp_path / HISTORY_FILE).unlink()
    assert channel_version(tmp_path, "stable") == 2  # read through `latest`
    assert store.channels().stable == 2
    put(store, "c", channel="canary")
    assert links(tmp_path) == {"stable": "2", "canary": "3", LATEST: "2"}
    assert [(e.action, e.version) for e in read_history(tmp_path)] == [("adopt", 2), ("publish", 3)]


def test_latest_is_repaired_when_a_writer_died_between_the_two_links(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    put(store, "a")
    put(store, "b")
    os.remove(tmp_path / LATEST)
    os.symlink("1", tmp_path / LATEST)  # stable says 2, latest still 1
    put(store, "c", channel="canary")
    assert links(tmp_path) == {"stable": "2", "canary": "3", LATEST: "2"}


def test_a_torn_history_line_is_skipped_and_does_not_swallow_the_next(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    put(store, "a")
    with open(tmp_path / HISTORY_FILE, "ab") as f:
        f.write(b'{"time": 1, "action": "pub')  # a crash mid-append
    put(store, "b")
    assert [e.version for e in read_history(tmp_path)] == [1, 2]
    assert store.rollback().stable == 1


def test_history_is_compacted_and_replays_to_the_same_lineage(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from streamdqn.snapshots import channels

    monkeypatch.setattr(channels, "HISTORY_COMPACT_BYTES", 4096)
    store = SnapshotStore(tmp_path, keep=1000)
    for i in range(40):
        put(store, str(i))
    store.rollback()  # abandons 40
    put(store, "canary", channel="canary")  # 41
    lineage = stable_lineage(read_history(tmp_path))
    assert (tmp_path / f"{HISTORY_FILE}.1").exists()
    assert read_history(tmp_path)[0].action == "compact"
    assert lineage == list(range(1, 40))
    record = store.channels()
    assert (record.stable, record.previous_stable, record.canary) == (39, 38, 41)
    assert store.rollback().stable == 38


def test_lineage_rules() -> None:
    from streamdqn.snapshots.channels import HistoryEntry

    def entry(action: str, version: int, before: int | None) -> HistoryEntry:
        return HistoryEntry(0.0, action, "stable", version, before)

    history = [entry("publish", 1, None), entry("publish", 2, 1), entry("promote", 3, 2),
               entry("rollback", 2, 3), entry("publish", 4, 2), entry("rollback", 9, 4)]
    # The rollback to 2 cut 3; the rollback to 9 (never stable before) replaced 4.
    assert stable_lineage(history) == [1, 2, 9]


def test_canary_hash_is_stable_and_spreads_evenly() -> None:
    assert canary_bucket("sandbox-1") == canary_bucket("sandbox-1")
    buckets = [canary_bucket(f"sandbox-{i}") for i in range(20_000)]
    assert all(0.0 <= b < 1.0 for b in buckets)
    for fraction in (0.05, 0.2, 0.5):
        share = sum(b < fraction for b in buckets) / len(buckets)
        assert abs(share - fraction) < 0.015, (fraction, share)
    # Nested shares: a sandbox in a 10 % share is in every larger one.
    small = [i for i in range(2000) if in_canary_share(f"sandbox-{i}", 0.1)]
    assert small
    assert all(in_canary_share(f"sandbox-{i}", 0.3) for i in small)
    assert not in_canary_share("any", 0.0)
    assert in_canary_share("any", 1.0)


WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from streamdqn.snapshots.manifest import FeatureSpecInfo, Normalizer, PolicyInfo
    from streamdqn.snapshots.store import SnapshotStore

    root, name, rounds = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    info = PolicyInfo(0, 0, 0, FeatureSpecInfo(1, ["f"]), ["ignore"], {}, Normalizer(0.0, [0.0], [1.0], 1.0),
                      {}, "cpu")
    store = SnapshotStore(root, keep=1000)
    for i in range(rounds):
        channel = "canary" if i % 2 else "stable"
        v = store.publish(f"{name}-{i}".encode(), info, channel=channel, actor=name).version
        store.pin(f"{name}-sandbox", v, actor=name)
        if channel == "canary":
            try:
                store.promote(actor=name)
            except Exception:  # another writer promoted or demoted it first
                pass
""")


def test_concurrent_writer_processes_never_collide(tmp_path: Path) -> None:
    root = tmp_path / "snapshots"
    SnapshotStore(root)
    writers, rounds = 4, 12
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(root), f"w{k}", str(rounds)], env=env,
                              stderr=subprocess.PIPE) for k in range(writers)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * writers, b"\n".join(errors).decode()
    store = SnapshotStore(root)
    total = writers * rounds
    assert store.versions() == list(range(1, total + 1))  # every version allocated exactly once
    for v in store.versions():
        store.verify(v)  # complete and intact: no two writers wrote into one directory
    raw = (root / HISTORY_FILE).read_bytes().splitlines()
    history = read_history(root)
    assert len(history) == len(raw)  # every line whole
    assert sum(e.action == "publish" for e in history) == total
    assert sum(e.action == "pin" for e in history) == total
    record = store.channels()
    assert set(record.pins) == {f"w{k}-sandbox" for k in range(writers)}
    assert record.stable in store.versions()
    # The log replays to the links: each change's from_version is what the previous change left.
    stable_changes = [e for e in history if e.channel == "stable"]
    for before, after in itertools.pairwise(stable_changes):
        assert after.from_version == before.version
    assert stable_changes[-1].version == record.stable


def test_concurrent_writer_threads_never_collide(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path, keep=1000)
    errors: list[BaseException] = []

    def write(k: int) -> None:
        try:
            mine = SnapshotStore(tmp_path, keep=1000)
            for i in range(10):
                v = put(mine, f"{k}-{i}", channel="canary" if i % 2 else "stable")
                mine.pin(f"t{k}", v)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread's assertion
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert store.versions() == list(range(1, 41))
    assert len(read_history(tmp_path)) == 80


# --- the CLI -----------------------------------------------------------------------------------------


def three_versions_and_a_canary(tmp_path: Path) -> SnapshotStore:
    """The store of a state directory: 1 and 2 published to stable in turn, 3 on the canary."""
    store = SnapshotStore(tmp_path / "snapshots")
    put(store, "a")
    put(store, "b")
    put(store, "c", channel="canary")
    return store


def test_cli_changes_the_store_and_refuses_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = three_versions_and_a_canary(tmp_path)
    d = ["--dir", str(store.root)]
    assert main(["snapshots", "list", *d]) == 0
    out = capsys.readouterr().out
    assert "stable: 2  canary: 3  rollback target: 1" in out
    assert main(["snapshots", "promote", *d, "--reason", "canary healthy"]) == 0
    assert "stable now serves 3 (was 2)" in capsys.readouterr().out
    assert main(["snapshots", "rollback", "--state-dir", str(tmp_path)]) == 0
    assert store.channels().stable == 2
    capsys.readouterr()
    assert main(["snapshots", "pin", "1", "--sandbox-id", "sb-1", *d, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["channels"]["pins"] == {"sb-1": 1}
    assert main(["snapshots", "unpin", "--sandbox-id", "sb-1", *d]) == 0
    history = read_history(store.root)
    assert history[-1].actor.startswith("cli ")
    assert any(e.reason == "canary healthy" for e in history)
    capsys.readouterr()

    assert main(["snapshots", "rollback", "--to", "7", *d]) == 1
    assert "snapshot 7 does not exist" in capsys.readouterr().err
    assert main(["snapshots", "demote", *d]) == 1
    assert "no canary" in capsys.readouterr().err
    assert main(["snapshots", "list", "--dir", str(tmp_path / "nowhere")]) == 1
    assert "no snapshot store" in capsys.readouterr().err
    for text in ("\u0661", "01", "+1", "1.0", "\uff11"):  # Arabic-Indic one, leading zero, sign, fullwidth
        with pytest.raises(SystemExit) as exit_info:
            main(["snapshots", "pin", text, "--sandbox-id", "sb", *d])
        assert exit_info.value.code == 2
        assert "is not a snapshot version" in capsys.readouterr().err
    assert store.channels().pins == {}
    assert main(["snapshots", "list", *d, "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert [v["version"] for v in listing["versions"]] == [3, 2, 1]
    assert listing["versions"][1]["serves"] == ["stable"]


def test_cli_pins_stable_refuses_rollback_while_pinned_and_unpins(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = three_versions_and_a_canary(tmp_path)
    d = ["--state-dir", str(tmp_path)]
    assert main(["snapshots", "pin", "1", *d, "--reason", "bad release"]) == 0
    out = capsys.readouterr().out
    assert "stable pinned to 1 (was 2)" in out
    assert "stable: 1 (pinned)  canary: 3" in out
    assert main(["snapshots", "list", *d]) == 0
    out = capsys.readouterr().out
    assert "stable (pinned)" in out
    assert "pin      stable: 2 -> 1" in out
    assert "(bad release)" in out
    for refused in (["rollback"], ["rollback", "--to", "2"], ["promote"]):
        assert main(["snapshots", *refused, *d]) == 1
        assert "stable is pinned to 1" in capsys.readouterr().err
    assert store.channels().stable == 1
    assert main(["snapshots", "pin", "7", *d]) == 1
    assert "snapshot 7 does not exist" in capsys.readouterr().err
    assert main(["snapshots", "list", *d, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["channels"]["stable_pin"] == 1
    # A sandbox pin is still its own thing, and does not release stable.
    assert main(["snapshots", "pin", "3", "--sandbox-id", "sb-1", *d]) == 0
    assert main(["snapshots", "unpin", "--sandbox-id", "sb-1", *d]) == 0
    assert store.channels().stable_pin == 1
    capsys.readouterr()
    assert main(["snapshots", "unpin", *d, "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert (answer["action"], answer["channels"]["stable_pin"]) == ("unpin", None)
    assert answer["channels"]["stable"] == 1
    assert main(["snapshots", "unpin", *d]) == 1
    assert "stable is not pinned" in capsys.readouterr().err
    assert main(["snapshots", "promote", *d]) == 0
    assert store.channels().stable == 3
