"""Read the metric names that the deployment files query and that a daemon exposes.

Used by tests/integration/test_deploy_tools.py and test_deploy_live_metrics.py. Stdlib plus PyYAML.

`promql_metric_names` is a small scanner, not a PromQL parser: it covers selectors, functions,
aggregations with by/without, vector matching with on/ignoring/group_left/group_right, binary
operators, numbers and durations, and Grafana's $variables. The real parser (promtool) checks syntax.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

# Word lists (SIM905 off) read better than a hundred quoted names.
PROMQL_FUNCTIONS = frozenset(
    """
    abs absent absent_over_time acos acosh asin asinh atan atanh avg_over_time ceil changes clamp clamp_max
    clamp_min cos cosh count_over_time day_of_month day_of_week day_of_year days_in_month deg delta deriv
    exp floor histogram_avg histogram_count histogram_fraction histogram_quantile histogram_stddev
    histogram_stdvar histogram_sum holt_winters double_exponential_smoothing hour idelta increase irate
    label_join label_replace last_over_time ln log10 log2 mad_over_time max_over_time min_over_time minute
    month pi predict_linear present_over_time quantile_over_time rad rate resets round scalar sgn sin sinh
    sort sort_desc sort_by_label sort_by_label_desc sqrt stddev_over_time stdvar_over_time sum_over_time
    tan tanh time timestamp vector year start end
    """.split()  # noqa: SIM905
)
PROMQL_AGGREGATIONS = frozenset(
    """
    sum min max avg group stddev stdvar count count_values bottomk topk quantile limitk limit_ratio
    """.split()  # noqa: SIM905
)
PROMQL_KEYWORDS = frozenset(
    """
    by without on ignoring group_left group_right bool offset and or unless atan2 inf nan
    """.split()  # noqa: SIM905
)

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_BRACES = re.compile(r"\{[^{}]*\}")
_BRACKETS = re.compile(r"\[[^\[\]]*\]")
# Label lists of grouping and vector matching: `by (le)`, `on (instance) group_left (version)`.
_LABEL_LIST = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
# Numbers and durations (1e3, 0x1f, 5m, 1h30m) first, so their letters are not read as names.
_TOKEN = re.compile(r"(?P<number>\d[\w.]*)|(?P<variable>\$\w+)|(?P<name>[A-Za-z_:][\w:]*)")


def promql_metric_names(expr: str) -> set[str]:
    """Metric names referenced in a PromQL expression (Grafana $variables allowed)."""
    text = _STRING.sub('""', expr)
    text = _BRACES.sub("{}", text)
    text = _BRACKETS.sub("[]", text)
    text = _LABEL_LIST.sub(r"\1", text)
    names: set[str] = set()
    for match in _TOKEN.finditer(text):
        name = match.group("name")
        if name is None:
            continue
        if name.lower() in PROMQL_KEYWORDS or name in PROMQL_AGGREGATIONS or name in PROMQL_FUNCTIONS:
            continue
        if text[match.end() :].lstrip().startswith("("):
            continue  # a function this list does not know yet: still not a metric
        names.add(name)
    return names


def _panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for panel in panels:
        found.append(panel)
        found.extend(_panels(panel.get("panels", [])))  # collapsed rows nest their panels
    return found


def dashboard_panels(path: str | Path) -> list[dict[str, Any]]:
    """Every panel of a Grafana dashboard JSON file, rows included, nested ones flattened."""
    dashboard = json.loads(Path(path).read_text())
    return _panels(dashboard.get("panels", []))


def dashboard_queries(path: str | Path) -> list[str]:
    """The PromQL `expr` of every panel target in a Grafana dashboard JSON file."""
    return [
        target["expr"]
        for panel in dashboard_panels(path)
        for target in panel.get("targets", [])
        if "expr" in target
    ]


def alert_queries(path: str | Path) -> list[str]:
    """The `expr` of every alerting and recording rule in a Prometheus rules file."""
    rules = yaml.safe_load(Path(path).read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def exposed_metric_names(exposition_text: str) -> set[str]:
    """Sample names in a Prometheus text exposition, as they appear (`x_total`, `x_bucket`, `x_created`)."""
    names: set[str] = set()
    for line in exposition_text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        names.add(re.split(r"[{\s]", line, maxsplit=1)[0])
    return names


_TYPE_SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "summary": ("", "_sum", "_count"),
}


def declared_metric_names(exposition_text: str) -> set[str]:
    """Sample names that the `# TYPE` lines promise, including families that have no samples yet.

    A labelled metric (`streamdqn_events_rejected_total{reason}`) shows no sample until its first
    label value is used, but its family is declared from the start.
    """
    names: set[str] = set()
    for line in exposition_text.splitlines():
        parts = line.split()
        if len(parts) != 4 or parts[:2] != ["#", "TYPE"]:
            continue
        family, kind = parts[2], parts[3]
        if kind == "counter":
            family = family.removesuffix("_total")  # the 0.0.4 text format names counters with _total
        names.update(family + suffix for suffix in _TYPE_SUFFIXES.get(kind, ("",)))
    return names
