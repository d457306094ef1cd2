"""The deployment files, each checked with the tool that consumes it.

systemd-analyze (verify, security), promtool (check config, check rules, test rules), and
`docker compose config` where a Docker daemon answers; without one, the compose file is checked
structurally against the other files it mounts. Install the tools with
`apt-get install -y systemd prometheus`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
UNIT = ROOT / "systemd" / "streamdqn.service"
RANK_UNIT = ROOT / "systemd" / "streamdqn@.service"
ENV_EXAMPLE = ROOT / "systemd" / "streamdqn.env.example"
COMPOSE = DEPLOY / "docker-compose.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "streamdqn.json"
DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = DEPLOY / "grafana" / "provisioning" / "dashboards" / "streamdqn.yml"

# `systemd-analyze security` exposure (0 = locked down, 10 = unprotected). The unit measures 1.2 on
# systemd 252. What is left is deliberate: network access (Kafka, HTTP), @resources syscalls (torch's
# OpenMP), writable+executable memory (libffi, torch JIT), full /proc (torch and onnxruntime read
# /proc/cpuinfo), the host root directory, and the char-rtc read access that ProtectClock= itself adds.
MAX_EXPOSURE = 1.2

_spec = importlib.util.spec_from_file_location("deploy_check", DEPLOY / "check.py")
assert _spec is not None
assert _spec.loader is not None
check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check)

# The metric families the daemon documents, as their series are named in queries.
_COUNTERS = [
    "events_consumed",
    "events_rejected",
    "events_dead_lettered",
    "transitions",
    "learner_updates",
    "snapshot_rejected",
    "snapshot_failures",
    "checkpoint_failures",
    "episodes",
    "verdicts_consumed",
    "verdicts_rejected",
    "episodes_labelled",
    "episodes_unlabelled_expired",
    "verdicts_orphaned",
    "verdicts_revised",
    "label_disagreements",
    "rows_relabelled",
    "policy_episodes",
    "channel_changes",
]
_GAUGES = [
    "replay_size",
    "replay_capacity",
    "learner_samples_per_insert",
    "learner_target_samples_per_insert",
    "ingest_paused",
    "pending_episodes",
    "waiting_verdicts",
    "learner_loss",
    "learner_td_error_abs",
    "learner_q_max_mean",
    "consumer_lag",
    "snapshot_version",
    "snapshot_published_timestamp_seconds",
    "event_loop_lag_seconds",
    "broker_connected",
    "partitions_assigned",
    "build_info",
    "channel_version",
    "stable_pinned_version",
    "feature_drift_psi",
    "feature_drift_psi_max",
    "policy_action_share",
]
_HISTOGRAMS = ["episode_return", "ingest_batch_seconds", "snapshot_export_seconds", "checkpoint_seconds",
               "verdict_delay_seconds"]
DOCUMENTED_METRICS = frozenset(
    [f"streamdqn_{name}_total" for name in _COUNTERS]
    + [f"streamdqn_{name}" for name in _GAUGES]
    + [f"streamdqn_{name}{suffix}" for name in _HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")]
)
# Series that Prometheus writes itself for every target.
SCRAPE_METRICS = frozenset({"up"})


def require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        message = f"{tool} not found; install it with: apt-get install -y systemd prometheus"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def run(*args: str | Path, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=120)


def unit_settings(text: str, section: str = "Service") -> list[tuple[str, str]]:
    """(key, value) pairs of one section, in order; systemd allows a key more than once."""
    settings, current = [], None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = line.strip("[]")
        elif current == section:
            key, _, value = line.partition("=")
            settings.append((key.strip(), value.strip()))
    return settings


def daemon_config() -> dict[str, Any]:
    return tomllib.loads((DEPLOY / "streamdqn.toml").read_text())


# --- systemd ------------------------------------------------------------------------------------------


def verify_problems(unit_path: Path) -> list[str]:
    """What `systemd-analyze verify` says about the unit.

    verify exits 0 on unknown keys and unparsable values (it only logs "ignoring"), so any line it
    prints about the unit counts as a problem.
    """
    result = run(require("systemd-analyze"), "verify", unit_path)
    problems = [line for line in (result.stdout + result.stderr).splitlines() if unit_path.name in line]
    if result.returncode != 0 and not problems:
        problems.append(f"exit {result.returncode}: {result.stderr.strip()}")
    return problems


def unit_copy_with_existing_exec(tmp_path: Path, text: str) -> Path:
    # verify also fails when ExecStart's binary is missing, and /opt/streamdqn/venv exists only on a
    # deployed host. Point ExecStart at this interpreter so the check covers everything else.
    production = "/opt/streamdqn/venv/bin/streamdqn"
    assert production in text
    copy = tmp_path / UNIT.name
    copy.write_text(text.replace(production, sys.executable))
    return copy


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    copy = unit_copy_with_existing_exec(tmp_path, UNIT.read_text())
    assert verify_problems(copy) == []


def test_rank_template_passes_verify_as_an_instance(tmp_path: Path) -> None:
    copy = unit_copy_with_existing_exec(tmp_path, RANK_UNIT.read_text())
    instance = copy.rename(tmp_path / "streamdqn@1.service")
    assert verify_problems(instance) == []


def test_rank_template_is_the_unit_plus_only_what_a_rank_needs() -> None:
    """The template keeps every setting of streamdqn.service (hardening cannot drift between them) and
    adds or changes only the rank's own lines."""
    unit, rank = unit_settings(UNIT.read_text()), unit_settings(RANK_UNIT.read_text())
    changed = {"CacheDirectory", "Environment"}
    assert [kv for kv in unit if kv[0] not in changed] == [kv for kv in rank if kv[0] not in changed
                                                          and kv not in RANK_ONLY]
    for kv in RANK_ONLY:
        assert kv in rank, kv


