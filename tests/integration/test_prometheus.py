"""A real Prometheus server scrapes a running daemon; values are read back through its HTTP query API."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from streamdqn.kafka.broker import free_port, wait_for_port
from tests.integration.conftest import FAST, encode_events, produce, sim_events

pytestmark = pytest.mark.integration


def _query(port: int, expr: str) -> list[dict[str, object]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as response:
        body = json.loads(response.read())
    assert body["status"] == "success", body
    return body["data"]["result"]  # type: ignore[no-any-return]


def _value(port: int, expr: str) -> float | None:
    try:
        result = _query(port, expr)
    except urllib.error.HTTPError as exc:
        if exc.code == 503:  # Prometheus answers 503 until its TSDB has started
            return None
        raise
    return float(result[0]["value"][1]) if result else None  # type: ignore[index]


def test_prometheus_scrapes_ingest_rate_and_snapshot_version(topics, make_daemon, tmp_path: Path) -> None:
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        if os.environ.get("CI"):
            pytest.fail("prometheus is missing: apt-get install prometheus")
        pytest.skip("prometheus is not installed (apt-get install prometheus)")
    # The learner thread (FAST): where the learner runs is not what this test is about, and the
    # process learner's second torch import and its stop cost seconds.
    daemon = make_daemon(topics, **FAST).start()
    events = sim_events(60, seed=21)
    messages = encode_events(events)
    # A steady trickle, so that the ingest rate Prometheus computes is above zero.
    trickle = threading.Thread(
        target=lambda: [produce(topics.bootstrap, topics.telemetry, messages[i : i + 40]) or time.sleep(0.5)
                        for i in range(0, len(messages), 40)],
        daemon=True,
    )
    trickle.start()

    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"scrape_configs:\n  - job_name: streamdqn\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{daemon.port}']\n"
    )
    with (tmp_path / "prometheus.log").open("wb") as log:
        server = subprocess.Popen(
            [prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL, stderr=log,
        )
    try:
        assert wait_for_port("127.0.0.1", port, 30), (tmp_path / "prometheus.log").read_text()[-2000:]
        deadline = time.monotonic() + 90
        rate = version = None
        while time.monotonic() < deadline:
            rate = _value(port, "rate(streamdqn_events_consumed_total[10s])")
            version = _value(port, "streamdqn_snapshot_version")
            if rate and rate > 0 and version and version >= 1:
                break
            time.sleep(1)
        assert rate is not None and rate > 0, f"ingest rate through Prometheus: {rate}"
        assert version is not None and version >= 1, f"snapshot version through Prometheus: {version}"
        assert _value(port, 'up{job="streamdqn"}') == 1.0
    finally:
        server.terminate()
        server.wait(timeout=20)
        trickle.join(timeout=60)
