"""DaemonMetrics on a fresh registry: every family read back with get_sample_value from a known snapshot."""

from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from streamdqn.serve.metrics import DaemonMetrics, MetricsSnapshot

BUILD = {"version": "1.2.3", "git": "abc1234", "python": "3.11.9"}


def known_snapshot() -> MetricsSnapshot:
    return MetricsSnapshot(
        events_consumed=1234,
        rejected={"decode_error": 3, "validation_error": 5, "too_large": 1},
        dead_lettered=9,
        transitions=777,
        updates=42,
        replay_size=500,
        replay_capacity=4096,
        ingest_paused=True,
        loss=0.25,
        consumer_lag={("telemetry", 0): 11, ("telemetry", 3): 0, ("verdicts", 1): 7},
        verdicts_rejected={"validation_error": 2},
        labelled={"verdict": 6},
        policy_episodes={("4", "true_positive"): 8, ("4", "false_positive"): 1, ("5", "missed"): 2},
        channels={"stable": 4, "canary": 5, "previous": 0},
        channel_changes={"demoted": 1},
        feature_drift={"api_calls": 0.05, "net_bytes": 0.31, "files_written": 0.12},
        build=BUILD,
    )


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry(auto_describe=True)


@pytest.fixture
def metrics(registry: CollectorRegistry) -> DaemonMetrics:
    return DaemonMetrics(known_snapshot, registry=registry)


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_the_injected_registry_is_the_one_used(registry: CollectorRegistry, metrics: DaemonMetrics) -> None:
    assert metrics.registry is registry
    # A second instance on its own fresh registry does not collide with the first (no global state).
    other = DaemonMetrics(MetricsSnapshot)
    assert other.registry is not registry
    assert value(other.registry, "streamdqn_events_consumed_total") == 0


def test_totals_and_gauges(registry: CollectorRegistry, metrics: DaemonMetrics) -> None:
    assert value(registry, "streamdqn_events_consumed_total") == 1234
    assert value(registry, "streamdqn_events_dead_lettered_total") == 9
    assert value(registry, "streamdqn_transitions_total") == 777
    assert value(registry, "streamdqn_learner_updates_total") == 42
    assert value(registry, "streamdqn_replay_size") == 500
    assert value(registry, "streamdqn_replay_capacity") == 4096
    assert value(registry, "streamdqn_ingest_paused") == 1.0
    assert value(registry, "streamdqn_broker_connected") == 0.0
    assert value(registry, "streamdqn_learner_loss") == 0.25
    td = value(registry, "streamdqn_learner_td_error_abs")
    assert td is not None and math.isnan(td)  # no update yet: NaN, not a misleading 0


def test_rejected_by_reason(registry: CollectorRegistry, metrics: DaemonMetrics) -> None:
    for reason, n in {"decode_error": 3, "validation_error": 5, "too_large": 1}.items():
        assert value(registry, "streamdqn_events_rejected_total", reason=reason) == n
    assert value(registry, "streamdqn_events_rejected_total", reason="unknown") is None


def test_verdict_reasons_are_reported_at_zero_before_any() -> None:
    registry = CollectorRegistry()
    DaemonMetrics(MetricsSnapshot, registry=registry)
    assert value(registry, "streamdqn_verdicts_rejected_total", reason="decode_error") == 0
    assert value(registry, "streamdqn_verdicts_rejected_total", reason="validation_error") == 0
    assert value(registry, "streamdqn_episodes_labelled_total", source="inline") == 0
    assert value(registry, "streamdqn_verdicts_revised_total", when="after_join") == 0


def test_verdicts_rejected_overrides_the_zero_defaults(
    registry: CollectorRegistry, metrics: DaemonMetrics
) -> None:
    assert value(registry, "streamdqn_verdicts_rejected_total", reason="validation_error") == 2
    assert value(registry, "streamdqn_verdicts_rejected_total", reason="decode_error") == 0
    assert value(registry, "streamdqn_episodes_labelled_total", source="verdict") == 6
    assert value(registry, "streamdqn_episodes_labelled_total", source="inline") == 0


