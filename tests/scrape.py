"""Reads /metrics the way Prometheus does (its own text parser), for tests that watch families move."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True)
class Scrape:
    """Every sample of one scrape: (sample name, sorted labels) -> value."""

    samples: Mapping[tuple[str, tuple[tuple[str, str], ...]], float]

    @classmethod
    def parse(cls, text: str) -> Scrape:
        samples = {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }
        return cls(samples)

    def value(self, name: str, **labels: str) -> float:
        """The sample with exactly these labels; 0 when absent (a counter never incremented)."""
        return self.samples.get((name, tuple(sorted(labels.items()))), 0.0)

    def by(self, name: str, label: str) -> dict[str, float]:
        """The samples of `name` added up by one label's value (those that add up to 0 left out)."""
        found: dict[str, float] = {}
        for (kind, labels), value in self.samples.items():
            if kind == name:
                key = dict(labels)[label]
                found[key] = found.get(key, 0.0) + value
        return {key: value for key, value in found.items() if value}

    def names(self) -> set[str]:
        return {name for name, _ in self.samples}

    def moved(self, before: Scrape, name: str, **labels: str) -> float:
        """How far one sample moved since `before`."""
        return self.value(name, **labels) - before.value(name, **labels)


async def scrape(base_url: str, token: str | None = None) -> Scrape:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(base_url + "/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=")
    return Scrape.parse(response.text)
