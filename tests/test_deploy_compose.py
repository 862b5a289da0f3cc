"""deploy/docker-compose.yml documents a real deployment: it parses, its commands use real
flags and a configuration this version accepts, and Prometheus scrapes every worker process."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from mcp_orchestrator import supervisor
from mcp_orchestrator.cli import build_parser, resolve_config

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
CONTAINER_CONFIG = "/etc/mcp-orchestrator/orchestrator.toml"


def _compose() -> dict[str, Any]:
    compose: dict[str, Any] = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text(encoding="utf-8"))
    return compose


def _orchestrators(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: spec for name, spec in compose["services"].items() if name.startswith("orchestrator-")}


def test_compose_has_the_whole_deployment() -> None:
    compose = _compose()
    assert {"redis", "orchestrator-1", "orchestrator-2", "prometheus", "grafana"} <= set(compose["services"])
    for name, spec in compose["services"].items():
        for volume in spec.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (DEPLOY / source).is_file(), f"{name} mounts {source}, which is not in deploy/"
        for port in spec.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
    assert (DEPLOY / "Dockerfile").is_file()
    assert compose["secrets"]["orchestrator_token"]["file"] == "./orchestrator.token"


def test_orchestrator_commands_use_real_flags_and_an_accepted_config() -> None:
    compose = _compose()
    orchestrators = _orchestrators(compose)
    assert len(orchestrators) == 2
    for name, spec in orchestrators.items():
        command = [str(part) for part in spec["command"]]
        args = build_parser().parse_args(command)  # an unknown flag exits here
        assert args.config == CONTAINER_CONFIG
        assert CONTAINER_CONFIG in " ".join(spec["volumes"])
        args.config = str(DEPLOY / "orchestrator.toml")
        config = resolve_config(args)
        assert config.server.transport == "http" and config.server.stateless
        assert name in config.server.allowed_hosts
        assert config.distributed.redis_url is not None and "//redis:" in config.distributed.redis_url
        assert supervisor.refusal(args.workers, config) is None
        assert spec["stop_grace_period"] and config.server.shutdown_grace_s < _seconds(spec["stop_grace_period"])
        assert "/run/secrets/orchestrator_token" in " ".join(spec["entrypoint"])


def test_prometheus_scrapes_every_worker_of_every_container() -> None:
    compose = _compose()
    expected = set()
    for name, spec in _orchestrators(compose).items():
        args = build_parser().parse_args([str(part) for part in spec["command"]])
        expected |= {f"{name}:{args.metrics_port + index}" for index in range(args.workers)}
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "compose.yml").read_text(encoding="utf-8"))
    job = scrape["scrape_configs"][0]
    assert job["job_name"] == "mcp-orchestrator"
    assert {t for group in job["static_configs"] for t in group["targets"]} == expected
    assert job["authorization"]["credentials_file"] == "/run/secrets/orchestrator_token"
    assert scrape["rule_files"] == ["alerts.yml"]


def test_grafana_gets_the_dashboard_with_its_data_source() -> None:
    compose = _compose()
    dashboard = (DEPLOY / "grafana" / "dashboard.json").read_text(encoding="utf-8")
    assert "${DS_PROMETHEUS}" in dashboard  # what the one-shot step replaces
    datasources = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources.yml").read_text())
    uid = datasources["datasources"][0]["uid"]
    step = " ".join(compose["services"]["grafana-dashboards"]["command"])
    assert f"/{uid}/g" in step


def _seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+)s", duration)
    assert match is not None, duration
    return float(match.group(1))
