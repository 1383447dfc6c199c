"""Prometheus metrics of one server (text format at GET /metrics, via `prometheus-client`).

Each app gets its own `CollectorRegistry`, so several servers in one process (tests, the
benchmark) never share counters. Routes are labelled by their template, and every path that is
no route by "other", so a scanner cannot blow up the label set.
"""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Seconds; CPU replies take from tens of milliseconds to minutes.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class ServerMetrics:
    """The server's counters, histogram and gauges.

    requests: by route and status; latency: seconds per request by route; prompt_tokens /
    completion_tokens / images: work done; queue_depth / batch_rows: read from the engine when
    scraped.
    """

    def __init__(self, queue_depth=lambda: 0, batch_rows=lambda: 0):
        self.registry = CollectorRegistry()
        self.requests = Counter("polymodal_requests", "HTTP requests answered, by route and status",
                                ["route", "status"], registry=self.registry)
        self.latency = Histogram("polymodal_request_seconds", "Seconds from request to the end of its response",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.prompt_tokens = Counter("polymodal_prompt_tokens", "Prompt tokens read", registry=self.registry)
        self.completion_tokens = Counter("polymodal_completion_tokens", "Tokens generated",
                                         registry=self.registry)
        self.images = Counter("polymodal_images_generated", "Images generated", registry=self.registry)
        self.rejected = Counter("polymodal_rejected", "Requests refused because the queue was full",
                                registry=self.registry)
        Gauge("polymodal_queue_depth", "Requests waiting for the model", registry=self.registry).set_function(
            queue_depth)
        Gauge("polymodal_batch_rows", "Sequences being decoded together right now",
              registry=self.registry).set_function(batch_rows)

    def observe(self, route: str, status: int, seconds: float) -> None:
        """Count one answered request."""
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        """(the text exposition, its content type)."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
