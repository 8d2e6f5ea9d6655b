"""Prometheus metrics of the serving batchers (through `prometheus_client`): queue length, running rows, generated
tokens, time to first token and inter-token latency, labelled by served model name."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServingMetrics:
    """One registry per app, so several apps (tests, benchmarks) in one process never share counts."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.queued = Gauge("healthgpt_queue_length", "Requests waiting to start", ["model"], registry=self.registry)
        self.running = Gauge("healthgpt_running_rows", "Requests being decoded", ["model"], registry=self.registry)
        self.tokens = Counter(
            "healthgpt_generated_tokens", "Tokens generated (text and image codes)", ["model"], registry=self.registry
        )
        self.ttft = Histogram(
            "healthgpt_time_to_first_token_seconds",
            "From arrival to the first generated token",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.itl = Histogram(
            "healthgpt_inter_token_latency_seconds",
            "Between consecutive tokens of one request",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )

    def watch(self, model: str) -> None:
        """Create the model's series now, so /metrics lists them (at zero) before its first request."""
        for metric in (self.queued, self.running, self.tokens, self.ttft, self.itl):
            metric.labels(model)

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format."""
        return generate_latest(self.registry)