RANK_ONLY = [("EnvironmentFile", "/etc/streamdqn/rank-%i.env"), ("User", "streamdqn"),
             ("Environment", "STREAMDQN_DISTRIBUTED__RANK=%i")]


def test_verify_check_catches_misspelled_key_and_bad_value(tmp_path: Path) -> None:
    text = UNIT.read_text()
    assert "\nPrivateTmp=yes\n" in text
    assert "\nProtectHome=yes\n" in text
    broken = text.replace("\nPrivateTmp=yes\n", "\nPrivateTmpp=yes\n").replace(
        "\nProtectHome=yes\n", "\nProtectHome=yess\n"
    )
    problems = verify_problems(unit_copy_with_existing_exec(tmp_path, broken))
    assert any("PrivateTmpp" in line for line in problems), problems
    assert any("yess" in line for line in problems), problems


@pytest.mark.parametrize("unit", [UNIT, RANK_UNIT], ids=["streamdqn.service", "streamdqn@.service"])
def test_unit_security_exposure(unit: Path, capsys: pytest.CaptureFixture[str]) -> None:
    threshold = round(MAX_EXPOSURE * 10)  # --threshold counts tenths of the printed level
    result = run(
        require("systemd-analyze"),
        "security",
        "--offline=true",
        f"--threshold={threshold}",
        "--no-pager",
        unit,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    exposure = float(match.group(1))
    with capsys.disabled():
        print(f"\nsystemd-analyze security: {unit.name} exposure {exposure} (bound {MAX_EXPOSURE})")
    assert exposure <= MAX_EXPOSURE, result.stdout
    assert result.returncode == 0, result.stdout + result.stderr


def test_unit_settings() -> None:
    settings = unit_settings(UNIT.read_text())
    values: dict[str, list[str]] = {}
    for key, value in settings:
        values.setdefault(key, []).append(value)

    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "WatchdogSec": "30",
        "Restart": "on-failure",
        "StateDirectory": "streamdqn",
        "DynamicUser": "yes",
        "ProtectSystem": "strict",
        "NoNewPrivileges": "yes",
        "CapabilityBoundingSet": "",
        "SystemCallArchitectures": "native",
        "ExecStart": "/opt/streamdqn/venv/bin/streamdqn run --config /etc/streamdqn/streamdqn.toml",
        "EnvironmentFile": "-/etc/streamdqn/streamdqn.env",
    }
    for key, value in expected.items():
        assert values.get(key) == [value], key
    assert "MemoryDenyWriteExecute" not in values, "breaks libffi callbacks and torch's JIT"
    assert "STREAMDQN_STATE__DIR=%S/streamdqn" in values["Environment"]
    assert daemon_config()["state"]["dir"] == "/var/lib/streamdqn"

    stop_timeout = daemon_config()["lifecycle"]["stop_timeout_seconds"]
    assert int(values["TimeoutStopSec"][0]) > stop_timeout


