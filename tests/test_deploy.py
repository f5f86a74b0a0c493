"""deploy/: the Grafana dashboard, the Prometheus alerts (and the README) ask only for series the
bot exposes, and compose.yaml mounts files that exist."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bot.app import create_app
from bot.settings import load_settings
from bot.sim.server import LocalServer

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
DASHBOARD = json.loads((DEPLOY / "grafana" / "voicebot-dashboard.json").read_text())
ALERTS = (DEPLOY / "voicebot-alerts.yml").read_text()
SERIES = re.compile(r"\bvoicebot_\w+")
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}


def queries() -> list[str]:
    return [target["expr"] for panel in DASHBOARD["panels"] for target in panel.get("targets", [])]


@pytest.fixture
async def exposed(tmp_path: Path) -> AsyncIterator[set[str]]:
    """Every series name /metrics can carry, from its HELP/TYPE lines (even those still at zero)."""
    settings = load_settings({"DATABASE_PATH": str(tmp_path / "outbox.sqlite3")}, dotenv=None)
    async with LocalServer(create_app(settings)) as server, httpx.AsyncClient() as client:
        text = (await client.get(server.base_url + "/metrics")).text
    yield {
        family.name + suffix
        for family in text_string_to_metric_families(text)
        for suffix in SUFFIXES.get(family.type, ("",))
    }


async def test_every_series_the_dashboard_the_alerts_and_the_readme_name_is_exposed(
    exposed: set[str],
) -> None:
    readme = (REPO / "README.md").read_text()
    asked = {name for text in [*queries(), ALERTS, readme] for name in SERIES.findall(text)}
    # The README names families: a histogram by its own name, whose series add _bucket, _count, _sum.
    families = {name.removesuffix("_bucket") for name in exposed}
    assert asked and asked <= exposed | families, sorted(asked - exposed - families)


def test_the_dashboard_picks_its_prometheus_and_its_panels_fit_the_grid() -> None:
    panels = DASHBOARD["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels)
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
    [variable] = DASHBOARD["templating"]["list"]
    assert (variable["name"], variable["type"], variable["query"]) == (
        "datasource",
        "datasource",
        "prometheus",
    )


def test_outbox_gauges_are_never_summed_across_instances() -> None:
    """Every instance reports the one shared database: adding them up would multiply the backlog."""
    for query in queries():
        for name in (
            "voicebot_outbox_pending",
            "voicebot_outbox_failed",
            "voicebot_outbox_oldest_pending_age_seconds",
        ):
            if name in query:
                assert re.search(r"\b(max|min)\b", query), query


def test_compose_mounts_the_deploy_files_and_prometheus_loads_the_alerts() -> None:
    compose = (REPO / "compose.yaml").read_text()
    mounted = re.findall(r"- \./(deploy/[\w./-]+):", compose)
    assert mounted and all((REPO / path).exists() for path in mounted), mounted
    assert "/etc/prometheus/voicebot-alerts.yml" in (DEPLOY / "prometheus.yml").read_text()
    assert "location = /metrics" in compose, "the proxy keeps /metrics from the outside"
