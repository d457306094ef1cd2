"""Manifest signing: real Ed25519 keys and HMAC secrets on disk, tampering, key-file errors, no leaks."""

from __future__ import annotations

import copy
import json
import logging
import os
import stat
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from streamdqn.errors import ConfigError, SnapshotVerifyError
from streamdqn.snapshots.signing import (
    Ed25519Signer,
    Ed25519Verifier,
    HmacSigner,
    HmacVerifier,
    generate_ed25519_keypair,
    load_signer,
    load_verifier,
    signed_payload,
    verify_manifest,
)

HMAC_SECRET = b"s3cr3t-hmac-key-for-tests-0123456789"


def _manifest(**extra: Any) -> dict[str, Any]:
    return {"version": 3, "sha256": "ab" * 32, "created_at": 1.5, "spec": {"obs_dim": 30}, **extra}


def _signed(manifest: dict[str, Any], signer: Ed25519Signer | HmacSigner) -> dict[str, Any]:
    signature = {"algorithm": signer.algorithm, "value": signer.sign(signed_payload(manifest))}
    return {**manifest, "signature": signature}


@pytest.fixture
def ed_keys(tmp_path: Path) -> tuple[Path, Path]:
    private, public = tmp_path / "sign.pem", tmp_path / "sign.pub"
    generate_ed25519_keypair(private, public)
    return private, public


@pytest.fixture
def hmac_file(tmp_path: Path) -> Path:
    path = tmp_path / "hmac.key"
    path.write_bytes(HMAC_SECRET + b"\n")
    path.chmod(0o600)
    return path


def test_keypair_files_are_pem_with_private_mode_0600(ed_keys: tuple[Path, Path]) -> None:
    private, public = ed_keys
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert private.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert public.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    assert not [p.name for p in private.parent.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_keypair_refuses_to_overwrite_a_private_key(ed_keys: tuple[Path, Path]) -> None:
    private, public = ed_keys
    before = private.read_bytes()
    with pytest.raises(ConfigError, match="already exists"):
        generate_ed25519_keypair(private, public)
    assert private.read_bytes() == before
    generate_ed25519_keypair(private, public, overwrite=True)
    assert private.read_bytes() != before


@pytest.mark.parametrize("algorithm", ["ed25519", "hmac-sha256"])
def test_sign_and_verify_roundtrip(algorithm: str, ed_keys: tuple[Path, Path], hmac_file: Path) -> None:
    sign_key, verify_key = (ed_keys if algorithm == "ed25519" else (hmac_file, hmac_file))
    signer = load_signer(algorithm, str(sign_key))
    verifier = load_verifier(algorithm, str(verify_key))
    assert signer is not None
    assert verifier is not None
    assert signer.algorithm == verifier.algorithm == algorithm
    manifest = _signed(_manifest(), signer)
    verify_manifest(manifest, verifier)
    # Key order and whitespace of the JSON on disk do not matter: the payload is canonical.
    verify_manifest(dict(reversed(list(manifest.items()))), verifier)


def test_the_canonical_payload_is_pinned_byte_for_byte() -> None:
    """A verifier written in another language must rebuild exactly these bytes: sorted keys at every
    depth, no whitespace, ASCII escapes, the signature left out."""
    manifest = {
        "version": 3, "sha256": "abab", "name": "café",
        "normalizer": {"std": [1.0, 2.5], "mean": [0.0, -1.5], "clip": 10},
        "signature": {"algorithm": "ed25519", "value": "c2ln"},
    }
    expected = (b'{"name":"caf\\u00e9","normalizer":{"clip":10,"mean":[0.0,-1.5],"std":[1.0,2.5]},'
                b'"sha256":"abab","version":3}')
    assert signed_payload(manifest) == expected
    with pytest.raises(ValueError, match="JSON compliant"):
        signed_payload({**manifest, "version": float("nan")})  # NaN has no canonical JSON spelling


def _normalizer_manifest() -> dict[str, Any]:
    return _manifest(normalizer={"count": 12.0, "mean": [0.5, -1.0], "std": [1.0, 2.0], "clip": 10.0})


@pytest.mark.parametrize("algorithm", ["ed25519", "hmac-sha256"])
def test_reordered_json_keeps_the_canonical_bytes_and_a_changed_value_breaks_them(
    algorithm: str, ed_keys: tuple[Path, Path], hmac_file: Path, tmp_path: Path
) -> None:
    sign_key, verify_key = (ed_keys if algorithm == "ed25519" else (hmac_file, hmac_file))
    signer, verifier = load_signer(algorithm, str(sign_key)), load_verifier(algorithm, str(verify_key))
    assert signer is not None
    assert verifier is not None
    manifest = _signed(_normalizer_manifest(), signer)
    payload = signed_payload(manifest)

    # The same manifest written to disk with every object's keys reversed and indented, then read back.
    def reverse(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: reverse(v) for k, v in reversed(list(value.items()))}
        return value

    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(reverse(manifest), indent=4))
    reread = json.loads(path.read_text())
    assert list(reread) != list(manifest)
    assert list(reread["normalizer"]) != list(manifest["normalizer"])
    assert signed_payload(reread) == payload
    verify_manifest(reread, verifier)

    changes: dict[str, Callable[[dict[str, Any]], object]] = {
        "version": lambda m: m.update(version=m["version"] + 1),
        "sha256": lambda m: m.update(sha256="ab" * 31 + "ac"),
        "normalizer mean": lambda m: m["normalizer"]["mean"].__setitem__(1, -1.0000001),
        "normalizer std order": lambda m: m["normalizer"]["std"].reverse(),  # list order is content
        "int for float": lambda m: m["normalizer"].update(clip=10),  # 10 and 10.0 spell differently
    }
    for what, change in changes.items():
        changed = copy.deepcopy(reread)
        change(changed)
        assert signed_payload(changed) != payload, what
        with pytest.raises(SnapshotVerifyError, match=r"bad .* signature"):
            verify_manifest(changed, verifier)


