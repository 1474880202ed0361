"""Prometheus metrics, named like vLLM's (``vllm:`` becomes ``spindle:``) so existing dashboards carry over."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from engine.outputs import EngineCounters, RequestOutput
from scheduler.output import SchedulerStats

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 300.0)


class EngineMetrics:
    """Updated from the engine thread after every step (prometheus_client is thread-safe).

    Every series but the per-reason request counts exists from the start (at 0), so dashboards and alerts see
    them before the first request.
    """

    def __init__(
        self,
        model_name: str,
        registry: CollectorRegistry | None = None,
        kv_policy: str = "none",
        kv_budget: int = 0,
        kv_codec: str = "none",
        kv_bytes_per_token: float = 0.0,
    ) -> None:
        """``kv_policy`` / ``kv_budget``: the configured KV-cache policy, reported by ``spindle:kv_policy_info``;
        ``kv_codec`` / ``kv_bytes_per_token``: the block codecs and what a token takes, by
        ``spindle:kv_cache_codec_info``."""
        self.registry = registry or CollectorRegistry()
        r = self.registry

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"spindle:{name}", doc, ["model_name"], registry=r).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(f"spindle:{name}", doc, ["model_name"], registry=r).labels(model_name)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(f"spindle:{name}", doc, ["model_name"], buckets=buckets, registry=r).labels(model_name)

        self.running = gauge("num_requests_running", "Requests in the running batch.")
        self.waiting = gauge("num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_usage = gauge("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = full).")
        self.free_blocks = gauge("kv_cache_free_blocks", "KV-cache blocks free or evictable.")
        self.total_blocks = gauge("kv_cache_total_blocks", "KV-cache blocks in the pool (free ones included).")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens computed (prefill).")
        self.generation_tokens = counter("generation_tokens", "Tokens generated.")
        self.prefix_queries = counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self.prefix_hits = counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        self.preemptions = counter("num_preemptions", "Requests preempted for lack of KV blocks.")
        Gauge(
            "spindle:kv_policy_info",
            "The KV-cache policy (engine/kv_policy) and its per-sequence budget in KV rows (0: unbounded).",
            ["model_name", "policy", "budget"],
            registry=r,
        ).labels(model_name, kv_policy, str(kv_budget if kv_policy != "none" else 0)).set(1)
        Gauge(
            "spindle:kv_cache_codec_info",
            "The KV blocks' codecs (kv_codec and kv_key_channel_keep: none, kivi-int2, gear-int4-r2-o0.02, "
            "think-0.5+int4, ...) and the KV bytes one token takes in a full block, every layer, K and V.",
            ["model_name", "codec", "bytes_per_token"],
            registry=r,
        ).labels(model_name, kv_codec, f"{kv_bytes_per_token:g}").set(1)
        self.kv_compactions = counter("kv_policy_compactions", "Times the KV policy compacted a sequence's cache.")
        self.kv_evicted = counter("kv_policy_evicted_tokens", "KV rows the KV policy dropped or merged away.")
        self.page_selection_decodes = counter(
            "page_selection_decodes", "Decode rows attended under page selection (kv_policy quest)."
        )
        self.page_selection_blocks_read = counter(
            "page_selection_blocks_read", "KV blocks those decode rows read (per layer); over decodes: blocks per step."
        )
        self.page_selection_blocks_held = counter(
            "page_selection_blocks_held", "KV blocks their sequences held: what full attention would have read."
        )
        self.spec_drafts = counter("spec_decode_num_drafts", "Request steps that verified draft tokens.")
        self.step_reruns = counter(
            "step_reruns", "Model runs over part of a failed step's batch, to find the requests that failed it."
        )
        self.spec_draft_tokens = counter("spec_decode_num_draft_tokens", "Draft tokens verified.")
        self.spec_accepted_tokens = counter("spec_decode_num_accepted_tokens", "Draft tokens accepted.")
        self.swap_preemptions = counter("kv_swap_preemptions", "Preemptions that swapped the request's KV out.")
        self.recompute_preemptions = counter(
            "kv_recompute_preemptions", "Preemptions that dropped the request's KV, to recompute it."
        )
        self.swapped_out = counter("kv_swapped_out_bytes", "KV bytes copied to the swap space.")
        self.swapped_in = counter("kv_swapped_in_bytes", "KV bytes copied back from the swap space.")
        self.swap_usage = gauge("kv_swap_usage_perc", "Fraction of the swap space's block slots in use.")
        self.disk_hits = counter("kv_disk_hits", "KV blocks loaded from the prefix-cache disk tier.")
        self.disk_misses = counter("kv_disk_misses", "Disk-tier lookups that found no usable block.")
        self.disk_read = counter("kv_disk_read_bytes", "Bytes of KV blocks loaded from the disk tier.")
        self.disk_written = counter("kv_disk_written_bytes", "Bytes of KV block files written to the disk tier.")
        self.disk_corrupt = counter("kv_disk_corrupt_files", "Disk-tier files rejected as corrupt (and deleted).")
        self.disk_dropped = counter("kv_disk_dropped_writes", "KV blocks not stored because the writer was behind.")
        self.disk_io_errors = counter(
            "kv_disk_io_errors",
            "Failed disk-tier file operations (each a miss or an unstored block; a run of them "
            "takes the tier offline).",
        )
        self.disk_stored = gauge("kv_disk_stored_bytes", "Bytes of KV block files in the disk tier.")
        self.spec_acceptance = gauge("spec_decode_acceptance_rate", "Draft tokens accepted / verified, since start.")
        self.spec_accepted_length = gauge(
            "spec_decode_mean_accepted_length", "Draft tokens accepted per request step with drafts, since start."
        )
        self.success = Counter(
            "spindle:request_success",
            "Finished requests by finish reason.",
            ["model_name", "finished_reason"],
            registry=r,
        )
        self.ttft = histogram("time_to_first_token_seconds", "Time to first token.", _LATENCY_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Time between consecutive tokens.", _LATENCY_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to finish of a request.", _E2E_BUCKETS)
        self.queue_time = histogram("request_queue_time_seconds", "Arrival to first scheduling.", _E2E_BUCKETS)
        self.model_name = model_name
        self._totals: dict[Counter, int] = {}  # by counter child: the engine total it was last advanced to

    def observe(self, outputs: list[RequestOutput], stats: SchedulerStats, counters: EngineCounters) -> None:
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        self.kv_usage.set(stats.kv_cache_usage)
        self.free_blocks.set(stats.num_free_blocks)
        self.total_blocks.set(stats.num_blocks)
        self._advance(self.prompt_tokens, counters.prompt_tokens)
        self._advance(self.generation_tokens, counters.generation_tokens)
        self._advance(self.prefix_queries, stats.prefix_cache_queries)
        self._advance(self.prefix_hits, stats.prefix_cache_hits)
        self._advance(self.preemptions, stats.num_preemptions)
        self._advance(self.kv_compactions, counters.kv_compactions)
        self._advance(self.kv_evicted, counters.kv_evicted_tokens)
        self._advance(self.page_selection_decodes, counters.page_selection_decodes)
        self._advance(self.page_selection_blocks_read, counters.page_selection_blocks_read)
        self._advance(self.page_selection_blocks_held, counters.page_selection_blocks_held)
        self._advance(self.spec_drafts, counters.spec_drafts)
        self._advance(self.step_reruns, counters.step_reruns)
        self._advance(self.spec_draft_tokens, counters.spec_draft_tokens)
        self._advance(self.spec_accepted_tokens, counters.spec_accepted_tokens)
        self._advance(self.swap_preemptions, stats.num_swap_preemptions)
        self._advance(self.recompute_preemptions, stats.num_preemptions - stats.num_swap_preemptions)
        self._advance(self.swapped_out, counters.swap.swapped_out_bytes)
        self._advance(self.swapped_in, counters.swap.swapped_in_bytes)
        if stats.num_swap_slots:
            self.swap_usage.set(1 - stats.num_free_swap_slots / stats.num_swap_slots)
        disk = counters.disk
        self._advance(self.disk_hits, disk.hits)
        self._advance(self.disk_misses, disk.misses)
        self._advance(self.disk_read, disk.read_bytes)
        self._advance(self.disk_written, disk.written_bytes)
        self._advance(self.disk_corrupt, disk.corrupt_files)
        self._advance(self.disk_dropped, disk.dropped_writes)
        self._advance(self.disk_io_errors, disk.io_errors)
        self.disk_stored.set(disk.stored_bytes)
        if counters.spec_drafts:
            self.spec_acceptance.set(counters.spec_accepted_tokens / counters.spec_draft_tokens)
            self.spec_accepted_length.set(counters.spec_accepted_tokens / counters.spec_drafts)
        for reason, count in counters.finished.items():
            self._advance(self.success.labels(self.model_name, reason), count)
        for output in outputs:
            self._observe_latencies(output)

    def _advance(self, counter: Counter, total: int) -> None:
        """Move a Prometheus counter up to the engine's cumulative ``total``."""
        previous = self._totals.get(counter, 0)
        if total > previous:
            counter.inc(total - previous)
            self._totals[counter] = total

    def _observe_latencies(self, output: RequestOutput) -> None:
        times = output.times
        if times is None:
            return
        token_times = times.tokens
        first_new = len(token_times) - len(output.new_token_ids)
        if first_new == 0 and token_times:
            self.ttft.observe(token_times[0] - times.arrival)
            if times.first_scheduled is not None:
                self.queue_time.observe(times.first_scheduled - times.arrival)
        for i in range(max(first_new, 1), len(token_times)):
            self.itl.observe(token_times[i] - token_times[i - 1])
        if output.finished and times.finished is not None:
            self.e2e.observe(times.finished - times.arrival)