def test_consumer_lag_per_topic_and_partition(registry: CollectorRegistry, metrics: DaemonMetrics) -> None:
    assert value(registry, "streamdqn_consumer_lag", topic="telemetry", partition="0") == 11
    assert value(registry, "streamdqn_consumer_lag", topic="telemetry", partition="3") == 0
    assert value(registry, "streamdqn_consumer_lag", topic="verdicts", partition="1") == 7
    assert value(registry, "streamdqn_consumer_lag", topic="verdicts", partition="0") is None


def test_policy_episodes_by_version_and_outcome(registry: CollectorRegistry, metrics: DaemonMetrics) -> None:
    name = "streamdqn_policy_episodes_total"
    assert value(registry, name, version="4", outcome="true_positive") == 8
    assert value(registry, name, version="4", outcome="false_positive") == 1
    assert value(registry, name, version="5", outcome="missed") == 2
    assert value(registry, name, version="5", outcome="true_positive") is None


def test_channels_and_their_changes(registry: CollectorRegistry, metrics: DaemonMetrics) -> None:
    assert value(registry, "streamdqn_channel_version", channel="stable") == 4
    assert value(registry, "streamdqn_channel_version", channel="canary") == 5
    assert value(registry, "streamdqn_channel_version", channel="previous") == 0
    assert value(registry, "streamdqn_channel_changes_total", action="demoted") == 1
    assert value(registry, "streamdqn_channel_changes_total", action="promoted") == 0  # the 0 default


def test_feature_drift_and_its_max(registry: CollectorRegistry, metrics: DaemonMetrics) -> None:
    assert value(registry, "streamdqn_feature_drift_psi", feature="net_bytes") == pytest.approx(0.31)
    assert value(registry, "streamdqn_feature_drift_psi", feature="api_calls") == pytest.approx(0.05)
    assert value(registry, "streamdqn_feature_drift_psi_max") == pytest.approx(0.31)
    empty = CollectorRegistry()
    DaemonMetrics(MetricsSnapshot, registry=empty)
    assert value(empty, "streamdqn_feature_drift_psi_max") == 0.0


def test_build_info_carries_its_labels(registry: CollectorRegistry, metrics: DaemonMetrics) -> None:
    assert value(registry, "streamdqn_build_info", **BUILD) == 1.0
    assert value(registry, "streamdqn_build_info", **{**BUILD, "git": "other"}) is None


def test_values_are_read_at_scrape_time(registry: CollectorRegistry) -> None:
    current = [MetricsSnapshot(events_consumed=1)]
    DaemonMetrics(lambda: current[0], registry=registry)
    assert value(registry, "streamdqn_events_consumed_total") == 1
    current[0] = MetricsSnapshot(events_consumed=5)
    assert value(registry, "streamdqn_events_consumed_total") == 5


def test_histograms_observe(registry: CollectorRegistry, metrics: DaemonMetrics) -> None:
    assert value(registry, "streamdqn_verdict_delay_seconds_count") == 0
    metrics.verdict_delay_seconds.observe(42.0)
    assert value(registry, "streamdqn_verdict_delay_seconds_count") == 1
    assert value(registry, "streamdqn_verdict_delay_seconds_sum") == 42.0
    assert value(registry, "streamdqn_verdict_delay_seconds_bucket", le="10.0") == 0
    assert value(registry, "streamdqn_verdict_delay_seconds_bucket", le="60.0") == 1
    metrics.episode_return.observe(-0.3)
    assert value(registry, "streamdqn_episode_return_bucket", le="-0.25") == 1
    assert value(registry, "streamdqn_episode_return_bucket", le="-0.5") == 0


def test_render_is_parseable_exposition_text(metrics: DaemonMetrics) -> None:
    metrics.checkpoint_seconds.observe(0.2)
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert families["streamdqn_events_consumed"].type == "counter"
    assert families["streamdqn_replay_size"].type == "gauge"
    assert families["streamdqn_checkpoint_seconds"].type == "histogram"
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in families.values() for s in f.samples}
    assert samples[("streamdqn_events_rejected_total", (("reason", "validation_error"),))] == 5
    assert samples[("streamdqn_consumer_lag", (("partition", "0"), ("topic", "telemetry")))] == 11
    assert samples[("streamdqn_checkpoint_seconds_count", ())] == 1
