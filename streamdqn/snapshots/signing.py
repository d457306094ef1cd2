"""Manifest signatures: Ed25519 (public-key) or HMAC-SHA256 (shared secret).

The daemon signs each snapshot manifest with a `Signer`; a sandbox checks it with the matching
verifier before it loads a pulled model. A signature covers the manifest's canonical JSON without
its `signature` key (`signed_payload`); the manifest carries the model's sha256, so the signature
covers the model too.

Ed25519 is the one to use when the sandboxes are less trusted than the daemon: they hold only the
public key and cannot sign. With HMAC every holder of the secret can sign.

Key material never appears in exceptions, reprs or logs: errors name the file, never its contents.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import os
import stat
from pathlib import Path
from typing import Any, Protocol

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from streamdqn.atomic import atomic_write_bytes
from streamdqn.errors import ConfigError, SnapshotVerifyError

log = logging.getLogger(__name__)

ED25519 = "ed25519"
HMAC_SHA256 = "hmac-sha256"
NONE = "none"
ALGORITHMS = (NONE, ED25519, HMAC_SHA256)

# Shorter HMAC secrets are brute-forceable offline from one signed manifest.
HMAC_MIN_KEY_BYTES = 16
# Cap on what we read as a key file: a mistyped path to a large file should not be slurped.
_MAX_KEY_FILE_BYTES = 64 * 1024
_ED25519_HINT = (
    "create a key pair with `openssl genpkey -algorithm ed25519 -out KEY.pem` and "
    "`openssl pkey -in KEY.pem -pubout -out KEY.pub` (or snapshots.signing.generate_ed25519_keypair)"
)


class Verifier(Protocol):
    """Checks a signature made by the `Signer` of the same algorithm."""

    algorithm: str

    def verify(self, data: bytes, signature: str) -> bool: ...


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def signed_payload(manifest: dict[str, Any]) -> bytes:
    """The bytes a manifest signature covers: its canonical JSON without the signature itself.

    It lives here, not in snapshots.py, so that `streamdqn pull` on a sandbox verifies without
    importing torch and onnx (~4 s); snapshots.py signs with this same function.
    """
    return canonical_json({k: v for k, v in manifest.items() if k != "signature"})


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _unb64(value: str) -> bytes | None:
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        return None


def _read_key_file(path: str | os.PathLike[str], what: str, hint: str, *, secret: bool) -> bytes:
    """The file's bytes, or a ConfigError that names the file and says what to do (never its contents)."""
    if not str(path):
        raise ConfigError(f"no {what} file given; {hint}")
    p = Path(path)
    try:
        with p.open("rb") as f:
            data = f.read(_MAX_KEY_FILE_BYTES + 1)
            mode = stat.S_IMODE(os.fstat(f.fileno()).st_mode)
    except FileNotFoundError:
        raise ConfigError(f"{what} file {p} does not exist; {hint}") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} file {p} is a directory; {hint}") from None
    except PermissionError:
        raise ConfigError(f"{what} file {p} is not readable by this user; fix its owner or mode") from None
    except OSError as exc:
        raise ConfigError(f"{what} file {p} could not be read ({exc.strerror}); {hint}") from None
    if len(data) > _MAX_KEY_FILE_BYTES:
        raise ConfigError(f"{what} file {p} is over {_MAX_KEY_FILE_BYTES} bytes; is it the right file?")
    if not data.strip():
        raise ConfigError(f"{what} file {p} is empty; {hint}")
    if secret and mode & 0o077:
        log.warning("%s file %s is readable by group or others (mode %o); chmod 600 it", what, p, mode)
    return data


