"""Prometheus series of the service (through Ray's metrics agent, next to Ray Serve's own).

Label cardinality is bounded: `adapter` takes at most MAX_ADAPTER_LABELS distinct names (the
first ones seen that exist in the registry; later ones report as `_other`, malformed or unknown
names as `_unknown`), `code` is a gRPC status name, `reason` one of a fixed list.
"""
from __future__ import annotations

import threading

from ray.serve.metrics import Counter, Gauge, Histogram

MAX_ADAPTER_LABELS = 100
LATENCY_BOUNDS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]


class ServiceMetrics:
    def __init__(self):
        self.requests = Counter("esm_requests_total", "Calls by adapter (Predict; _annotate, _embed for those RPCs) and gRPC status code",
                                tag_keys=("adapter", "code"))
        self.latency = Histogram("esm_request_latency_seconds", "Latency by stage: queue, model, total",
                                 boundaries=LATENCY_BOUNDS, tag_keys=("stage",))
        self.batch_size = Histogram("esm_batch_size", "Sequences per forward pass",
                                    boundaries=[1, 2, 4, 8, 16, 32, 64, 128, 256])
        self.batch_adapters = Histogram("esm_batch_distinct_adapters", "Distinct adapters per forward pass",
                                        boundaries=[1, 2, 4, 8, 16, 32, 64, 128])
        self.padding = Histogram("esm_batch_padding_ratio", "Padded positions / all positions per batch",
                                 boundaries=[0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0])
        self.events = Counter("esm_adapter_events_total", "Adapter loads, evictions and refusals",
                              tag_keys=("event", "reason"))
        self.load_latency = Histogram("esm_adapter_load_seconds", "Disk to servable (CPU tier) load time",
                                      boundaries=LATENCY_BOUNDS)
        self.resident = Gauge("esm_adapters_resident", "Adapters resident per tier", tag_keys=("tier",))
        self.registry_readable = Gauge("esm_registry_readable", "1 while the registry folder can be read")
        self.registry_last_scan = Gauge("esm_registry_last_scan_timestamp_seconds",
                                        "Unix time of the registry watcher's last complete scan")
        self.registry_scan_errors = Gauge("esm_registry_scan_errors", "Registry scans that failed since start")
        self._labels: set[str] = set()
        self._lock = threading.Lock()

    def adapter_label(self, name: str | None, known: bool) -> str:
        if not name or not known:
            return "_unknown"
        with self._lock:
            if name in self._labels:
                return name
            if len(self._labels) < MAX_ADAPTER_LABELS:
                self._labels.add(name)
                return name
        return "_other"

    def on_batch(self, stats) -> None:
        self.batch_size.observe(stats.size)
        self.batch_adapters.observe(stats.distinct_adapters)
        self.padding.observe(stats.padding_ratio)

    def on_event(self, event: str, detail: str, seconds: float) -> None:
        self.events.inc(tags={"event": event, "reason": detail if event == "refusal" else ""})
        if event == "load":
            self.load_latency.observe(seconds)

    def set_tiers(self, tiers: dict[str, int], registry_readable: bool = True, health=None) -> None:
        for tier, count in tiers.items():
            self.resident.set(count, tags={"tier": tier})
        self.registry_readable.set(1 if registry_readable else 0)
        if health is not None:  # serving/registry/watcher.py ScanHealth
            self.registry_last_scan.set(health.last_ok)
            self.registry_scan_errors.set(health.errors)
