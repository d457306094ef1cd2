"""Security of the running daemon: HTTP exposure, signed snapshots end to end, secrets, poisoning guards.

Three daemons start together for the module (they share the cost of importing torch):
`signed` binds the default host, needs a bearer token and signs with Ed25519; `hmac` signs with
HMAC-SHA256; `secrets` talks SASL to a broker that does not do SASL (so it keeps retrying), with a
token that also guards /metrics. The poisoning test runs its own daemon.
"""

from __future__ import annotations

import base64
import datetime
import http.client
import json
import os
import secrets
import ssl
import subprocess
import sys
import threading
import time
import tomllib
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from streamdqn.config import load_settings
from streamdqn.daemon.build import kafka_options
from streamdqn.kafka.broker import free_port
from streamdqn.kafka.options import client_security
from streamdqn.learning.checkpoints import CheckpointStore
from streamdqn.offline.dataset import split_episodes
from streamdqn.offline.evaluate import evaluate_policy
from streamdqn.offline.simulator import simulate
from streamdqn.snapshots.policy import OnnxPolicy
from streamdqn.snapshots.signing import generate_ed25519_keypair
from streamdqn.snapshots.store import sha256_hex
from streamdqn.stream.rewards import RewardTable
from streamdqn.stream.wire import validate_records
from tests.integration.conftest import (
    FAST,
    DaemonProcess,
    Topics,
    encode_events,
    produce,
    sim_events,
    write_config,
)

pytestmark = pytest.mark.integration

SMALL = {**FAST, "publish": {"interval_seconds": 5.0, "min_updates": 20, "keep": 50}}


# ---------------------------------------------------------------- helpers


def new_topics(bootstrap: str) -> Topics:
    return Topics.fresh(bootstrap)


def request(daemon: DaemonProcess, path: str, token: str | None = None) -> tuple[int, bytes, dict[str, str]]:
    """(status, body, headers) for a raw GET: the path is sent exactly as given, never normalized."""
    connection = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=10)
    try:
        connection.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})
        response = connection.getresponse()
        return response.status, response.read(), dict(response.getheaders())
    finally:
        connection.close()


def pull_cli(daemon: DaemonProcess, out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "streamdqn", "pull", "--url", daemon.url, "--out", str(out), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def start_together(daemons: list[DaemonProcess]) -> None:
    errors: list[BaseException] = []

    def start(daemon: DaemonProcess) -> None:
        try:
            daemon.start()
        except BaseException as exc:  # noqa: BLE001 - reported to the test's thread, which fails on it
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(d,)) for d in daemons]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    if errors:
        raise errors[0]


@dataclass
class Fleet:
    signed: DaemonProcess  # default host, bearer token, Ed25519
    hmac: DaemonProcess  # HMAC-SHA256
    secrets: DaemonProcess  # SASL to a broker without SASL, token + protect_metrics, HMAC key
    token: str
    token_file: Path
    public_key: Path
    private_key: Path
    hmac_key: Path
    sasl_password: str