class Ed25519Signer:
    """Signs with an Ed25519 private key (PKCS8 PEM, unencrypted)."""

    algorithm = ED25519

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key

    @classmethod
    def from_pem_file(cls, path: str | os.PathLike[str]) -> Ed25519Signer:
        data = _read_key_file(path, "Ed25519 private key", _ED25519_HINT, secret=True)
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            # `from None`: the parser's message may quote the input; the error names only the file.
            raise ConfigError(f"{path} is not an unencrypted PEM private key; {_ED25519_HINT}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"{path} is a private key of another type, not Ed25519; {_ED25519_HINT}")
        return cls(key)

    def public_key(self) -> Ed25519PublicKey:
        return self._key.public_key()

    def sign(self, data: bytes) -> str:
        return _b64(self._key.sign(data))

    def __repr__(self) -> str:
        return f"Ed25519Signer(public_key={_public_fingerprint(self._key.public_key())})"


class Ed25519Verifier:
    """Checks Ed25519 signatures with the public key (SubjectPublicKeyInfo PEM)."""

    algorithm = ED25519

    def __init__(self, key: Ed25519PublicKey) -> None:
        self._key = key

    @classmethod
    def from_pem_file(cls, public_key_path: str | os.PathLike[str]) -> Ed25519Verifier:
        hint = "copy the daemon's Ed25519 public key (the .pub PEM written next to its private key) there"
        data = _read_key_file(public_key_path, "Ed25519 public key", hint, secret=False)
        try:
            key = serialization.load_pem_public_key(data)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            if b"PRIVATE KEY" in data:
                raise ConfigError(
                    f"{public_key_path} is a private key; a sandbox needs only the public key, "
                    "keep the private one on the daemon host"
                ) from None
            raise ConfigError(f"{public_key_path} is not a PEM public key; {hint}") from None
        if not isinstance(key, Ed25519PublicKey):
            raise ConfigError(f"{public_key_path} is not an Ed25519 public key; {hint}")
        return cls(key)

    def verify(self, data: bytes, signature: str) -> bool:
        raw = _unb64(signature)
        if raw is None:
            return False
        try:
            self._key.verify(raw, data)
        except InvalidSignature:
            return False
        return True

    def __repr__(self) -> str:
        return f"Ed25519Verifier(public_key={_public_fingerprint(self._key)})"


def _public_fingerprint(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "sha256:" + hashlib.sha256(raw).hexdigest()[:16]


def _load_hmac_secret(path: str | os.PathLike[str]) -> bytes:
    hint = "put 32 random bytes there, e.g. `head -c 32 /dev/urandom | base64 > FILE; chmod 600 FILE`"
    data = _read_key_file(path, "HMAC secret", hint, secret=True)
    # `echo secret > file` adds a newline that the other side may not have: the secret is the stripped bytes.
    secret = data.strip()
    if len(secret) < HMAC_MIN_KEY_BYTES:
        raise ConfigError(f"HMAC secret in {path} is shorter than {HMAC_MIN_KEY_BYTES} bytes; {hint}")
    return secret


class HmacSigner:
    """HMAC-SHA256 with a shared secret read from a file (surrounding whitespace stripped)."""

    algorithm = HMAC_SHA256

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> HmacSigner:
        return cls(_load_hmac_secret(path))

    def sign(self, data: bytes) -> str:
        return _b64(hmac.new(self._secret, data, hashlib.sha256).digest())

    def __repr__(self) -> str:
        return "HmacSigner(secret=<hidden>)"


class HmacVerifier:
    """Checks HMAC-SHA256 signatures; the comparison takes constant time."""

    algorithm = HMAC_SHA256

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> HmacVerifier:
        return cls(_load_hmac_secret(path))

    def verify(self, data: bytes, signature: str) -> bool:
        raw = _unb64(signature)
        if raw is None:
            return False
        return hmac.compare_digest(raw, hmac.new(self._secret, data, hashlib.sha256).digest())

    def __repr__(self) -> str:
        return "HmacVerifier(secret=<hidden>)"


def _check_algorithm(algorithm: str) -> None:
    if algorithm not in ALGORITHMS:
        raise ConfigError(f"unknown signing algorithm {algorithm!r}; use one of {', '.join(ALGORITHMS)}")


def load_signer(algorithm: str, key_file: str) -> Ed25519Signer | HmacSigner | None:
    """The signer for a `publish.signing` setting; None for "none". Raises ConfigError."""
    _check_algorithm(algorithm)
    if algorithm == NONE:
        return None
    if not key_file:
        raise ConfigError(f"signing {algorithm!r} needs a key file (publish.signing_key_file)")
    if algorithm == ED25519:
        return Ed25519Signer.from_pem_file(key_file)
    return HmacSigner.from_file(key_file)


def load_verifier(algorithm: str, key_file: str) -> Ed25519Verifier | HmacVerifier | None:
    """The verifier for a pull's `--verify-alg`/`--verify-key`; None for "none". Raises ConfigError."""
    _check_algorithm(algorithm)
    if algorithm == NONE:
        return None
    if not key_file:
        raise ConfigError(f"verifying {algorithm!r} signatures needs a key file (--verify-key)")
    if algorithm == ED25519:
        return Ed25519Verifier.from_pem_file(key_file)
    return HmacVerifier.from_file(key_file)


def verify_manifest(manifest: dict[str, Any], verifier: Verifier) -> None:
    """Raise SnapshotVerifyError unless `manifest` carries a valid signature of `verifier`'s algorithm."""
    version = manifest.get("version", "?")
    signature = manifest.get("signature")
    if signature is None:
        raise SnapshotVerifyError(
            f"snapshot {version} is not signed, but a {verifier.algorithm} signature is required; "
            "enable publish.signing on the daemon, or pull without a verify key"
        )
    if not isinstance(signature, dict) or not isinstance(signature.get("value"), str):
        raise SnapshotVerifyError(f"snapshot {version} has a malformed signature field")
    algorithm = signature.get("algorithm")
    if algorithm != verifier.algorithm:
        raise SnapshotVerifyError(
            f"snapshot {version} is signed with {algorithm!r} but this pull verifies {verifier.algorithm!r}; "
            "use the matching --verify-alg and key"
        )
    if not verifier.verify(signed_payload(manifest), signature["value"]):
        raise SnapshotVerifyError(
            f"snapshot {version}: bad {verifier.algorithm} signature "
            "(the manifest was altered, or signed with another key)"
        )


def generate_ed25519_keypair(
    private_path: str | os.PathLike[str], public_path: str | os.PathLike[str], *, overwrite: bool = False
) -> Ed25519Verifier:
    """Write a new Ed25519 private key (PKCS8 PEM, mode 0600) and its public key (PEM, 0644).

    Refuses to replace an existing private key unless `overwrite`: a lost key means every sandbox
    needs the new public key. Returns the verifier for the new public key.
    """
    private_path, public_path = Path(private_path), Path(public_path)
    if private_path.resolve() == public_path.resolve():
        raise ConfigError("the private and public key paths must differ")
    if not overwrite and private_path.exists():
        raise ConfigError(f"{private_path} already exists; remove it first or pass overwrite=True")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    # atomic_write creates the temp file 0600 (mkstemp) and only then renames it: never world-readable.
    atomic_write_bytes(private_path, private_pem, mode=0o600)
    atomic_write_bytes(public_path, public_pem, mode=0o644)
    return Ed25519Verifier(key.public_key())
