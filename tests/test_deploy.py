"""The Grafana dashboard and Prometheus rules load as they are and use only metrics we export."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from tests.conftest import running

pytestmark = pytest.mark.anyio

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
METRIC = re.compile(r"\b(orchestrator_[a-z_]+)")


def _exported_names(text: str) -> set[str]:
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


async def _live_metric_names() -> set[str]:
    async with running() as (orchestrator, client):
        result = await client.call_tool("infer", {"prompt": "one request so every series has a sample"})
        assert not result.is_error
        return _exported_names(orchestrator.pipeline.metrics.render().decode())


async def test_dashboard_queries_only_exported_metrics() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboard.json").read_text())
    assert dashboard["__inputs"][0]["pluginId"] == "prometheus"
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    assert len(dashboard["panels"]) >= 9
    used = {name for expr in exprs for name in METRIC.findall(expr)}
    exported = await _live_metric_names()
    assert used, "the dashboard should query orchestrator metrics"
    assert used <= exported, f"dashboard uses metrics nobody exports: {sorted(used - exported)}"


async def test_alert_rules_parse_and_use_exported_metrics() -> None:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    alerts = [rule for group in rules["groups"] for rule in group["rules"]]
    assert {a["alert"] for a in alerts} >= {
        "OrchestratorHighErrorRate",
        "OrchestratorHighLatency",
        "OrchestratorHighShedRate",
        "OrchestratorQueueDepthHigh",
        "OrchestratorDown",
    }
    for alert in alerts:
        assert alert["expr"].strip() and alert["annotations"]["summary"]
    used = {name for alert in alerts for name in METRIC.findall(alert["expr"])}
    exported = await _live_metric_names()
    assert used <= exported, f"alerts use metrics nobody exports: {sorted(used - exported)}"
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert scrape["scrape_configs"][0]["job_name"] == "mcp-orchestrator"
