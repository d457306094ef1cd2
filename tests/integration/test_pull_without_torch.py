"""`streamdqn pull` in a process where torch, onnx, onnxruntime and aiokafka cannot be imported.

A sandbox installs only what pulling needs; the CLI path (argument parsing, token file, signature
check, download, install) must not reach for the learning stack, not even indirectly.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from streamdqn.snapshots.signing import Ed25519Signer, generate_ed25519_keypair
from streamdqn.snapshots.store import SnapshotStore, sha256_hex
from tests.factories import publish_small
from tests.integration.test_pull import serving

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
BLOCKED = ("torch", "onnx", "onnxruntime", "aiokafka")
TOKEN = "pull-without-torch-token-01"

# A None entry in sys.modules makes `import torch` (and `import torch.nn`) raise ImportError.
PULL = f"""
import sys
sys.modules.update(dict.fromkeys({BLOCKED!r}))
from streamdqn.cli import main
code = main(sys.argv[1:])
leaked = sorted(m for m in sys.modules if m.split(".")[0] in {BLOCKED!r} and sys.modules[m] is not None)
assert not leaked, leaked
sys.exit(code)
"""


def run_pull(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", PULL, "pull", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=60, check=False)


def test_the_blocker_really_blocks() -> None:
    # Without this, a broken blocker would let the tests below pass with torch imported.
    probe = PULL.replace("from streamdqn.cli import main", "import torch.nn")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode != 0
    assert "ModuleNotFoundError" in result.stderr or "ImportError" in result.stderr


def test_pull_installs_a_signed_snapshot_without_torch_onnx_or_kafka(tmp_path: Path) -> None:
    private, public = tmp_path / "sign.pem", tmp_path / "sign.pub"
    generate_ed25519_keypair(private, public)
    store = SnapshotStore(tmp_path / "server" / "snapshots")
    snap = publish_small(store, seed=4, signer=Ed25519Signer.from_pem_file(private))
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    out = tmp_path / "sandbox" / "policy"

    with serving(store.root, token=TOKEN) as base:
        args = ("--url", base, "--out", str(out), "--token-file", str(token_file),
                "--verify-key", str(public), "--verify-alg", "ed25519")
        result = run_pull(*args)
        assert result.returncode == 0, result.stderr
        assert f"pulled snapshot {snap.version} into {out}" in result.stdout
        assert "ed25519 signature verified" in result.stdout

        model = (out / "model.onnx").read_bytes()
        assert sha256_hex(model) == snap.manifest.sha256
        assert model == (snap.path / "model.onnx").read_bytes()
        assert (out / "manifest.json").read_bytes() == (snap.path / "manifest.json").read_bytes()

        again = run_pull(*args)
        assert again.returncode == 0, again.stderr
        assert "is current" in again.stdout


def test_pull_errors_are_clean_without_torch(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path / "server" / "snapshots")
    publish_small(store, seed=5)
    with serving(store.root, token=TOKEN) as base:
        result = run_pull("--url", base, "--out", str(tmp_path / "out"))
    assert result.returncode == 1
    assert "streamdqn pull: error:" in result.stderr
    assert "bearer token is required" in result.stderr
    assert "Traceback" not in result.stderr