@pytest.fixture(scope="module")
def fleet(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("security")
    token = "tok-" + secrets.token_urlsafe(24)
    token_file = tmp / "token"
    token_file.write_text(token + "\n")
    private_key, public_key = tmp / "signing.pem", tmp / "signing.pub"
    generate_ed25519_keypair(private_key, public_key)
    hmac_key = tmp / "hmac.key"
    hmac_key.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
    hmac_key.chmod(0o600)
    sasl_password = "pw-" + secrets.token_urlsafe(24)

    ed25519 = {**SMALL["publish"], "signing": "ed25519", "signing_key_file": str(private_key)}
    hmac = {**SMALL["publish"], "signing": "hmac-sha256", "signing_key_file": str(hmac_key)}
    daemons = []
    for name, sections, env in [
        ("signed", {"publish": ed25519}, {"STREAMDQN_HTTP__TOKEN": token}),
        ("hmac", {"publish": hmac}, {}),
        ("secrets", {"publish": hmac, "http": {"protect_metrics": True},
                     "kafka": {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN",
                               "sasl_plain_username": "streamdqn"}},
         {"STREAMDQN_HTTP__TOKEN": token, "STREAMDQN_KAFKA__SASL_PLAIN_PASSWORD": sasl_password}),
    ]:
        topics = new_topics(kafka_bootstrap).create()
        if name != "secrets":
            produce(topics.bootstrap, topics.telemetry, encode_events(sim_events(30, seed=len(daemons) + 1)))
        port = free_port()
        config = write_config(tmp / f"{name}.toml", topics, tmp / name / "state", port,
                              **{**SMALL, **sections})
        if name == "signed":  # no http.host at all: the default must be loopback
            text = config.read_text()
            assert 'host = "127.0.0.1"\n' in text
            config.write_text(text.replace('host = "127.0.0.1"\n', ""))
        (tmp / name).mkdir(exist_ok=True)
        daemons.append(DaemonProcess(config, tmp / name / "state", port, tmp / name / "daemon.log", env))
    try:
        start_together(daemons)
        signed, hmac_daemon, secret_daemon = daemons
        for d in (signed, hmac_daemon):
            d.wait_for(lambda d=d: json.loads(request(d, "/snapshots", token)[1]).get("latest"), 90,
                       "a snapshot")
        secret_daemon.wait_for(lambda: sum(1 for e in secret_daemon.log_events()
                                           if e["event"] == "broker unreachable") >= 2, 60, "SASL retries")
        yield Fleet(signed, hmac_daemon, secret_daemon, token, token_file, public_key, private_key, hmac_key,
                    sasl_password)
    finally:
        stoppers = [threading.Thread(target=d.stop) for d in daemons]
        for t in stoppers:
            t.start()
        for t in stoppers:
            t.join(60)


# ---------------------------------------------------------------- 8: HTTP exposure


def listening_addresses(port: int) -> set[str]:
    """Local addresses with a socket in LISTEN state on `port`, from /proc/net/tcp{,6}."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            address, state = fields[1], fields[3]
            host, _, hex_port = address.partition(":")
            if state == "0A" and int(hex_port, 16) == port:
                if len(host) == 8:  # IPv4, little-endian
                    found.add(".".join(str(b) for b in bytes.fromhex(host)[::-1]))
                else:
                    found.add("::" if set(host) == {"0"} else host)
    return found


def test_http_binds_loopback_by_default(fleet: Fleet) -> None:
    config = fleet.signed.config.read_text()
    assert "host" not in config.split("[http]")[1].split("[")[0]  # the daemon was given no host
    assert listening_addresses(fleet.signed.port) == {"127.0.0.1"}


def test_token_guards_snapshots_but_not_probes_or_unprotected_metrics(fleet: Fleet) -> None:
    d = fleet.signed
    for path in ("/snapshots", "/snapshots/latest/manifest.json", "/snapshots/latest/model.onnx"):
        status, _, headers = request(d, path)
        assert status == 401
        assert headers["WWW-Authenticate"].startswith("Bearer")
        assert request(d, path, "wrong-" + fleet.token)[0] == 401
        assert request(d, path, fleet.token)[0] == 200
    assert request(d, "/metrics")[0] == 200  # protect_metrics is off
    assert request(d, "/healthz")[0] == 200
    assert request(d, "/readyz")[0] in (200, 503)


def test_metrics_need_the_token_when_protected(fleet: Fleet) -> None:
    d = fleet.secrets
    assert request(d, "/metrics")[0] == 401
    assert request(d, "/metrics", "nope")[0] == 401
    assert request(d, "/metrics", fleet.token)[0] == 200
    assert request(d, "/healthz")[0] == 200


def test_version_path_attacks_never_escape(fleet: Fleet) -> None:
    d = fleet.signed
    secret_bytes = fleet.private_key.read_bytes()
    for path in ["/snapshots/../checkpoints/manifest.json", "/snapshots/%2e%2e/manifest.json",
                 "/snapshots/%2e%2e%2f%2e%2e%2fsigning.pem/model.onnx",
                 "/snapshots/1%2F..%2F..%2F/manifest.json", "/snapshots/..%2Fcheckpoints/model.onnx",
                 f"/snapshots/{10**30}/model.onnx", "/snapshots/-1/manifest.json",
                 "/snapshots/01/manifest.json",
                 "/snapshots/latest/..%2Fmodel.onnx", "/snapshots/latest/%2e%2e",
                 "/snapshots/latest/../../../etc/passwd", "/snapshots/%00/model.onnx"]:
        status, body, _ = request(d, path, fleet.token)
        assert status in (400, 404), (path, status)
        assert b"PRIVATE KEY" not in body
        assert secret_bytes not in body
        assert b"root:" not in body


# ---------------------------------------------------------------- 9: signed snapshots end to end


def _swap(path: Path, data: bytes) -> None:
    """Replace a file by rename, as a tool would (the version directory's mtime changes)."""
    tmp = path.with_name(f".swap-{path.name}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _tampered_pull(daemon: DaemonProcess, out: Path, args: list[str], token: str | None,
                   tamper: Callable[[Path], None]) -> subprocess.CompletedProcess[str]:
    """Tamper with the version `latest` serves, pull, restore; retried if a publish moved `latest` meanwhile.

    The version tampered with is newer than the local copy (else the pull is a 304: nothing to refuse).
    """
    local = json.loads((out / "manifest.json").read_bytes())["version"]
    for _ in range(3):
        _feed(daemon)
        daemon.wait_for(lambda: json.loads(request(daemon, "/snapshots", token)[1])["latest"] > local, 30,
                        "a version newer than the local copy")
        version = json.loads(request(daemon, "/snapshots", token)[1])["latest"]
        version_dir = daemon.state_dir / "snapshots" / str(version)
        originals = {p: p.read_bytes() for p in version_dir.iterdir()}
        try:
            tamper(version_dir)
            result = pull_cli(daemon, out, *args)
        finally:
            for p, data in originals.items():
                _swap(p, data)
        if json.loads(request(daemon, "/snapshots", token)[1])["latest"] == version:
            return result
    raise AssertionError("`latest` kept moving during the tampered pulls")


def _feed(daemon: DaemonProcess) -> None:
    """Fresh episodes for the daemon, so that it learns and publishes again (an idle daemon does not)."""
    kafka = tomllib.loads(daemon.config.read_text())["kafka"]
    tag = uuid.uuid4().hex[:8]
    events = [{**e, "episode_id": f"{tag}-{e['episode_id']}"} for e in sim_events(4, seed=7)]
    produce(kafka["bootstrap_servers"], kafka["topic"], encode_events(events))


def _flip_model_byte(version_dir: Path) -> None:
    model = bytearray((version_dir / "model.onnx").read_bytes())
    model[len(model) // 2] ^= 0xFF
    _swap(version_dir / "model.onnx", bytes(model))


def _replace_model_and_manifest_sha(version_dir: Path) -> None:
    """An attacker's own model, with the manifest's sha256 updated to match it (the signature cannot be)."""
    model = bytearray((version_dir / "model.onnx").read_bytes())
    model[len(model) // 2] ^= 0xFF
    manifest = json.loads((version_dir / "manifest.json").read_bytes())
    manifest["sha256"] = sha256_hex(bytes(model))
    _swap(version_dir / "model.onnx", bytes(model))
    _swap(version_dir / "manifest.json", json.dumps(manifest, indent=2).encode())


def _check_signed_pulls(daemon: DaemonProcess, out: Path, verify: list[str], token: str | None,
                        algorithm: str) -> None:
    auth = ["--token-file", str(token_file)] if (token_file := _token_file(daemon, token)) else []
    ok = pull_cli(daemon, out, *auth, *verify)
    assert ok.returncode == 0, ok.stderr
    assert f"{algorithm} signature verified" in ok.stdout
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.run(None, {"features": np.zeros((1, 30), np.float32)})[0].shape == (1, 5)
    local = {name: (out / name).read_bytes() for name in ("model.onnx", "manifest.json")}

    refused = _tampered_pull(daemon, out, [*auth, *verify], token, _flip_model_byte)
    assert refused.returncode == 1 and "does not match the manifest" in refused.stderr, refused.stderr
    refused = _tampered_pull(daemon, out, [*auth, *verify], token, _replace_model_and_manifest_sha)
    assert refused.returncode == 1 and f"bad {algorithm} signature" in refused.stderr, refused.stderr
    assert {name: (out / name).read_bytes() for name in local} == local  # the local copy stayed as it was


def _token_file(daemon: DaemonProcess, token: str | None) -> Path | None:
    if token is None:
        return None
    path = daemon.state_dir.parent / "pull-token"
    path.write_text(token)
    return path


def test_ed25519_signed_snapshots_verify_and_tampering_is_refused(fleet: Fleet, tmp_path: Path) -> None:
    verify = ["--verify-key", str(fleet.public_key), "--verify-alg", "ed25519"]
    _check_signed_pulls(fleet.signed, tmp_path / "policy", verify, fleet.token, "ed25519")
    # A key that is not the daemon's is refused too.
    other_private, other_public = tmp_path / "other.pem", tmp_path / "other.pub"
    generate_ed25519_keypair(other_private, other_public)
    wrong = pull_cli(fleet.signed, tmp_path / "other-policy", "--token-file", str(fleet.token_file),
                     "--verify-key", str(other_public), "--verify-alg", "ed25519")
    assert wrong.returncode == 1
    assert "bad ed25519 signature" in wrong.stderr
    assert not (tmp_path / "other-policy" / "model.onnx").exists()


def test_hmac_signed_snapshots_verify_and_tampering_is_refused(fleet: Fleet, tmp_path: Path) -> None:
    verify = ["--verify-key", str(fleet.hmac_key), "--verify-alg", "hmac-sha256"]
    _check_signed_pulls(fleet.hmac, tmp_path / "policy", verify, None, "hmac-sha256")
    other = tmp_path / "other.key"
    other.write_text(base64.b64encode(os.urandom(32)).decode())
    wrong = pull_cli(fleet.hmac, tmp_path / "other-policy", "--verify-key", str(other),
                     "--verify-alg", "hmac-sha256")
    assert wrong.returncode == 1
    assert "bad hmac-sha256 signature" in wrong.stderr
    unsigned_alg = pull_cli(fleet.hmac, tmp_path / "alg-policy", "--verify-key", str(fleet.public_key),
                            "--verify-alg", "ed25519")
    assert unsigned_alg.returncode == 1
    assert "signed with 'hmac-sha256'" in unsigned_alg.stderr


# ---------------------------------------------------------------- 11: TLS/SASL settings, secrets


def _self_signed_ca_and_client(tmp: Path) -> tuple[Path, Path, Path]:
    """A CA certificate and a client certificate signed by it, with the client key (PEM files)."""
    now = datetime.datetime.now(datetime.UTC)
    valid = (now - datetime.timedelta(minutes=1), now + datetime.timedelta(days=1))
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "streamdqn test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(valid[0]).not_valid_after(valid[1])
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = (x509.CertificateBuilder()
              .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "streamdqn")]))
              .issuer_name(ca_name).public_key(client_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(valid[0]).not_valid_after(valid[1])
              .sign(ca_key, hashes.SHA256()))
    paths = tmp / "ca.pem", tmp / "client.pem", tmp / "client.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(client.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(client_key.private_bytes(serialization.Encoding.PEM,
                                                  serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    return paths


def test_sasl_ssl_settings_reach_aiokafka(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ca, cert, key = _self_signed_ca_and_client(tmp_path)
    config = tmp_path / "streamdqn.toml"
    config.write_text(
        "[kafka]\n"
        'bootstrap_servers = "kafka1:9093"\n'
        'security_protocol = "SASL_SSL"\n'
        'sasl_mechanism = "SCRAM-SHA-512"\n'
        'sasl_plain_username = "svc-streamdqn"\n'
        f'ssl_cafile = "{ca}"\nssl_certfile = "{cert}"\nssl_keyfile = "{key}"\n')
    password = "pw-" + secrets.token_urlsafe(16)
    monkeypatch.setenv("STREAMDQN_KAFKA__SASL_PLAIN_PASSWORD", password)
    settings = load_settings(config)
    assert password not in repr(settings)
    assert password not in str(settings.model_dump())
    options = kafka_options(settings)
    assert password not in repr(options)
    kwargs = client_security(options)
    assert kwargs["security_protocol"] == "SASL_SSL"
    assert kwargs["sasl_mechanism"] == "SCRAM-SHA-512"
    assert kwargs["sasl_plain_username"] == "svc-streamdqn"
    assert kwargs["sasl_plain_password"] == password
    context = kwargs["ssl_context"]
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname
    subjects = [dict(x[0] for x in c["subject"]) for c in context.get_ca_certs()]
    assert {"commonName": "streamdqn test CA"} in subjects

    # TLS without SASL: a context, no SASL keys.
    monkeypatch.setenv("STREAMDQN_KAFKA__SECURITY_PROTOCOL", "SSL")
    tls_only = client_security(kafka_options(load_settings(config)))
    assert isinstance(tls_only["ssl_context"], ssl.SSLContext)
    assert "sasl_mechanism" not in tls_only


def test_no_secret_in_logs_or_metrics(fleet: Fleet) -> None:
    d = fleet.secrets
    retries = [e for e in d.log_events() if e["event"] == "broker unreachable"]
    assert len(retries) >= 2
    assert all(e["error"] for e in retries)
    # aiokafka's own lines are kept quiet, but its last error says why: the broker does not do SASL.
    assert any("UnsupportedSaslMechanism" in (e.get("cause") or "") for e in retries)
    private_pem_body = b"".join(fleet.private_key.read_bytes().splitlines()[1:-1]).decode()
    hmac_secret = fleet.hmac_key.read_text().strip()
    for daemon in (fleet.signed, fleet.hmac, fleet.secrets):
        status, metrics, _ = request(daemon, "/metrics", fleet.token)
        assert status == 200
        for text in (daemon.logs(), metrics.decode(), " ".join(map(str, daemon.log_events()))):
            for secret in (fleet.sasl_password, fleet.token, hmac_secret, private_pem_body):
                assert secret not in text


# ---------------------------------------------------------------- 10: data-poisoning guards


def _flipped_flood(episodes: int, seed: int, sandbox: str) -> list[dict[str, object]]:
    """Malicious detonations relabelled benign with severity 0, all from one sandbox (label flipping)."""
    flood = []
    for e in simulate(episodes, seed, malicious_fraction=1.0, sandboxes=1):
        flood.append({**e, "sandbox_id": sandbox, "episode_id": f"evil-{e['episode_id']}",
                      "is_malicious": False, "severity": 0.0})
    return flood


def _clean_metrics(model: Path, events: list[dict[str, object]]) -> tuple[float, float, float]:
    """(detection rate, mean return, false-positive rate) of a snapshot on clean episodes, in onnxruntime."""
    decoded = validate_records(events)
    assert not decoded.rejects
    metrics, _ = evaluate_policy(OnnxPolicy(model), split_episodes(decoded.events), RewardTable())
    assert metrics.detection_rate is not None
    assert metrics.false_positive_rate is not None
    return metrics.detection_rate, metrics.mean_return, metrics.false_positive_rate


# Absolute drifts allowed for the published policy on the same 200 fresh clean episodes, before and
# after the flood: it keeps learning from clean traffic meanwhile, so it may move a little either way.
DETECTION_TOLERANCE = 0.15
RETURN_TOLERANCE = 0.2


@pytest.mark.slow
def test_poisoning_guards_rate_cap_clipping_and_publish_gate(kafka_bootstrap: str, tmp_path: Path) -> None:
    topics = new_topics(kafka_bootstrap).create()
    clean = sim_events(150, seed=201, sandboxes=64)
    # Logged actions with a huge reward override: clipped to ±reward_clip before they reach replay.
    greedy = [{**e, "sandbox_id": f"sbx-greedy-{i}", "episode_id": f"greedy-{i}", "step": s,
               "action": "contain", "reward": 1e6, "final": s == 2}
              for i, e in enumerate(sim_events(8, seed=202)[:8]) for s in range(3)]
    produce(topics.bootstrap, topics.telemetry, encode_events(clean + greedy))
    port = free_port()
    # The cap: a sandbox may send `burst` events at once and `rate` per second after that. Clean sandboxes
    # stay below it (checked here), so only the flood is cut.
    burst, rate = 150.0, 20.0
    assert max(Counter(e["sandbox_id"] for e in clean).values()) < burst
    config = write_config(
        tmp_path / "poison.toml", topics, tmp_path / "state", port,
        learner={"mode": "thread", "hidden": [64, 64], "updates_per_transition": 4.0},
        replay={"capacity": 50_000, "min_size": 100},
        publish={"interval_seconds": 2.0, "min_updates": 100, "keep": 100, "gate": True,
                 "gate_holdout_fraction": 0.3, "gate_min_episodes": 10, "gate_episodes": 300,
                 "gate_return_tolerance": 0.1, "gate_max_false_positive_rate": 0.9,
                 "gate_max_missed_rate": 0.9},
        ingest={"rate_limit_events_per_second": rate, "rate_limit_burst": burst},
        episodes={"reward_clip": 10.0, "feature_clip": 10.0})
    daemon = DaemonProcess(config, tmp_path / "state", port, tmp_path / "daemon.log").start()
    try:
        daemon.wait_for(lambda: daemon.metric("streamdqn_events_consumed_total") == len(clean) + len(greedy),
                        90, "the clean events")
        assert daemon.rejected_total() == 0
        daemon.wait_for(lambda: daemon.metric("streamdqn_snapshot_version") >= 1, 90, "a first snapshot")
        # Let the learner finish its share of the clean data, then take the published policy as the baseline.
        daemon.wait_for(lambda: daemon.metric("streamdqn_learner_updates_total")
                        >= 0.9 * 4.0 * daemon.metric("streamdqn_transitions_total"), 90, "the learner")
        version = daemon.metric("streamdqn_snapshot_version")
        daemon.wait_for(lambda: daemon.metric("streamdqn_snapshot_version") > version
                        or daemon.metric("streamdqn_snapshot_rejected_total") > 0, 30, "a gate decision")
        snapshots = daemon.state_dir / "snapshots"
        before_version = int(os.readlink(snapshots / "latest"))
        holdout = sim_events(200, seed=203, sandboxes=16)
        detection_before, return_before, fp_before = _clean_metrics(
            snapshots / str(before_version) / "model.onnx", holdout)
        manifest = json.loads((snapshots / str(before_version) / "manifest.json").read_bytes())
        evaluation = manifest["evaluation"]
        assert evaluation["gate"].startswith("passed: ")
        assert evaluation["bounds"]["passed"]
        assert evaluation["held_out_episodes"] >= 10

        # The flood: one compromised sandbox, label-flipped, alongside fresh clean traffic.
        flood = _flipped_flood(120, seed=204, sandbox="sbx-evil")
        more_clean = [{**e, "episode_id": int(e["episode_id"]) + 50_000}  # type: ignore[call-overload]
                      for e in sim_events(40, seed=205, sandboxes=64)]
        assert max(Counter(e["sandbox_id"] for e in more_clean).values()) < burst
        flood_started = time.monotonic()
        produce(topics.bootstrap, topics.telemetry, encode_events(flood + more_clean))
        produced = len(clean) + len(greedy) + len(flood) + len(more_clean)
        daemon.wait_for(lambda: daemon.metric("streamdqn_events_consumed_total") + daemon.rejected_total()
                        >= produced, 90, "the flood")
        flood_seconds = time.monotonic() - flood_started
        m = daemon.metrics()
        limited = m['streamdqn_events_rejected_total{reason="rate_limited"}']
        # All that passed from the flood fits in the bucket: burst + rate x elapsed (+ the events
        # rejected for other reasons, e.g. steps that became out of order once others were dropped).
        allowed = burst + rate * (flood_seconds + 5)
        assert limited >= len(flood) - allowed, (limited, len(flood), flood_seconds)
        assert daemon.rejected_total() - limited < 0.05 * len(flood)
        clean_consumed = m["streamdqn_events_consumed_total"] - (len(flood) - daemon.rejected_total())
        assert clean_consumed == len(clean) + len(greedy) + len(more_clean)  # no clean event was rate-limited
        assert len(flood) > burst + rate * flood_seconds  # the flood really exceeded the cap

        # The learner catches up on what passed; the gate decides on each candidate.
        daemon.wait_for(lambda: daemon.metric("streamdqn_learner_updates_total")
                        >= 0.9 * 4.0 * daemon.metric("streamdqn_transitions_total"), 90, "learning the flood")

        # The gate decides on a candidate that has learned all of it (an idle learner exports nothing new,
        # so wait for the decision on the final weights).
        daemon.wait_for(lambda: daemon.metric("streamdqn_learner_updates_total")
                        >= 4.0 * daemon.metric("streamdqn_transitions_total") - 1, 90, "the learner's cap")

        def decided_on_final_weights() -> bool:
            updates = daemon.metric("streamdqn_learner_updates_total")
            return any(e["event"] in ("snapshot published", "snapshot rejected") and e["updates"] == updates
                       for e in daemon.log_events())

        daemon.wait_for(decided_on_final_weights, 30, "a gate decision on the final weights")
        after_version = int(os.readlink(snapshots / "latest"))
        detection_after, return_after, fp_after = _clean_metrics(
            snapshots / str(after_version) / "model.onnx", holdout)
        print(f"poisoning: flood {len(flood)} events, {limited:.0f} rate-limited in {flood_seconds:.1f}s; "
              f"detection {detection_before:.3f} -> {detection_after:.3f}, return {return_before:+.3f} -> "
              f"{return_after:+.3f}, false positives {fp_before:.3f} -> {fp_after:.3f} "
              f"(versions {before_version} -> {after_version}, "
              f"{daemon.metric('streamdqn_snapshot_rejected_total'):.0f} rejected)")
        assert detection_after >= detection_before - DETECTION_TOLERANCE, (detection_before, detection_after)
        assert return_after >= return_before - RETURN_TOLERANCE, (return_before, return_after)

        # Every gate refusal is counted and its candidate kept under state/rejected/ for inspection.
        refusals = [e for e in daemon.log_events() if e["event"] == "snapshot rejected"]
        assert daemon.metric("streamdqn_snapshot_rejected_total") == len(refusals)
        for e in refusals:
            candidate = Path(str(e["candidate"]))
            assert candidate.parent == daemon.state_dir / "rejected"
            assert (candidate / "model.onnx").is_file()
            assert json.loads((candidate / "manifest.json").read_bytes())["evaluation"]["gate"] == e["reason"]

        # Reward clipping: the +1e6 overrides reached replay as +reward_clip, nothing above it.
        daemon.wait_for(lambda: any(e["event"] == "checkpoint written" and e["events_consumed"] > len(clean)
                                    for e in daemon.log_events()), 30, "a checkpoint")
        loaded = CheckpointStore(daemon.state_dir / "checkpoints").load_latest()
        assert loaded is not None
        rewards = loaded.state["replay"]["rewards"]
        assert float(rewards.abs().max()) == pytest.approx(10.0)
        assert bool(torch.isfinite(rewards).all())

        # Feature clipping is baked into the model: absurd inputs act like inputs at the clip bound.
        session = ort.InferenceSession(str(snapshots / str(after_version) / "model.onnx"),
                                       providers=["CPUExecutionProvider"])
        q_huge = session.run(None, {"features": np.full((1, 30), 1e30, np.float32)})[0]
        q_big = session.run(None, {"features": np.full((1, 30), 1e12, np.float32)})[0]
        assert np.isfinite(q_huge).all()
        assert np.allclose(q_huge, q_big)
    finally:
        daemon.stop()
