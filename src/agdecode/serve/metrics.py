"""``GET /metrics``: the server's counters in the Prometheus text format (``prometheus_client``).

One registry per server (no process-global state, so two servers in one process, or tests, never
mix their numbers). Labelled by decoding method where it matters.

=====================================  =========  ===============================================
metric                                 type       what
=====================================  =========  ===============================================
``agd_requests_total``                 counter    finished requests, by ``method`` and ``outcome``
                                                  (``ok``, ``error``, ``cancelled``)
``agd_rejected_requests_total``        counter    requests refused before decoding (4xx), by ``status``
``agd_prompt_tokens_total``            counter    prompt tokens of finished requests, by ``method``
``agd_generated_tokens_total``         counter    generated tokens, by ``method``
``agd_guided_steps_total``             counter    steps where attribution chose the token, by ``method``
``agd_time_to_first_token_seconds``    histogram  submit -> first token, by ``method``
``agd_request_seconds``                histogram  submit -> last token, by ``method``
``agd_prefill_seconds``                histogram  compute time of a request's prefill (its pieces), by ``method``
``agd_batch_rows``                     gauge      sequences decoding now
``agd_queue_length``                   gauge      requests waiting for a row
``agd_prefix_cache_hits_total``        counter    prefills that reused a cached prompt prefix
``agd_prefix_cache_misses_total``      counter    prefills that found none
``agd_prefix_cache_tokens_total``      counter    prompt tokens not computed thanks to it
``agd_prefix_cache_bytes``             gauge      keys and values it holds
=====================================  =========  ===============================================
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["ServerMetrics", "CONTENT_TYPE_LATEST"]

_LATENCY = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class ServerMetrics:
    """The metrics of one server; ``render()`` is the ``/metrics`` body.

    Example:
        >>> m = ServerMetrics(lambda: (3, 1))
        >>> m.requests.labels(method="agd", outcome="ok").inc()
        >>> b"agd_requests_total" in m.render()
        True
    """

    def __init__(self, load, prefix_cache=None):
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter("agd_requests", "finished requests", ["method", "outcome"], registry=r)
        self.rejected = Counter("agd_rejected_requests", "requests refused before decoding", ["status"], registry=r)
        self.prompt_tokens = Counter("agd_prompt_tokens", "prompt tokens of finished requests", ["method"], registry=r)
        self.tokens = Counter("agd_generated_tokens", "generated tokens", ["method"], registry=r)
        self.guided = Counter("agd_guided_steps", "steps where attribution chose the token", ["method"], registry=r)
        self.ttft = Histogram("agd_time_to_first_token_seconds", "submit to first token", ["method"],
                              buckets=_LATENCY, registry=r)
        self.latency = Histogram("agd_request_seconds", "submit to last token", ["method"], buckets=_LATENCY,
                                 registry=r)
        self.prefill = Histogram("agd_prefill_seconds", "compute time of a request's prefill", ["method"],
                                 buckets=_LATENCY, registry=r)
        rows = Gauge("agd_batch_rows", "sequences decoding now", registry=r)
        queue = Gauge("agd_queue_length", "requests waiting for a row", registry=r)
        rows.set_function(lambda: load()[0])  # read when scraped: never stale
        queue.set_function(lambda: load()[1])
        if prefix_cache is not None:
            r.register(_PrefixCacheCollector(prefix_cache))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _PrefixCacheCollector:
    """The prefix cache's own counters, read when scraped (the cache counts; nothing is copied)."""

    def __init__(self, cache):
        self.cache = cache

    def collect(self):
        st = self.cache.stats()
        yield CounterMetricFamily("agd_prefix_cache_hits", "prefills that reused a cached prompt prefix",
                                  value=st["hits"])
        yield CounterMetricFamily("agd_prefix_cache_misses", "prefills that found no cached prefix",
                                  value=st["misses"])
        yield CounterMetricFamily("agd_prefix_cache_tokens", "prompt tokens not computed thanks to the prefix cache",
                                  value=st["tokens_reused"])
        yield GaugeMetricFamily("agd_prefix_cache_bytes", "keys and values held by the prefix cache", value=st["bytes"])