@pytest.mark.parametrize("algorithm", ["ed25519", "hmac-sha256"])
@pytest.mark.parametrize(
    "tamper",
    [
        lambda m: m.update(sha256="cd" * 32),  # swap the model
        lambda m: m.update(version=4),
        lambda m: m["spec"].update(obs_dim=31),  # nested field
        lambda m: m.update(extra="added"),
        lambda m: m.pop("created_at"),
        lambda m: m["signature"].update(value=m["signature"]["value"][:-4] + "AAA="),
        lambda m: m["signature"].update(value="not base64 !!"),
        lambda m: m["signature"].update(value=""),
    ],
    ids=["sha256", "version", "nested", "added-key", "removed-key", "sig-bits", "sig-garbage", "sig-empty"],
)
def test_any_change_breaks_the_signature(
    algorithm: str, tamper: Any, ed_keys: tuple[Path, Path], hmac_file: Path
) -> None:
    signer: Ed25519Signer | HmacSigner
    verifier: Ed25519Verifier | HmacVerifier
    if algorithm == "ed25519":
        signer, verifier = Ed25519Signer.from_pem_file(ed_keys[0]), Ed25519Verifier.from_pem_file(ed_keys[1])
    else:
        signer, verifier = HmacSigner.from_file(hmac_file), HmacVerifier.from_file(hmac_file)
    manifest = copy.deepcopy(_signed(_manifest(), signer))
    tamper(manifest)
    with pytest.raises(SnapshotVerifyError, match=r"bad .* signature"):
        verify_manifest(manifest, verifier)