def test_env_example_names_real_config_keys() -> None:
    config = daemon_config()
    keys = re.findall(r"^#?(STREAMDQN_\w+)=", ENV_EXAMPLE.read_text(), flags=re.MULTILINE)
    assert "STREAMDQN_KAFKA__SASL_PLAIN_PASSWORD" in keys
    for key in keys:
        section, _, name = key.removeprefix("STREAMDQN_").lower().partition("__")
        assert name in config.get(section, {}), f"{key} is not a key of deploy/streamdqn.toml"


# --- Prometheus ---------------------------------------------------------------------------------------


def test_promtool_check_config() -> None:
    result = run(require("promtool"), "check", "config", DEPLOY / "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_rules() -> None:
    result = run(require("promtool"), "check", "rules", DEPLOY / "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_test_rules() -> None:
    result = run(require("promtool"), "test", "rules", DEPLOY / "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    rules = yaml.safe_load((DEPLOY / "alerts.yml").read_text())
    alerts = {rule["alert"] for group in rules["groups"] for rule in group["rules"] if "alert" in rule}
    cases = [
        case
        for test in yaml.safe_load((DEPLOY / "alerts_test.yml").read_text())["tests"]
        for case in test.get("alert_rule_test", [])
    ]
    fires = {case["alertname"] for case in cases if case.get("exp_alerts")}
    quiet = {case["alertname"] for case in cases if not case.get("exp_alerts")}
    assert alerts - fires == set(), "alerts never tested firing"
    assert alerts - quiet == set(), "alerts never tested staying quiet"


def test_alert_rules_have_severity_and_runbook_text() -> None:
    rules = yaml.safe_load((DEPLOY / "alerts.yml").read_text())
    for rule in (r for group in rules["groups"] for r in group["rules"]):
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        assert rule["annotations"]["summary"].strip(), rule["alert"]
        assert rule["annotations"]["description"].strip(), rule["alert"]


def test_prometheus_scrapes_the_compose_service() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    assert config["global"]["scrape_interval"] == "15s"
    assert config["rule_files"] == ["alerts.yml"]
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "streamdqn"]
    targets = [t for static in job["static_configs"] for t in static["targets"]]
    port = daemon_config()["http"]["port"]
    assert targets == [f"streamdqn:{port}"]


# --- PromQL in the alerts and the dashboard ----------------------------------------------------------

# Grafana replaces these before the query reaches Prometheus.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h", "$instance": ".*"}


def test_dashboard_queries_parse_with_promtool(tmp_path: Path) -> None:
    rules = []
    for i, query in enumerate(check.dashboard_queries(DASHBOARD)):
        for variable, value in sorted(GRAFANA_VARIABLES.items(), key=lambda kv: -len(kv[0])):
            query = query.replace(variable, value)
        assert "$" not in query, query
        rules.append({"record": f"dashboard:query_{i}", "expr": query})
    rules_file = tmp_path / "dashboard_queries.yml"
    rules_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run(require("promtool"), "check", "rules", rules_file)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    "source", ["alerts", "dashboard"], ids=["alerts.yml", "grafana/dashboards/streamdqn.json"]
)
def test_queries_name_only_documented_metrics(source: str) -> None:
    queries = (
        check.alert_queries(DEPLOY / "alerts.yml")
        if source == "alerts"
        else check.dashboard_queries(DASHBOARD)
    )
    assert queries
    for query in queries:
        names = check.promql_metric_names(query)
        assert names, f"no metric in {query!r}"
        assert names <= DOCUMENTED_METRICS | SCRAPE_METRICS, f"{query!r}: {names - DOCUMENTED_METRICS}"


def test_dashboard_panels() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    datasource_uid = yaml.safe_load(DATASOURCES.read_text())["datasources"][0]["uid"]
    panels = [p for p in check.dashboard_panels(DASHBOARD) if p["type"] != "row"]
    assert len({p["id"] for p in check.dashboard_panels(DASHBOARD)}) == len(check.dashboard_panels(DASHBOARD))
    for panel in panels:
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == datasource_uid, panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            assert target["datasource"]["uid"] == datasource_uid, panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
    titles = {p["title"] for p in panels}
    for wanted in [
        "Ingest rate",
        "Rejections by reason",
        "Consumer lag per partition",
        "Replay buffer fill",
        "Learner updates/s",
        "Loss",
        "TD error",
        "Max-Q",
        "Replay ratio: achieved vs target",
        "Episode return",
        "Verdicts consumed and rejected",
        "Episodes labelled by source",
        "Waiting for the join",
        "Never joined",
        "Verdict delay",
        "Snapshot version",
        "Snapshot age",
        "Snapshot export duration",
        "Checkpoint duration",
        "Event loop lag",
    ]:
        assert wanted in titles
    assert dashboard["uid"] == "streamdqn"


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (le) (rate(foo_bucket{job="x", le=~"1.*"}[5m]))', {"foo_bucket"}),
        (
            'histogram_quantile(0.9, sum by (le) (rate(h_bucket{instance=~"$instance"}[$__rate_interval])))',
            {"h_bucket"},
        ),
        ("a / on (instance) group_left (version) b", {"a", "b"}),
        ("x != x or x > 1e3", {"x"}),
        ("time() - published_seconds > 1800", {"published_seconds"}),
        ("increase(c_total[10m]) == 0 and g >= 10000", {"c_total", "g"}),
        ("sum without (partition) (deriv(lag[15m])) > 0", {"lag"}),
        ('up{job="s"} == 0 or absent(up{job="s"})', {"up"}),
        ('label_replace(m{job="a"}, "dst", "$1", "instance", "(.*):.*")', {"m"}),
        ("rate(x[5m] offset 1h) > bool 0", {"x"}),
        ("max_over_time(deriv(sum(y)[30m:1m])[1h:])", {"y"}),
        ('count_values("version", build_info) by (version)', {"build_info"}),
        ("job:requests:rate5m * 2", {"job:requests:rate5m"}),
        ("sum(z) / ignoring (reason) group_right sum by (reason) (w)", {"z", "w"}),
        ("1 - 2 * vector(0)", set()),
    ],
)
def test_promql_metric_names(expr: str, names: set[str]) -> None:
    assert check.promql_metric_names(expr) == names


