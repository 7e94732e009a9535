"""Request counts and latency percentiles per route, for ``GET /stats``."""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from typing import Any

import numpy as np

#: Latencies kept per route for percentiles (the most recent ones).
WINDOW = 2048


class ServiceStats:
    """Thread-safe counters: requests by route and status, recent latencies, batching and
    cache figures. ``route`` is a route template (``/items/{item_id}``), never a raw path, so
    the number of keys stays bounded."""

    def __init__(self) -> None:
        self.started = time.time()
        self._lock = threading.Lock()
        self._counts: Counter[tuple[str, int]] = Counter()
        self._latency: dict[str, deque[float]] = {}
        self.batches = 0
        self.batched_queries = 0
        self.cache_hits = 0
        self.cache_misses = 0

    def record(self, route: str, status: int, seconds: float) -> None:
        with self._lock:
            self._counts[(route, status)] += 1
            self._latency.setdefault(route, deque(maxlen=WINDOW)).append(seconds * 1000.0)

    def record_batch(self, size: int) -> None:
        with self._lock:
            self.batches += 1
            self.batched_queries += size

    def record_cache(self, hit: bool) -> None:
        with self._lock:
            if hit:
                self.cache_hits += 1
            else:
                self.cache_misses += 1

    def snapshot(self) -> dict[str, Any]:
        """Uptime, per-route counts by status and p50/p90/p99 latency (ms) over the last
        ``WINDOW`` requests, mean batch size and cache hits."""
        with self._lock:
            routes: dict[str, Any] = {}
            for (route, status), count in sorted(self._counts.items()):
                entry = routes.setdefault(route, {"requests": 0, "by_status": {}})
                entry["requests"] += count
                entry["by_status"][str(status)] = count
            for route, values in self._latency.items():
                p50, p90, p99 = np.percentile(np.fromiter(values, float), [50, 90, 99])
                routes[route]["latency_ms"] = {
                    "p50": round(float(p50), 2),
                    "p90": round(float(p90), 2),
                    "p99": round(float(p99), 2),
                    "window": len(values),
                }
            return {
                "uptime_s": round(time.time() - self.started, 1),
                "requests": sum(self._counts.values()),
                "routes": routes,
                "batching": {
                    "batches": self.batches,
                    "queries": self.batched_queries,
                    "mean_batch": round(self.batched_queries / self.batches, 2)
                    if self.batches
                    else None,
                },
                "cache": {"hits": self.cache_hits, "misses": self.cache_misses},
            }