def test_another_key_is_refused(ed_keys: tuple[Path, Path], tmp_path: Path, hmac_file: Path) -> None:
    other_private, other_public = tmp_path / "other.pem", tmp_path / "other.pub"
    generate_ed25519_keypair(other_private, other_public)
    manifest = _signed(_manifest(), Ed25519Signer.from_pem_file(other_private))
    with pytest.raises(SnapshotVerifyError, match="bad ed25519 signature"):
        verify_manifest(manifest, Ed25519Verifier.from_pem_file(ed_keys[1]))

    other_secret = tmp_path / "other.key"
    other_secret.write_bytes(b"a-different-secret-of-enough-length")
    manifest = _signed(_manifest(), HmacSigner.from_file(other_secret))
    with pytest.raises(SnapshotVerifyError, match="bad hmac-sha256 signature"):
        verify_manifest(manifest, HmacVerifier.from_file(hmac_file))


def test_unsigned_and_wrong_algorithm_and_malformed(ed_keys: tuple[Path, Path], hmac_file: Path) -> None:
    ed_verifier = Ed25519Verifier.from_pem_file(ed_keys[1])
    with pytest.raises(SnapshotVerifyError, match="not signed"):
        verify_manifest(_manifest(), ed_verifier)
    hmac_signed = _signed(_manifest(), HmacSigner.from_file(hmac_file))
    with pytest.raises(SnapshotVerifyError, match=r"signed with 'hmac-sha256'.*verifies 'ed25519'"):
        verify_manifest(hmac_signed, ed_verifier)
    # An HMAC-signed manifest relabelled ed25519 is still refused by the ed25519 check itself.
    relabelled = {**hmac_signed, "signature": {**hmac_signed["signature"], "algorithm": "ed25519"}}
    with pytest.raises(SnapshotVerifyError, match="bad ed25519 signature"):
        verify_manifest(relabelled, ed_verifier)
    for bad in ("ed25519:abc", {"algorithm": "ed25519"}, {"algorithm": "ed25519", "value": 7}, None):
        manifest = {**_manifest(), "signature": bad}
        with pytest.raises(SnapshotVerifyError, match=r"malformed|not signed"):
            verify_manifest(manifest, ed_verifier)


def test_hmac_secret_is_the_stripped_file_content(tmp_path: Path, hmac_file: Path) -> None:
    # The same secret written without the trailing newline (as another tool might) verifies.
    bare = tmp_path / "bare.key"
    bare.write_bytes(HMAC_SECRET)
    verify_manifest(_signed(_manifest(), HmacSigner.from_file(hmac_file)), HmacVerifier.from_file(bare))


def test_a_manifest_the_store_signs_verifies_and_every_signed_field_is_covered(
    tmp_path: Path, ed_keys: tuple[Path, Path]
) -> None:
    """What SnapshotStore.publish writes verifies with the matching key, and changing any one value
    that the store put into the manifest (or the signature itself) makes verification fail."""
    from streamdqn.snapshots.store import SnapshotStore
    from tests.factories import publish_small

    private, public = ed_keys
    store = SnapshotStore(tmp_path / "snapshots")
    snapshot = publish_small(store, seed=1, signer=Ed25519Signer.from_pem_file(private))
    verifier = Ed25519Verifier.from_pem_file(public)
    manifest = json.loads((snapshot.path / "manifest.json").read_bytes())
    verify_manifest(manifest, verifier)

    for key in [k for k in manifest if k != "signature"]:
        tampered = copy.deepcopy(manifest)
        tampered[key] = _changed(tampered[key])
        with pytest.raises(SnapshotVerifyError):
            verify_manifest(tampered, verifier)
    forged = copy.deepcopy(manifest)
    forged["signature"]["value"] = forged["signature"]["value"][::-1]
    with pytest.raises(SnapshotVerifyError):
        verify_manifest(forged, verifier)


def _changed(value: Any) -> Any:
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, list):
        return [*value, 0]
    if isinstance(value, dict):
        return {**value, "tampered": True}
    return "tampered"


def test_none_algorithm_needs_no_key() -> None:
    assert load_signer("none", "") is None
    assert load_verifier("none", "/does/not/matter") is None


