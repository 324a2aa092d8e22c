"""GET /metrics: Prometheus text (what scrapers read), or the JSON snapshot with ?format=json.

Names follow vLLM's in spirit, with a `unigemma:` prefix: replies by outcome, prompt and
generation token totals, running and waiting requests, KV-cache use, speculative drafts and
acceptances, and histograms of time to first token, time per output token and end-to-end latency
(per finished reply, from its Timings). Counts the scheduler and the `Meter` already keep are read
when scraped (a collector), not copied; each app has its own registry (tests start several apps
in one process; the library's global registry would clash). Behind the API key like /v1.
"""

from __future__ import annotations

from fastapi import Depends, FastAPI
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..errors import InputError

# seconds: from a few ms (a tiny model's first token) to minutes (a long prompt on a CPU)
LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)
PER_TOKEN = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0)


class _Live:
    """The scheduler's and the meter's counts, read at each scrape."""

    def __init__(self, meter, scheduler):
        self.meter, self.scheduler = meter, scheduler

    def collect(self):
        s = self.scheduler.stats()
        outcomes = CounterMetricFamily("unigemma:requests", "Replies by how they ended (ok, rejected: a 4xx, "
                                       "failed: a 5xx, disconnected, cancelled at shutdown)", labels=["outcome"])
        for outcome, count in self.meter.requests.items():
            outcomes.add_metric([outcome], count)
        yield outcomes
        yield CounterMetricFamily("unigemma:generation_tokens", "Tokens generated", value=s["completion_tokens"])
        yield GaugeMetricFamily("unigemma:num_requests_running", "Requests decoding", value=s["running"])
        yield GaugeMetricFamily("unigemma:num_requests_waiting", "Requests waiting or in prefill",
                                value=s["waiting"] + s["prefilling"])
        yield GaugeMetricFamily("unigemma:max_num_seqs", "Rows decoded together", value=s["max_seqs"])
        total = s["kv_tokens_total"]
        yield GaugeMetricFamily("unigemma:kv_cache_usage_perc", "Share of the KV cache's tokens in use (0 to 1)",
                                value=s["kv_tokens_used"] / total if total else 0.0)
        yield CounterMetricFamily("unigemma:spec_decode_num_draft_tokens", "Speculative tokens drafted",
                                  value=s["drafted_tokens"])
        yield CounterMetricFamily("unigemma:spec_decode_num_accepted_tokens", "Speculative drafts the target kept",
                                  value=s["accepted_tokens"])
        yield CounterMetricFamily("unigemma:grammar_forced_tokens", "Tokens a grammar forced, emitted without a "
                                  "forward of their own (jump-forward)", value=s["forced_tokens"])
        if "prefix_cache_lookups" in s:  # automatic prefix caching is on (cache/prefix.py)
            yield CounterMetricFamily("unigemma:prefix_cache_queries", "Prompts looked up in the prefix cache",
                                      value=s["prefix_cache_lookups"])
            yield CounterMetricFamily("unigemma:prefix_cache_hits", "Prompts that restored a cached prefix",
                                      value=s["prefix_cache_hits"])
            lookups = s["prefix_cache_lookups"]
            yield GaugeMetricFamily("unigemma:prefix_cache_hit_rate", "Hits per lookup so far (0 to 1)",
                                    value=s["prefix_cache_hits"] / lookups if lookups else 0.0)
            yield CounterMetricFamily("unigemma:prefix_cache_saved_tokens", "Prompt tokens restored instead of "
                                      "prefilled", value=s["prefix_cache_saved_tokens"])
            yield GaugeMetricFamily("unigemma:prefix_cache_bytes", "K/V bytes the prefix cache holds",
                                    value=s["prefix_cache_bytes"])
            yield GaugeMetricFamily("unigemma:prefix_cache_budget_bytes", "The prefix cache's byte budget",
                                    value=s["prefix_cache_budget"])
            yield CounterMetricFamily("unigemma:prefix_cache_evictions", "Entries evicted to stay in budget",
                                      value=s["prefix_cache_evictions"])


class Metrics:
    """The app's registry and what is observed per finished reply."""

    def __init__(self, meter, scheduler):
        self.registry = CollectorRegistry()
        self.registry.register(_Live(meter, scheduler))
        r = self.registry
        self.prompt_tokens = Counter("unigemma:prompt_tokens", "Prompt tokens of finished replies", registry=r)
        self.ttft = Histogram("unigemma:time_to_first_token_seconds", "Submit to first token (prefill included)",
                              buckets=LATENCY, registry=r)
        self.per_token = Histogram("unigemma:time_per_output_token_seconds", "Mean time between output tokens "
                                   "of a reply", buckets=PER_TOKEN, registry=r)
        self.e2e = Histogram("unigemma:e2e_request_latency_seconds", "Submit to last token", buckets=LATENCY,
                             registry=r)

    def observe(self, t) -> None:
        self.prompt_tokens.inc(t.prompt_tokens)
        self.ttft.observe(t.ttft_s)
        self.e2e.observe(t.ttft_s + t.decode_s)
        if t.completion_tokens > 1:
            self.per_token.observe(t.decode_s / (t.completion_tokens - 1))

    def text(self) -> bytes:
        return generate_latest(self.registry)


def register(app: FastAPI) -> None:
    served = app.state.served
    metrics = served.meter.metrics = Metrics(served.meter, served.scheduler)

    @app.get("/metrics", dependencies=[Depends(served.auth)])
    async def scrape(format: str = "prometheus"):
        if format == "json":
            return served.meter.snapshot()
        if format not in ("prometheus", "text"):
            raise InputError(f"format: 'prometheus' (the default) or 'json', got {format[:40]!r}")
        return Response(metrics.text(), media_type=CONTENT_TYPE_LATEST)
