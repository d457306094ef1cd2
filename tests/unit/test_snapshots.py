"""ONNX snapshots: export with the normalization baked in, check and parity, versioned atomic publishing."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from streamdqn.errors import SnapshotError
from streamdqn.learning.model import QNetwork
from streamdqn.snapshots.export import PARITY_TOLERANCE, Provenance, check_onnx, export_onnx, publish_snapshot
from streamdqn.snapshots.layout import LATEST, MANIFEST_FILE, MODEL_FILE
from streamdqn.snapshots.store import SnapshotStore
from tests.factories import policy_info

OBS_DIM, N_ACTIONS = 30, 5


@contextmanager
def legacy_exporter() -> Iterator[None]:
    # snapshots.py picks torch's TorchScript exporter on purpose (~150x faster than dynamo); torch
    # deprecates it with DeprecationWarnings that -W error would turn into failures.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def network(seed: int = 0) -> QNetwork:
    torch.manual_seed(seed)
    q = QNetwork(OBS_DIM, N_ACTIONS, (32, 32), clip=4.0)
    rng = np.random.default_rng(seed)
    q.set_normalization(rng.normal(5.0, 3.0, OBS_DIM), rng.uniform(0.5, 20.0, OBS_DIM), 4.0)
    return q.eval()


@pytest.fixture(scope="module")
def exported() -> tuple[QNetwork, bytes]:
    q = network()
    with legacy_exporter():
        return q, export_onnx(q)


def raw_inputs(n: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(5.0, 30.0, size=(n, OBS_DIM))).astype(np.float32)


def test_export_passes_the_checker_and_matches_torch_on_raw_inputs(exported: tuple[QNetwork, bytes]) -> None:
    q, model = exported
    onnx.checker.check_model(onnx.load_from_string(model), full_check=True)
    x = raw_inputs(300)
    x[:5] *= 1000.0  # far outside the normalizer's range: the clip must be in the graph too
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    q_ort, action_ort = session.run(None, {"features": x})
    with torch.no_grad():
        q_torch = q(torch.from_numpy(x)).numpy()
    assert np.max(np.abs(q_ort - q_torch)) < PARITY_TOLERANCE
    np.testing.assert_array_equal(action_ort, q_torch.argmax(axis=1))
    # The normalization really is in the graph: an identity-normalized network answers differently.
    plain = QNetwork(OBS_DIM, N_ACTIONS, (32, 32))
    plain.mlp.load_state_dict(q.mlp.state_dict())
    with torch.no_grad():
        assert np.max(np.abs(plain(torch.from_numpy(x)).numpy() - q_ort)) > 1e-2
    assert check_onnx(model, q, x) < PARITY_TOLERANCE


def test_outputs_names_dtypes_and_dynamic_batch(exported: tuple[QNetwork, bytes]) -> None:
    _, model = exported
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    assert [(i.name, i.type) for i in session.get_inputs()] == [("features", "tensor(float)")]
    assert [(o.name, o.type) for o in session.get_outputs()] == [
        ("q_values", "tensor(float)"),
        ("action", "tensor(int64)"),
    ]
    for batch in (1, 257):
        q_values, action = session.run(["q_values", "action"], {"features": raw_inputs(batch)})
        assert q_values.shape == (batch, N_ACTIONS)
        assert q_values.dtype == np.float32
        assert action.shape == (batch,)
        assert action.dtype == np.int64


def test_check_refuses_a_broken_or_mismatched_model(exported: tuple[QNetwork, bytes]) -> None:
    q, model = exported
    with pytest.raises(SnapshotError, match="checker"):
        check_onnx(model[: len(model) // 2], q, raw_inputs(4))
    with pytest.raises(SnapshotError, match="differ"):
        check_onnx(model, network(seed=1), raw_inputs(4))


# --- the store -------------------------------------------------------------------------------------


def test_versions_are_monotonic_and_latest_follows(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path, keep=10)
    assert store.latest_version() is None
    assert store.versions() == []
    with pytest.raises(SnapshotError, match="no snapshot"):
        store.read()
    published = [store.publish(f"model {i}".encode(), policy_info(updates=i)) for i in range(3)]
    assert [s.version for s in published] == [1, 2, 3]
    assert store.versions() == [1, 2, 3]
    assert os.readlink(tmp_path / LATEST) == "3"
    assert store.latest_version() == 3
    assert (tmp_path / LATEST / MODEL_FILE).read_bytes() == b"model 2"
    snapshot = store.read()
    assert snapshot.version == 3
    assert snapshot.manifest.updates == 2
    assert snapshot.manifest.sha256 == hashlib.sha256(b"model 2").hexdigest()
    assert snapshot.manifest.version == 3
    assert snapshot.manifest.created_at > 0
    # Not made latest: a new version number all the same, and latest stays.
    quiet = store.publish(b"candidate", policy_info(), channel=None)
    assert quiet.version == 4
    assert store.latest_version() == 3
    # A store opened later continues from the highest version.
    assert SnapshotStore(tmp_path, keep=10).publish(b"m", policy_info()).version == 5


def test_retention_prunes_old_versions_but_never_latest(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path, keep=2)
    for i in range(4):
        store.publish(f"m{i}".encode(), policy_info())
    assert store.versions() == [3, 4]
    store.point_latest(3)
    for i in range(2):
        store.publish(f"c{i}".encode(), policy_info(), channel=None)
    assert store.latest_version() == 3
    assert 3 in store.versions()
    assert store.versions()[-2:] == [5, 6]
    assert (tmp_path / LATEST / MODEL_FILE).read_bytes() == b"m2"
    with pytest.raises(ValueError, match="at least 1"):
        SnapshotStore(tmp_path, keep=0)


def test_leftover_temp_dir_of_a_killed_writer_is_never_listed_and_cleaned(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    store.publish(b"m1", policy_info())
    leftover = tmp_path / ".tmp-2-abc123"
    leftover.mkdir()
    (leftover / MODEL_FILE).write_bytes(b"half")
    stale_link = tmp_path / ".latest-99-1"
    os.symlink("1", stale_link)
    assert store.versions() == [1]
    assert store.publish(b"m2", policy_info()).version == 2
    reopened = SnapshotStore(tmp_path)
    assert not leftover.exists()
    assert not stale_link.is_symlink()
    assert reopened.versions() == [1, 2]
    assert reopened.latest_version() == 2


def test_publish_snapshot_writes_a_checked_model_and_its_manifest(tmp_path: Path) -> None:
    q = network(seed=2)
    with legacy_exporter():
        snapshot = publish_snapshot(SnapshotStore(tmp_path), q, raw_inputs(16), Provenance(updates=12))
    model = (snapshot.path / MODEL_FILE).read_bytes()
    manifest = json.loads((snapshot.path / MANIFEST_FILE).read_text())
    assert manifest == snapshot.manifest.as_dict()
    assert manifest["sha256"] == hashlib.sha256(model).hexdigest()
    assert manifest["updates"] == 12
    assert manifest["version"] == 1
    assert manifest["onnx"]["inputs"] == {"features": ["N", OBS_DIM]}
    assert 0 <= manifest["parity_max_abs_diff"] < PARITY_TOLERANCE
    assert {"torch", "numpy", "onnx", "onnxruntime"} <= set(manifest["packages"])
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    x = raw_inputs(8, seed=5)
    with torch.no_grad():
        np.testing.assert_allclose(
            session.run(["q_values"], {"features": x})[0],
            q(torch.from_numpy(x)).numpy(),
            atol=PARITY_TOLERANCE,
        )