def test_config_errors_name_the_file_and_the_fix(tmp_path: Path, ed_keys: tuple[Path, Path]) -> None:
    missing = tmp_path / "nope.pem"
    with pytest.raises(ConfigError, match=rf"{missing}.*does not exist.*openssl genpkey"):
        load_signer("ed25519", str(missing))
    with pytest.raises(ConfigError, match=r"does not exist.*public key"):
        load_verifier("ed25519", str(missing))
    with pytest.raises(ConfigError, match="needs a key file"):
        load_signer("hmac-sha256", "")
    with pytest.raises(ConfigError, match="needs a key file"):
        load_verifier("ed25519", "")
    with pytest.raises(ConfigError, match="unknown signing algorithm 'rsa'"):
        load_signer("rsa", str(ed_keys[0]))
    with pytest.raises(ConfigError, match="is a directory"):
        load_signer("hmac-sha256", str(tmp_path))
    empty = tmp_path / "empty.key"
    empty.write_bytes(b"\n")
    with pytest.raises(ConfigError, match="is empty"):
        load_signer("hmac-sha256", str(empty))
    short = tmp_path / "short.key"
    short.write_bytes(b"tooshort\n")
    with pytest.raises(ConfigError, match="shorter than 16 bytes"):
        load_verifier("hmac-sha256", str(short))
    # Keys swapped: a private key given to the verifier, a public key given to the signer.
    with pytest.raises(ConfigError, match="is a private key; a sandbox needs only the public key"):
        load_verifier("ed25519", str(ed_keys[0]))
    with pytest.raises(ConfigError, match="not an unencrypted PEM private key"):
        load_signer("ed25519", str(ed_keys[1]))


def test_other_key_types_are_refused(tmp_path: Path) -> None:
    ec_key = ec.generate_private_key(ec.SECP256R1())
    private, public = tmp_path / "ec.pem", tmp_path / "ec.pub"
    private.write_bytes(ec_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    public.write_bytes(ec_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    with pytest.raises(ConfigError, match="not Ed25519"):
        Ed25519Signer.from_pem_file(private)
    with pytest.raises(ConfigError, match="not an Ed25519 public key"):
        Ed25519Verifier.from_pem_file(public)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_key_file(hmac_file: Path) -> None:
    hmac_file.chmod(0o000)
    try:
        with pytest.raises(ConfigError, match=rf"{hmac_file} is not readable by this user"):
            HmacSigner.from_file(hmac_file)
    finally:
        hmac_file.chmod(0o600)


def test_secrets_stay_out_of_errors_reprs_and_logs(
    tmp_path: Path, ed_keys: tuple[Path, Path], hmac_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    private_pem = ed_keys[0].read_bytes()
    key_body = b"".join(private_pem.splitlines()[1:-1]).decode()
    hmac_signer, hmac_verifier = HmacSigner.from_file(hmac_file), HmacVerifier.from_file(hmac_file)
    ed_signer = Ed25519Signer.from_pem_file(ed_keys[0])
    texts = [repr(hmac_signer), repr(hmac_verifier), repr(ed_signer), str(ed_signer)]
    # A corrupted private key and a short secret: the errors must not quote the file.
    corrupt = tmp_path / "corrupt.pem"
    corrupt.write_bytes(private_pem.replace(key_body[10:20].encode(), b"!!!!!!!!!!"))
    short = tmp_path / "short.key"
    short.write_bytes(b"hunter2-secret")
    for load, path in ((Ed25519Signer.from_pem_file, corrupt), (HmacSigner.from_file, short)):
        with pytest.raises(ConfigError) as info:
            load(path)
        # The whole traceback, chained exceptions included (a parser error could quote the input).
        texts += traceback.format_exception(info.value)
    # A world-readable secret is loaded, with a warning that names the file only.
    hmac_file.chmod(0o644)
    HmacVerifier.from_file(hmac_file)
    assert any("chmod 600" in r.getMessage() for r in caplog.records)
    texts += [r.getMessage() for r in caplog.records]
    joined = "\n".join(texts)
    for secret in (HMAC_SECRET.decode(), "hunter2", key_body[:24], key_body[-24:]):
        assert secret not in joined
    assert "<hidden>" in repr(hmac_signer)
