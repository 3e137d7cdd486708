"""Prometheus metrics of the annotation service, through Ray's metrics (``ray.util.metrics``).

Every Ray node exports them at its metrics port (``ray start --metrics-export-port 8080``;
``serve.metrics_port`` when ``scbert serve`` starts Ray itself), with Ray's ``ray_`` prefix:

| scraped name | kind | labels |
| --- | --- | --- |
| ``ray_scbert_requests_total`` | counter | route, status, model_version |
| ``ray_scbert_request_latency_seconds`` | histogram | route, status, model_version |
| ``ray_scbert_cells_annotated_total`` | counter | model_version |
| ``ray_scbert_batch_cells`` | histogram (cells per merged model call) | model_version |
| ``ray_scbert_batch_requests`` | histogram (requests per merged model call) | model_version |
| ``ray_scbert_predicted_total`` | counter | cell_type, model_version |
| ``ray_scbert_unassigned_total`` | counter | model_version |
| ``ray_scbert_model_info`` | gauge (1) | model_name, model_version |

Unassigned rate = ``rate(ray_scbert_unassigned_total) / rate(ray_scbert_cells_annotated_total)``.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
CELL_BUCKETS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000]
REQUEST_BUCKETS = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64]
INFO_REFRESH_S = 5.0  # how often a replica sets its model-info gauge again


def keep_setting(gauge: Any, tags: dict[str, str], *, every: float, stop: threading.Event) -> None:
    """Set ``gauge`` to 1 for ``tags`` every ``every`` seconds until ``stop`` is set."""
    while not stop.wait(every):
        gauge.set(1, tags=tags)


class ServeMetrics:
    """The metrics one replica records (Ray sums them over replicas at export)."""

    def __init__(self, *, model_name: str, model_version: str) -> None:
        from ray.util import metrics

        self.version = model_version
        self.requests = metrics.Counter(
            "scbert_requests_total",
            description="HTTP requests answered by scBERT replicas.",
            tag_keys=("route", "status", "model_version"),
        )
        self.latency = metrics.Histogram(
            "scbert_request_latency_seconds",
            description="Time from a request reaching a replica to its response.",
            boundaries=LATENCY_BUCKETS,
            tag_keys=("route", "status", "model_version"),
        )
        self.cells = metrics.Counter(
            "scbert_cells_annotated_total",
            description="Cells annotated.",
            tag_keys=("model_version",),
        )
        self.batch_cells = metrics.Histogram(
            "scbert_batch_cells",
            description="Cells per merged model call (dynamic batching).",
            boundaries=CELL_BUCKETS,
            tag_keys=("model_version",),
        )
        self.batch_requests = metrics.Histogram(
            "scbert_batch_requests",
            description="Requests merged into one model call.",
            boundaries=REQUEST_BUCKETS,
            tag_keys=("model_version",),
        )
        self.predicted = metrics.Counter(
            "scbert_predicted_total",
            description="Cells predicted per cell type (Unassigned included).",
            tag_keys=("cell_type", "model_version"),
        )
        self.unassigned = metrics.Counter(
            "scbert_unassigned_total",
            description="Cells whose top probability was below the threshold.",
            tag_keys=("model_version",),
        )
        info = metrics.Gauge(
            "scbert_model_info",
            description="The model this replica serves (value 1).",
            tag_keys=("model_name", "model_version"),
        )
        tags = {"model_name": model_name, "model_version": model_version}
        info.set(1, tags=tags)
        # Ray's metrics agent drops a gauge value that has not been set again within about two
        # export intervals (Ray 2.60's OpenTelemetry recorder: ~15-20 s here), and a replica
        # does not re-export an unchanged value: set it again while the replica lives, so the
        # series stays while it serves and ages out when it dies (a daemon thread: it ends with
        # the replica's process; nothing stops it sooner)
        threading.Thread(
            target=keep_setting,
            args=(info, tags),
            kwargs={"every": INFO_REFRESH_S, "stop": threading.Event()},
            name="scbert-model-info",
            daemon=True,
        ).start()

    def request(self, route: str, status: int, seconds: float) -> None:
        tags = {"route": route, "status": str(status), "model_version": self.version}
        self.requests.inc(1, tags=tags)
        self.latency.observe(seconds, tags=tags)

    def batch(self, n_requests: int, n_cells: int) -> None:
        tags = {"model_version": self.version}
        self.batch_requests.observe(n_requests, tags=tags)
        self.batch_cells.observe(n_cells, tags=tags)

    def predictions(self, cell_types: list[str], unassigned: int) -> None:
        tags: dict[str, Any] = {"model_version": self.version}
        self.cells.inc(len(cell_types), tags=tags)
        if unassigned:
            self.unassigned.inc(unassigned, tags=tags)
        for cell_type, n in Counter(cell_types).items():
            self.predicted.inc(n, tags={"cell_type": cell_type, "model_version": self.version})