class RouterMetrics:
    """``spindle router``'s own metrics: where requests went, retries, failures, and each replica's state."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "spindle:router_requests", "Requests sent to each replica (retries included).", ["replica"], registry=r
        )
        self.retries = Counter(
            "spindle:router_retries",
            "Requests sent to a replica after another failed before its response started.",
            ["replica"],
            registry=r,
        )
        self.stream_failures = Counter(
            "spindle:router_stream_failures",
            "Streams a replica failed after they started (ended with an error event).",
            ["replica"],
            registry=r,
        )
        self.unserved = Counter(
            "spindle:router_unserved_requests",
            "Requests answered 503: no healthy replica, or none reachable.",
            registry=r,
        )
        self.healthy = Gauge(
            "spindle:router_replica_healthy", "1 while a replica is in rotation.", ["replica"], registry=r
        )
        self.load = Gauge(
            "spindle:router_replica_load",
            "A replica's requests as the router estimates them: max(its open requests, running + waiting polled).",
            ["replica"],
            registry=r,
        )

    def observe_replica(self, url: str, healthy: bool, load: float) -> None:
        """A replica's state as of now; its counters exist (at 0) from the first call, before its first request."""
        for counter in (self.requests, self.retries, self.stream_failures):
            counter.labels(url)
        self.healthy.labels(url).set(int(healthy))
        self.load.labels(url).set(load)