def test_exposed_and_declared_metric_names_read_a_real_exposition() -> None:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

    registry = CollectorRegistry()
    Counter("demo_events_consumed", "consumed", registry=registry).inc()
    Counter("demo_events_rejected", "rejected", ["reason"], registry=registry)  # no label value used yet
    Gauge("demo_lag", "lag", ["partition"], registry=registry).labels("0").set(3)
    Histogram("demo_seconds", "duration", registry=registry).observe(0.2)
    text = generate_latest(registry).decode()

    exposed = check.exposed_metric_names(text)
    assert {"demo_events_consumed_total", "demo_lag", "demo_seconds_bucket", "demo_seconds_sum"} <= exposed
    assert {"demo_seconds_count", "demo_events_consumed_created"} <= exposed
    assert "demo_events_rejected_total" not in exposed
    assert "demo_events_rejected_total" in check.declared_metric_names(text)
    assert "demo_events_consumed" not in check.declared_metric_names(text)


# --- docker compose -----------------------------------------------------------------------------------


def docker_compose_available() -> bool:
    if shutil.which("docker") is None:
        return False
    version = run("docker", "compose", "version")
    return version.returncode == 0 and run("docker", "info").returncode == 0


def env_dict(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {key: str(value) for key, value in env.items()}


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> source, for short and long volume syntax."""
    found = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            found[volume["target"]] = volume["source"]
        else:
            source, target = volume.split(":")[:2]
            found[target] = source
    return found


def test_compose_file() -> None:
    if docker_compose_available():
        result = run("docker", "compose", "-f", COMPOSE, "config", "--quiet")
        assert result.returncode == 0, result.stdout + result.stderr
    # No Docker daemon here (or beside it): check what `config` cannot, the wiring to the other files.
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert {"kafka", "streamdqn", "prometheus", "grafana"} <= services.keys()
    config = daemon_config()

    kafka_env = env_dict(services["kafka"])
    assert set(kafka_env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert kafka_env["KAFKA_CONTROLLER_QUORUM_VOTERS"].startswith(f"{kafka_env['KAFKA_NODE_ID']}@")
    assert kafka_env["CLUSTER_ID"]

    (topic_init,) = [
        s for s in services.values() if s.get("restart") == "no" and "kafka" in s.get("depends_on", {})
    ]
    script = " ".join(topic_init["command"])
    for topic in (config["kafka"]["topic"], config["kafka"]["dlq_topic"], config["kafka"]["snapshot_topic"]):
        assert re.search(rf"--create --if-not-exists --topic {re.escape(topic)}\b", script), topic

    streamdqn = services["streamdqn"]
    dockerfile = (DEPLOY / streamdqn["build"]["context"] / streamdqn["build"]["dockerfile"]).resolve()
    assert dockerfile == DEPLOY / "Dockerfile"
    streamdqn_env = env_dict(streamdqn)
    assert streamdqn_env["STREAMDQN_HTTP__HOST"] == "0.0.0.0"
    assert streamdqn_env["STREAMDQN_KAFKA__BOOTSTRAP_SERVERS"] == "kafka:9092"
    state_dir = streamdqn_env.get("STREAMDQN_STATE__DIR", config["state"]["dir"])
    assert mounts(streamdqn)[state_dir] in compose["volumes"]
    assert any(port.endswith(f":{config['http']['port']}") for port in streamdqn["ports"])
    grace = streamdqn["stop_grace_period"]
    assert grace.endswith("s")
    assert int(grace[:-1]) > config["lifecycle"]["stop_timeout_seconds"]

    prometheus = mounts(services["prometheus"])
    config_target = next(t for t, s in prometheus.items() if s == "./prometheus.yml")
    alerts_target = next(t for t, s in prometheus.items() if s == "./alerts.yml")
    assert f"--config.file={config_target}" in services["prometheus"]["command"]
    # rule_files resolve relative to the config file's directory.
    assert alerts_target == str(Path(config_target).parent / "alerts.yml")
    assert mounts(services["prometheus"])["/prometheus"] in compose["volumes"]

    grafana = mounts(services["grafana"])
    assert grafana["/etc/grafana/provisioning"] == "./grafana/provisioning"
    provider_path = yaml.safe_load(DASHBOARD_PROVIDERS.read_text())["providers"][0]["options"]["path"]
    assert grafana[provider_path] == "./grafana/dashboards"

    assert {"kafka-data", "streamdqn-state", "prometheus-data"} <= compose["volumes"].keys()
    for name, service in services.items():
        for source in mounts(service).values():
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in compose["volumes"], f"{name} uses undeclared volume {source}"
