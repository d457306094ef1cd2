"""Where a daemon stands among the ranks: [distributed], torchrun's variables, the state layout."""

from __future__ import annotations

from pathlib import Path

import pytest

from streamdqn.config import DistributedSettings, load_settings
from streamdqn.daemon.build import kafka_options
from streamdqn.daemon.handover import read_handover, read_handovers, write_handover
from streamdqn.daemon.ranks import Role, StateLayout, group_settings, http_port
from streamdqn.errors import ConfigError
from streamdqn.kafka.options import consumer_settings

TORCHRUN = {"RANK": "1", "WORLD_SIZE": "3", "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "29500"}


def test_alone_by_default_even_with_a_stray_rank_variable() -> None:
    assert group_settings(DistributedSettings(), {}) is None
    assert group_settings(DistributedSettings(), {"RANK": "2"}) is None  # not a launcher's full set


def test_the_section_names_rank_world_and_rendezvous() -> None:
    d = DistributedSettings(world_size=4, rank=3, init_method="tcp://[::1]:29411", timeout_seconds=9,
                            backend="gloo")
    g = group_settings(d, {})
    assert g is not None
    assert (g.rank, g.world_size, g.master_addr, g.master_port, g.timeout_seconds, g.backend) == (
        3, 4, "::1", 29411, 9, "gloo")


def test_torchruns_environment_counts_when_the_section_leaves_world_size_at_1() -> None:
    g = group_settings(DistributedSettings(timeout_seconds=7), TORCHRUN)
    assert g is not None
    assert (g.rank, g.world_size, g.master_addr, g.master_port, g.timeout_seconds) == (1, 3, "10.0.0.5",
                                                                                       29500, 7)
    assert group_settings(DistributedSettings(), {**TORCHRUN, "RANK": "0", "WORLD_SIZE": "1"}) is None
    with pytest.raises(ConfigError, match="not an integer"):
        group_settings(DistributedSettings(), {**TORCHRUN, "RANK": "one"})


@pytest.mark.parametrize(("values", "message"), [
    ({"world_size": 2, "rank": 2}, "rank 2 is not below world_size 2"),
    ({"init_method": "env://"}, "is not tcp://HOST:PORT"),
    ({"init_method": "tcp://host"}, "is not tcp://HOST:PORT"),
    ({"init_method": "tcp://host:70000"}, "is not tcp://HOST:PORT"),
    ({"init_method": "tcp://host:\u0662\u0669"}, "is not tcp://HOST:PORT"),  # Arabic-Indic digits
])
def test_a_bad_section_is_refused_naming_the_key(values: dict[str, object], message: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in values.items():
        monkeypatch.setenv(f"STREAMDQN_DISTRIBUTED__{key.upper()}", str(value))
    with pytest.raises(ConfigError, match="distributed") as error:
        load_settings()
    assert message in str(error.value)


def test_state_layout_alone_is_unchanged_and_a_group_keeps_one_snapshot_store(tmp_path: Path) -> None:
    alone = StateLayout.of(tmp_path, Role())
    assert (alone.checkpoints, alone.own, alone.snapshots) == (tmp_path / "checkpoints", tmp_path,
                                                                tmp_path / "snapshots")
    ranks = [StateLayout.of(tmp_path, Role(r, 3)) for r in range(3)]
    assert len({r.checkpoints for r in ranks}) == 3
    assert {r.snapshots for r in ranks} == {tmp_path / "snapshots"}
    assert [Role(r, 3).publishes for r in range(3)] == [True, False, False]


def test_local_ranks_under_torchrun_serve_http_on_consecutive_ports() -> None:
    agent = {**TORCHRUN, "TORCHELASTIC_RUN_ID": "x"}
    assert http_port(8765, {**agent, "LOCAL_RANK": "2"}) == 8767
    assert http_port(0, {**agent, "LOCAL_RANK": "2"}) == 0  # ephemeral for everyone
    assert http_port(8765, {"LOCAL_RANK": "2"}) == 8765  # not under torchrun: as configured


def test_a_rank_joins_the_consumer_group_as_a_static_member_and_a_lone_daemon_as_a_dynamic_one() -> None:
    """Static members send no LeaveGroup: when every rank restarts after a failure, the group keeps them."""
    settings = load_settings(kafka={"group_id": "farm", "session_timeout_ms": 30_000})
    alone = consumer_settings(kafka_options(settings, Role()))
    assert alone["group_instance_id"] is None and alone["session_timeout_ms"] == 30_000
    ranks = [consumer_settings(kafka_options(settings, Role(r, 2)))["group_instance_id"] for r in range(2)]
    assert ranks == ["farm-rank-0", "farm-rank-1"]


def test_handover_records_merge_to_the_largest_offset_and_a_bad_one_is_left_out(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    layouts = [StateLayout.of(tmp_path, Role(r, 3)) for r in range(3)]
    write_handover(layouts[0].handover, {("t", 0): 40, ("t", 1): 7})
    write_handover(layouts[1].handover, {("t", 0): 55, ("v", 0): 3})
    (tmp_path / "rank-5").mkdir()  # a rank of an earlier, larger group still counts
    write_handover(tmp_path / "rank-5" / "offsets.json", {("t", 1): 9})
    others = layouts[2].other_handovers()
    assert layouts[2].handover not in others and len(others) == 3
    assert read_handovers(others) == {("t", 0): 55, ("t", 1): 9, ("v", 0): 3}
    assert read_handover(layouts[0].handover) == {("t", 0): 40, ("t", 1): 7}

    layouts[1].handover.write_text('{"offsets": [["t", 0, -1]]}')
    with caplog.at_level("INFO", logger="streamdqn"):
        assert read_handovers(layouts[2].other_handovers()) == {("t", 0): 40, ("t", 1): 9}
    assert "handover record unreadable" in caplog.text
    with pytest.raises(ValueError, match="offset"):
        read_handover(layouts[1].handover)
    assert read_handovers([tmp_path / "rank-9" / "offsets.json"]) == {}  # not checkpointed yet
