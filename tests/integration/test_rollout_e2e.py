"""Canary rollout end to end: the daemon as a subprocess on the real broker publishes a canary, and the
outcomes that sandboxes log with its policy_version demote it (a canary that responds to everything)
or promote it (a good one). Stable is untouched by a demotion.

Publishing happens only on stop here (a long publish interval), so each restart publishes exactly one
new version and the test knows which version the evidence is for.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from tests.integration.conftest import FAST, DaemonProcess, Topics, encode_events, produce, sim_events

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def channels(daemon: DaemonProcess) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(daemon.get("/snapshots/channels"))
    return result


def restart_publishing(daemon: DaemonProcess) -> None:
    """Stop (the final publish), start again."""
    daemon.stop()
    daemon.start()


def logged_by(version: int, events: list[dict[str, Any]], *, respond_to_benign: bool) -> list[dict[str, Any]]:
    """Events as sandboxes acting with `version` log them: the first step's decision of each episode."""
    out = []
    seen: set[Any] = set()
    for e in events:
        e = {**e, "policy_version": str(version), "episode_id": int(e["episode_id"]) + 100_000 * version}
        key = (e["sandbox_id"], e["episode_id"])
        if key not in seen:
            seen.add(key)
            if e["is_malicious"]:
                e.update(action="contain", action_prob=0.95)
            elif respond_to_benign:
                e.update(action="terminate", action_prob=0.95)
        out.append(e)
    return out


def test_a_bad_canary_is_demoted_and_a_good_one_promoted(topics: Topics, make_daemon: Any) -> None:
    daemon = make_daemon(topics, publish={"interval_seconds": 3600.0, "min_updates": 10, "gate": False},
                         rollout={"canary_fraction": 0.5, "promote_after_episodes": 40,
                                  "check_interval_seconds": 0.5},
                         http={"admin_token": "admin-secret"}, **FAST).start()
    produce(topics.bootstrap, topics.telemetry, encode_events(sim_events(20, seed=81)))
    daemon.wait_for(lambda: daemon.metric("streamdqn_learner_updates_total") >= 10, 60, "learning")
    restart_publishing(daemon)  # v1: stable
    stable = channels(daemon)["stable"]
    assert stable is not None
    restart_publishing(daemon)  # v2: the canary
    canary = channels(daemon)["canary"]
    assert canary is not None
    assert canary != stable
    assert daemon.metric('streamdqn_channel_version{channel="canary"}') == canary

    # Sandboxes acting with the canary terminate benign samples: the false-positive bound breaches.
    produce(topics.bootstrap, topics.telemetry,
            encode_events(logged_by(canary, sim_events(30, seed=82), respond_to_benign=True)))
    breach = time.monotonic()
    daemon.wait_for(lambda: daemon.metric('streamdqn_channel_changes_total{action="demoted"}') == 1, 60,
                    "the demotion")
    took = time.monotonic() - breach
    now = channels(daemon)
    assert (now["stable"], now["canary"]) == (stable, None)
    demoted = [e for e in daemon.log_events() if e["event"] == "channel demoted"]
    assert demoted[-1]["version"] == canary
    assert "false-positive rate" in str(demoted[-1]["reason"])
    outcomes = {k: v for k, v in daemon.metrics().items() if k.startswith("streamdqn_policy_episodes_total")}
    false_positives = f'streamdqn_policy_episodes_total{{outcome="false_positive",version="{canary}"}}'
    assert outcomes.get(false_positives, 0) > 0, outcomes
    print(f"rollout: demoted {took:.1f} s after the breaching episodes were produced")

    restart_publishing(daemon)  # v3: a new canary
    good = channels(daemon)["canary"]
    assert good is not None
    assert good not in (stable, canary)
    produce(topics.bootstrap, topics.telemetry,
            encode_events(logged_by(good, sim_events(60, seed=83), respond_to_benign=False)))
    daemon.wait_for(lambda: daemon.metric('streamdqn_channel_changes_total{action="promoted"}') == 1, 90,
                    "the promotion")
    now = channels(daemon)
    assert (now["stable"], now["canary"]) == (good, None)
    assert daemon.metric('streamdqn_channel_version{channel="stable"}') == good
    # What a sandbox pulls without an id is the promoted stable.
    manifest = json.loads(daemon.get("/snapshots/latest/manifest.json"))
    assert manifest["version"] == good
