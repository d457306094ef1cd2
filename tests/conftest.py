"""Test-session configuration: how `pytest -n N` hands tests to its workers, and Hypothesis profiles.

Some integration tests share one expensive fixture: the security tests' fleet of daemons (module
scope) and a daemon that has learned and published (`live_daemon`, session scope). Spread over the
workers one by one, as `--dist load` does, every worker would start that fixture for itself; so the
tests that share one go to one worker together, and every other test is handed out alone as before.
(`--dist loadgroup` and `xdist_group` marks would say the same per test, but pytest-xdist 3.8 no
longer groups on pytest 9.2: https://github.com/pytest-dev/pytest-xdist/issues/1386.)
"""

from __future__ import annotations

import pytest
from xdist.scheduler import LoadScopeScheduling

# Registers the `coverage` Hypothesis profile before the hypothesis plugin loads the one that
# --hypothesis-profile names.
import tests.property.examples  # noqa: F401

# Node-id prefix -> the shared fixture its tests use (tests/integration/conftest.py, test_security.py).
SHARED_FIXTURE_USERS = {
    "tests/integration/test_security.py::": "fleet",
    "tests/integration/test_deploy_live_metrics.py::": "live_daemon",
    "tests/integration/test_daemon_e2e.py::test_an_idle_stream_exports_nothing_new": "live_daemon",
}


class SharedFixtureScheduling(LoadScopeScheduling):
    """`--dist load`, except that the tests of one shared fixture are one unit of work."""

    def _split_scope(self, nodeid: str) -> str:
        for prefix, fixture in SHARED_FIXTURE_USERS.items():
            if nodeid.startswith(prefix):
                return fixture
        return nodeid


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> LoadScopeScheduling | None:
    if config.getvalue("dist") != "load":  # what -n chooses unless told otherwise
        return None
    return SharedFixtureScheduling(config, log)  # type: ignore[arg-type]
