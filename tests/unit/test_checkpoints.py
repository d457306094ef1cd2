"""Checkpoints: atomic numbered files, safe loading (no unpickling of objects), fallback and retention."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from streamdqn.errors import CheckpointError
from streamdqn.learning.checkpoints import FORMAT, CheckpointStore, load_checkpoint


class Planted:
    """What an attacker would put in a checkpoint: unpickling it runs `Path(marker).touch()`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def state(n: int) -> dict[str, Any]:
    return {
        "weights": {"w": torch.full((2, 3), float(n)), "b": torch.arange(3)},
        "updates": n,
        "name": f"ckpt {n}",
        "history": [1.5, 2.5, None],
        "nested": {"ok": True},
    }


def test_save_then_load_round_trips_with_weights_only(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "ckpt")
    path = store.save(state(1))
    assert path.name == "ckpt-0000000001.pt"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind
    loaded = store.load_latest()
    assert loaded is not None
    assert loaded.sequence == 1
    assert loaded.path == path
    assert loaded.state["format"] == FORMAT
    assert loaded.state["sequence"] == 1
    assert torch.equal(loaded.state["weights"]["w"], torch.full((2, 3), 1.0))
    assert loaded.state["history"] == [1.5, 2.5, None]
    assert loaded.state["name"] == "ckpt 1"
    # The file is a plain torch.save that a weights_only load accepts.
    assert torch.load(path, weights_only=True)["updates"] == 1


def test_no_checkpoint_yet(tmp_path: Path) -> None:
    assert CheckpointStore(tmp_path).load_latest() is None
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "ckpt-0000000001.pt")


def test_truncated_newest_is_skipped_for_the_previous_one(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.save(state(1))
    newest = store.save(state(2))
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])  # as a plain write killed half-way would leave it
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(newest)
    loaded = store.load_latest()
    assert loaded is not None
    assert loaded.sequence == 1
    assert loaded.state["updates"] == 1


def test_empty_newest_is_skipped(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.save(state(1))
    store.path_of(2).write_bytes(b"")
    loaded = store.load_latest()
    assert loaded is not None
    assert loaded.sequence == 1


def test_a_pickled_object_is_refused_and_never_runs(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "ckpt")
    store.save(state(1))
    marker = tmp_path / "pwned"
    torch.save({**state(2), "format": FORMAT, "payload": Planted(marker)}, store.path_of(2))
    with pytest.raises(CheckpointError):
        load_checkpoint(store.path_of(2))
    loaded = store.load_latest()
    assert loaded is not None
    assert loaded.sequence == 1
    assert not marker.exists()


def test_unknown_format_is_refused(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    torch.save({"format": FORMAT + 1}, store.path_of(1))
    torch.save([1, 2, 3], store.path_of(2))
    for sequence in (1, 2):
        with pytest.raises(CheckpointError, match="unknown format"):
            load_checkpoint(store.path_of(sequence))
    assert store.load_latest() is None


def test_retention_keeps_the_newest(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep=2)
    for n in range(1, 6):
        store.save(state(n))
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    assert sorted(p.name for p in tmp_path.glob("ckpt-*.pt")) == ["ckpt-0000000004.pt", "ckpt-0000000005.pt"]
    loaded = store.load_latest()
    assert loaded is not None
    assert loaded.sequence == 5
    assert loaded.state["updates"] == 5
    assert (tmp_path / "notes.txt").exists()
    # A store opened later on the same directory continues the numbering.
    assert CheckpointStore(tmp_path, keep=2).save(state(6)).name == "ckpt-0000000006.pt"
    with pytest.raises(ValueError, match="keep"):
        CheckpointStore(tmp_path, keep=0)


def test_a_file_size_limit_fails_the_save_with_the_os_error(tmp_path: Path) -> None:
    """Past RLIMIT_FSIZE (systemd's LimitFSIZE=) the save fails with EFBIG, not torch's "unexpected
    pos", and leaves no file behind. In a child process: the limit would bind this one's files too."""
    script = (
        "import resource, sys, torch\n"
        "from pathlib import Path\n"
        "from streamdqn.learning.checkpoints import CheckpointStore\n"
        "hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))\n"
        "state = {'w': torch.randn(300, 300), 'rows': [torch.randn(20, 30) for _ in range(50)]}\n"
        "try:\n"
        "    CheckpointStore(Path(sys.argv[1])).save(state)\n"
        "except OSError as exc:\n"
        "    print(exc.strerror)\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                         timeout=60)
    assert out.stdout.strip() == "File too large", out.stderr
    assert list(tmp_path.iterdir()) == []
