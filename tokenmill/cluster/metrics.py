"""The cluster endpoint's `/metrics`: every engine replica's Prometheus exposition, merged into one with a `replica`
label on each sample, so one scrape of the ingress sees the whole application. Ray-free."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

REPLICA_LABEL = "replica"


class _Merged(Collector):
    def __init__(self, texts: Mapping[str, str]) -> None:
        self.texts = texts

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for replica, text in sorted(self.texts.items()):
            for family in text_string_to_metric_families(text):
                merged = families.get(family.name)
                if merged is None:
                    merged = families[family.name] = Metric(family.name, family.documentation, family.type,
                                                            family.unit)
                for sample in family.samples:
                    merged.add_sample(sample.name, {**sample.labels, REPLICA_LABEL: replica}, sample.value,
                                      sample.timestamp, sample.exemplar)
        yield from families.values()


def merge_expositions(texts: Mapping[str, str]) -> bytes:
    """One exposition of the metric families of `texts` (replica id -> that replica's exposition), each sample
    labelled with the replica it came from; a family's help and type are taken from the first replica (by id)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged(texts))
    return generate_latest(registry)
