"""Every metric the alerts and the dashboard query is one a running daemon really exports.

`daemon_metrics_text` (tests/integration/conftest.py) is the /metrics body of a daemon that has
ingested events and published a snapshot. Histograms are queried as `_bucket`/`_sum`/`_count`,
counters as `_total`, exactly as they appear in the exposition.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"

_spec = importlib.util.spec_from_file_location("deploy_check", DEPLOY / "check.py")
assert _spec is not None
assert _spec.loader is not None
check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check)

# Series that Prometheus writes itself for every target.
SCRAPE_METRICS = frozenset({"up"})
# Labelled families with no sample until a label value is first used: no event rejected yet, or
# partitions not yet assigned. They must still be declared by a `# TYPE` line.
SAMPLED_ON_DEMAND = frozenset({"streamdqn_events_rejected_total", "streamdqn_consumer_lag"})


def queried_metrics() -> dict[str, set[str]]:
    """Metric name -> the deploy files whose queries name it."""
    sources = {
        "alerts.yml": check.alert_queries(DEPLOY / "alerts.yml"),
        "grafana/dashboards/streamdqn.json": check.dashboard_queries(
            DEPLOY / "grafana" / "dashboards" / "streamdqn.json"
        ),
    }
    found: dict[str, set[str]] = {}
    for source, queries in sources.items():
        for query in queries:
            for name in check.promql_metric_names(query):
                found.setdefault(name, set()).add(source)
    return found


def test_queries_name_only_metrics_the_daemon_exports(daemon_metrics_text: str) -> None:
    exported = check.exposed_metric_names(daemon_metrics_text) | check.declared_metric_names(
        daemon_metrics_text
    )
    missing = {
        name: sorted(sources)
        for name, sources in queried_metrics().items()
        if name not in exported | SCRAPE_METRICS
    }
    assert missing == {}, "queried but not exported by the daemon"


def test_queried_metrics_have_samples(daemon_metrics_text: str) -> None:
    # Declared but never set would leave a panel empty or an alert unable to fire.
    sampled = check.exposed_metric_names(daemon_metrics_text)
    silent = {
        name: sorted(sources)
        for name, sources in queried_metrics().items()
        if name not in sampled | SCRAPE_METRICS | SAMPLED_ON_DEMAND
    }
    assert silent == {}, "queried and declared, but no sample after ingest and a published snapshot"
