"""Prometheus metrics, named after vLLM's (`vllm:X` is `tokenmill:X` here) so existing dashboards translate.

Engine-wide numbers (running/waiting requests, KV usage, token and preemption counters, prefix-cache counters) are
read from the engine's latest stats snapshot at scrape time; per-request latencies are observed by the engine
thread as outputs come out. Each app has its own registry, so several servers can live in one process.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tokenmill.scheduler.clients import ClientUsage
from tokenmill.server.async_engine import AsyncEngine

PREFIX = "tokenmill:"
_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0, 160.0, 640.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                480.0, 960.0, 1920.0)
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000)


class _EngineStatsCollector(Collector):
    def __init__(self, engine: AsyncEngine, model_name: str) -> None:
        self.engine = engine
        self.labels = [model_name]

    def collect(self) -> Iterator[Metric]:
        stats = self.engine.stats()
        gauges = [
            ("num_requests_running", "Requests in the running batch.", stats.num_running),
            ("num_requests_waiting", "Requests waiting to be scheduled (new or preempted).", stats.num_waiting),
            ("kv_cache_usage_perc", "Fraction of KV cache blocks in use (1 = full).", stats.kv_cache_usage),
        ]
        for name, doc, value in gauges:
            gauge = GaugeMetricFamily(PREFIX + name, doc, labels=["model_name"])
            gauge.add_metric(self.labels, value)
            yield gauge
        counters = [
            ("prompt_tokens", "Prompt tokens processed.", stats.prompt_tokens),
            ("generation_tokens", "Tokens generated.", stats.generation_tokens),
            ("num_preemptions", "Requests preempted (KV cache full).", stats.num_preemptions),
            ("num_pauses", "Running requests paused for shorter ones, their KV kept (sjf with pausing).",
             stats.num_pauses),
            ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", stats.prefix_cache.queries),
            ("prefix_cache_hits", "Prompt tokens whose KV came from the prefix cache.", stats.prefix_cache.hits),
        ]
        spec = stats.spec_decode
        if spec is not None:
            counters += [
                ("spec_decode_num_drafts", "Verify steps of a request that carried draft tokens.", spec.num_drafts),
                ("spec_decode_num_draft_tokens", "Draft tokens proposed and verified.", spec.num_draft_tokens),
                ("spec_decode_num_accepted_tokens", "Draft tokens accepted.", spec.num_accepted_tokens),
                ("spec_decode_num_held_steps", "Decode steps run without drafts because steps with them were "
                 "measured slower at that batch size.", spec.num_held_steps),
            ]
        structured = stats.structured
        if structured is not None:
            counters += [
                ("structured_output_requests", "Requests with a grammar (JSON schema, regex, choice, tools...).",
                 structured.num_requests),
                ("grammar_compilations", "Constraints compiled into grammars (cached after).", structured.num_compiled),
                ("grammar_cache_hits", "Grammar requests whose constraint was already compiled.",
                 structured.num_cache_hits),
            ]
        for name, doc, value in counters:
            counter = CounterMetricFamily(PREFIX + name, doc, labels=["model_name"])
            counter.add_metric(self.labels, value)
            yield counter
        if spec is not None:
            per_position = CounterMetricFamily(PREFIX + "spec_decode_num_accepted_tokens_per_pos",
                                               "Accepted draft tokens by position in the draft.",
                                               labels=["model_name", "position"])
            for position, value in enumerate(spec.accepted_per_position):
                per_position.add_metric([*self.labels, str(position)], value)
            yield per_position
        yield from self._clients(stats.clients)

    def _clients(self, clients: dict[str, ClientUsage]) -> Iterator[Metric]:
        """Service per client (the `user` field or the API key's tenant); the engine keeps the most recently served
        clients only, which bounds the label set."""
        labels = ["model_name", "client"]
        prompt = CounterMetricFamily(PREFIX + "client_prompt_tokens", "Prompt tokens computed for the client (not "
                                     "prefix-cache hits or recompute).", labels=labels)
        generation = CounterMetricFamily(PREFIX + "client_generation_tokens", "Tokens generated for the client.",
                                         labels=labels)
        counter = GaugeMetricFamily(PREFIX + "client_virtual_token_counter", "The fair policy's virtual token "
                                    "counter of the client (VTC: its weighted service, lifted when it rejoins).",
                                    labels=labels)
        for client, usage in clients.items():
            prompt.add_metric([*self.labels, client], usage.prompt_tokens)
            generation.add_metric([*self.labels, client], usage.generation_tokens)
            if usage.counter is not None:
                counter.add_metric([*self.labels, client], usage.counter)
        yield from (prompt, generation, counter)


class ServerMetrics:
    """The registry behind `/metrics`; also an EngineObserver that records per-request latencies."""

    def __init__(self, engine: AsyncEngine, model_name: str) -> None:
        self.registry = CollectorRegistry()
        labels = ["model_name"]

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(PREFIX + name, doc, labels, buckets=buckets, registry=self.registry)

        self.ttft = histogram("time_to_first_token_seconds", "Time to first token.", _LATENCY_BUCKETS
                              ).labels(model_name)
        self.itl = histogram("inter_token_latency_seconds", "Time between consecutive output tokens.",
                             _LATENCY_BUCKETS).labels(model_name)
        self.e2e = histogram("e2e_request_latency_seconds", "Request latency from arrival to finish.", _E2E_BUCKETS
                             ).labels(model_name)
        self.prompt_tokens = histogram("request_prompt_tokens", "Prompt tokens per request.", _TOKEN_BUCKETS
                                       ).labels(model_name)
        self.generation_tokens = histogram("request_generation_tokens", "Generated tokens per request.",
                                           _TOKEN_BUCKETS).labels(model_name)
        self._success = Counter(PREFIX + "request_success", "Finished requests by finish reason.",
                                ["model_name", "finished_reason"], registry=self.registry)
        self._model_name = model_name
        self.registry.register(_EngineStatsCollector(engine, model_name))
        engine.add_observer(self)

    # ---- EngineObserver (called on the engine thread; prometheus_client is thread-safe) ---------------------------

    def on_first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def on_next_token(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def on_finished(self, reason: str, seconds: float, num_prompt_tokens: int, num_generation_tokens: int) -> None:
        self.e2e.observe(seconds)
        self.prompt_tokens.observe(num_prompt_tokens)
        self.generation_tokens.observe(num_generation_tokens)
        self._success.labels(self._model_name, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
