"""Prometheus metrics of one server (its own registry): queue, batch, KV blocks, throughput, latencies.

Histograms give rates and `histogram_quantile`; the `*_quantile` gauges are p50/p90/p99 over the
last 1000 requests (or tokens), computed here, so a plain `curl /metrics` shows the percentiles.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

QUANTILES = (0.5, 0.9, 0.99)
REJECT_REASONS = ("invalid_request", "context_length_exceeded", "model_not_found", "invalid_api_key", "queue_full",
                  "shutting_down", "not_found", "invalid_response_format")
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def percentile(xs: list[float], q: float) -> float:
    """Nearest-rank percentile of xs (0 for none)."""
    if not xs:
        return 0.0
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, int(round(q * len(s) + 0.5)) - 1))]


class _Read:
    """Counters whose values live elsewhere (the engine thread's plain ints), read at scrape time."""

    def __init__(self, read: Callable[[], dict[str, tuple[str, float]]]) -> None:
        self.read = read

    def collect(self):
        for name, (doc, value) in self.read().items():
            yield CounterMetricFamily(name, doc, value=value)


class Metrics:
    def __init__(self, queue_depth: Callable[[], int], running: Callable[[], int], blocks_used: Callable[[], int],
                 blocks_total: int, window_s: float = 10.0,
                 counters: Callable[[], dict[str, tuple[str, float]]] | None = None) -> None:
        """counters: name -> (help, value) of counters kept by the engine (prefix-cache hits and queries)."""
        self.registry = r = CollectorRegistry()
        if counters is not None:
            r.register(_Read(counters))
        self._lock = threading.Lock()
        self._tokens: deque[tuple[float, int]] = deque()
        self._window = window_s
        self._recent = {k: deque(maxlen=1000) for k in ("ttft", "latency", "itl")}
        Gauge("llm_queue_depth", "requests waiting for admission", registry=r).set_function(queue_depth)
        Gauge("llm_running_requests", "requests in the running batch", registry=r).set_function(running)
        Gauge("llm_kv_blocks_used", "KV cache blocks in use", registry=r).set_function(blocks_used)
        Gauge("llm_kv_blocks_total", "KV cache blocks in the pool", registry=r).set(blocks_total)
        Gauge("llm_tokens_per_second", f"generated tokens per second over the last {window_s:g} s",
              registry=r).set_function(self.tokens_per_s)
        self.requests = Counter("llm_requests", "finished requests by outcome", ["outcome"], registry=r)
        self.generated = Counter("llm_generated_tokens", "generated tokens", registry=r)
        self.prompt_tokens = Counter("llm_prompt_tokens", "prompt tokens prefilled", registry=r)
        self.rejected = Counter("llm_rejected_requests", "requests refused before admission (4xx, 503)", ["reason"],
                                registry=r)
        for reason in REJECT_REASONS:  # listed at 0 from the start, so a scrape sees the series before a refusal
            self.rejected.labels(reason=reason)
        self.h = {
            "ttft": Histogram("llm_time_to_first_token_seconds", "submit to first token", buckets=_BUCKETS, registry=r),
            "latency": Histogram("llm_request_latency_seconds", "submit to last token", buckets=_BUCKETS, registry=r),
            "itl": Histogram("llm_inter_token_latency_seconds", "between tokens of a stream", buckets=_BUCKETS,
                             registry=r),
        }
        for key, name in (("ttft", "llm_time_to_first_token_seconds_quantile"),
                          ("latency", "llm_request_latency_seconds_quantile"),
                          ("itl", "llm_inter_token_latency_seconds_quantile")):
            g = Gauge(name, f"{key} percentiles over the last 1000 observations", ["quantile"], registry=r)
            for q in QUANTILES:
                g.labels(quantile=str(q)).set_function(lambda key=key, q=q: self.recent(key, q))

    def reject(self, reason: str | None) -> None:
        """Count one refused request; reason is the error's code (None: a plain invalid request)."""
        self.rejected.labels(reason=reason or "invalid_request").inc()

    def observe(self, key: str, seconds: float) -> None:
        self.h[key].observe(seconds)
        with self._lock:
            self._recent[key].append(seconds)

    def recent(self, key: str, q: float) -> float:
        with self._lock:
            xs = list(self._recent[key])
        return percentile(xs, q)

    def count_tokens(self, n: int) -> None:
        self.generated.inc(n)
        now = time.monotonic()
        with self._lock:
            self._tokens.append((now, n))

    def tokens_per_s(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._tokens and self._tokens[0][0] < now - self._window:
                self._tokens.popleft()
            n = sum(c for _, c in self._tokens)
        return n / self._window

    def text(self) -> bytes:
        return generate_latest(self.registry)
