"""Prometheus metrics, named like vLLM's (``vllm:`` becomes ``spindle:``) so existing dashboards carry over."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from engine.outputs import RequestOutput
from scheduler.output import SchedulerStats

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 300.0)


class EngineMetrics:
    """Updated from the engine thread after every step (prometheus_client is thread-safe)."""

    def __init__(self, model_name: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        labels = ["model_name"]
        r = self.registry

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"spindle:{name}", doc, labels, registry=r)

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(f"spindle:{name}", doc, [*labels, *extra], registry=r)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(f"spindle:{name}", doc, labels, buckets=buckets, registry=r)

        self.running = gauge("num_requests_running", "Requests in the running batch.")
        self.waiting = gauge("num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_usage = gauge("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = full).")
        self.free_blocks = gauge("kv_cache_free_blocks", "KV-cache blocks free or evictable.")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens computed (prefill).")
        self.generation_tokens = counter("generation_tokens", "Tokens generated.")
        self.prefix_queries = counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self.prefix_hits = counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        self.preemptions = counter("num_preemptions", "Requests preempted for lack of KV blocks.")
        self.success = counter("request_success", "Finished requests by finish reason.", ("finished_reason",))
        self.ttft = histogram("time_to_first_token_seconds", "Time to first token.", _LATENCY_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Time between consecutive tokens.", _LATENCY_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to finish of a request.", _E2E_BUCKETS)
        self.queue_time = histogram("request_queue_time_seconds", "Arrival to first scheduling.", _E2E_BUCKETS)
        self.model_name = model_name
        self._last = SchedulerStats(0, 0, 0.0, 0, 0, 0, 0, 0)
        self._tokens_seen: dict[str, int] = {}

    def observe(self, outputs: list[RequestOutput], stats: SchedulerStats) -> None:
        m = self.model_name
        self.running.labels(m).set(stats.num_running)
        self.waiting.labels(m).set(stats.num_waiting)
        self.kv_usage.labels(m).set(stats.kv_cache_usage)
        self.free_blocks.labels(m).set(stats.num_free_blocks)
        self.prefix_queries.labels(m).inc(stats.prefix_cache_queries - self._last.prefix_cache_queries)
        self.prefix_hits.labels(m).inc(stats.prefix_cache_hits - self._last.prefix_cache_hits)
        self.preemptions.labels(m).inc(stats.num_preemptions - self._last.num_preemptions)
        self._last = stats
        for output in outputs:
            self._observe_request(output)

    def observe_prompt_tokens(self, count: int) -> None:
        self.prompt_tokens.labels(self.model_name).inc(count)

    def _observe_request(self, output: RequestOutput) -> None:
        m, times = self.model_name, output.times
        if times is None:
            return
        if output.new_token_ids:
            self.generation_tokens.labels(m).inc(len(output.new_token_ids))
            seen = self._tokens_seen.get(output.request_id, 0)
            if seen == 0 and times.first_token is not None:
                self.ttft.labels(m).observe(times.first_token - times.arrival)
                if times.first_scheduled is not None:
                    self.queue_time.labels(m).observe(times.first_scheduled - times.arrival)
            token_times = times.tokens
            for i in range(max(seen, 1), len(token_times)):
                self.itl.labels(m).observe(token_times[i] - token_times[i - 1])
            self._tokens_seen[output.request_id] = len(token_times)
        if output.finished:
            self._tokens_seen.pop(output.request_id, None)
            self.success.labels(m, output.finish_reason or "").inc()
            if times.finished is not None:
                self.e2e.labels(m).observe(times.finished - times.arrival)
