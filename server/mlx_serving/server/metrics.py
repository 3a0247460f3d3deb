"""Prometheus metrics: the engine observer and the per-RPC counts, in one registry per server.

Every name starts with `mlx_serving_`; engine metrics carry a `model` label. The engine's
hooks are replayed on the event loop once per batch step, so each hook is a few O(1) updates.

Besides, a model's queued and running generations and its KV-cache utilisation are exported
under vLLM's names with its `model_name` label (the `router_*` gauges): the names the Gateway
API Inference Extension's endpoint picker scrapes by default (docs/ARCHITECTURE.md, Telemetry).
"""

import time
from dataclasses import dataclass

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from mlx_serving.engine.observer import EngineObserver

PREFIX = "mlx_serving_"

# Latencies a user waits for: 1 ms to a minute.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# One token or one batch step: sub-millisecond to seconds.
STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1, 2.5)
# A whole generation or RPC: up to ten minutes.
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

# The label of vLLM's metrics, which routers read (the `router_*` gauges of `Metrics`).
ROUTER_LABELS = ("model_name",)
KV_USAGE_HELP = "Share of the KV budget the running generations reserve, 0 to 1."


class Metrics:
    """Every metric of one server, registered in a registry of its own."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        model = ("model",)

        def counter(name: str, doc: str, labels=model) -> Counter:
            return Counter(PREFIX + name, doc, labels, registry=self.registry)

        def gauge(name: str, doc: str, labels=model) -> Gauge:
            return Gauge(PREFIX + name, doc, labels, registry=self.registry)

        def histogram(name: str, doc: str, buckets, labels=model) -> Histogram:
            return Histogram(PREFIX + name, doc, labels, registry=self.registry, buckets=buckets)

        self.rpc_requests = counter(
            "rpc_requests", "RPCs ended, by method and final status code.", ("method", "code")
        )
        self.rpc_duration = histogram(
            "rpc_duration_seconds", "RPC handling time.", DURATION_BUCKETS, ("method",)
        )
        self.time_to_first_token = histogram(
            "time_to_first_token_seconds", "Admission to first token.", LATENCY_BUCKETS
        )
        self.inter_token_latency = histogram(
            "inter_token_latency_seconds", "Time between two tokens of a request.", STEP_BUCKETS
        )
        self.request_duration = histogram(
            "request_duration_seconds", "Admission to the end of a generation.", DURATION_BUCKETS
        )
        self.queue_wait = histogram(
            "queue_wait_seconds", "Admission to the start of prefill.", LATENCY_BUCKETS
        )
        self.queue_depth = gauge("queue_depth", "Generations admitted, not yet in prefill.")
        self.active_sequences = gauge("active_sequences", "Generations in prefill or decoding.")
        self.batch_size = histogram(
            "batch_size", "Sequences decoding in one batch step.", BATCH_BUCKETS
        )
        self.engine_step = histogram(
            "engine_step_seconds", "Duration of one batch step.", STEP_BUCKETS
        )
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of ended generations.")
        self.generated_tokens = counter("generated_tokens", "Tokens generated.")
        self.cached_prompt_tokens = counter(
            "cached_prompt_tokens", "Prompt tokens whose KV cache came from the prefix cache."
        )
        self.requests_finished = counter(
            "requests_finished", "Generations ended, by reason.", ("model", "finish_reason")
        )
        self.prefix_cache_bytes = gauge("prefix_cache_bytes", "Prefix cache size.", ())
        self.prefix_cache_lookups = counter(
            "prefix_cache_lookups", "Prompts looked up in the prefix cache.", ("result",)
        )
        self.models_loaded = gauge("models_loaded", "Models loaded and ready.", ())
        self.kv_reserved_bytes = gauge(
            "kv_cache_reserved_bytes",
            "KV bytes the running generations reserve (prompt + max_tokens each).",
        )
        self.kv_budget_bytes = gauge(
            "kv_cache_budget_bytes", "The KV budget: a generation that does not fit waits."
        )
        self.draft_tokens = counter(
            "draft_tokens",
            "Speculative decoding: draft tokens proposed, and accepted, by outcome.",
            ("model", "outcome"),
        )

        # The router gauges, under vLLM's names. The KV-cache utilisation twice: GIE's endpoint
        # picker reads `kv_cache_usage_perc` since late 2025, `gpu_cache_usage_perc` (vLLM's
        # name before) until then.
        def router_gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, ROUTER_LABELS, registry=self.registry)

        self.router_waiting = router_gauge(
            "vllm:num_requests_waiting", "Generations admitted, not yet in prefill."
        )
        self.router_running = router_gauge(
            "vllm:num_requests_running", "Generations in prefill or decoding."
        )
        self.router_kv_usage = router_gauge("vllm:kv_cache_usage_perc", KV_USAGE_HELP)
        self.router_kv_usage_before = router_gauge("vllm:gpu_cache_usage_perc", KV_USAGE_HELP)
        # No LoRA adapters: one series saying so (its value, as vLLM's, the time it was set),
        # so that a picker reading the LoRA info finds it rather than logging its absence.
        self.router_lora_info = Gauge(
            "vllm:lora_requests_info",
            "LoRA adapters running and waiting: none (mlx-serving serves no adapters).",
            ("running_lora_adapters", "waiting_lora_adapters", "max_lora"),
            registry=self.registry,
        )
        self.router_lora_info.labels("", "", "0").set(time.time())

    def model_gauges(self) -> tuple[Gauge, ...]:
        """The gauges of a model's occupancy, by its id (`model`) or as `model_name`."""
        return (
            self.queue_depth,
            self.active_sequences,
            self.kv_reserved_bytes,
            self.kv_budget_bytes,
            self.router_waiting,
            self.router_running,
            self.router_kv_usage,
            self.router_kv_usage_before,
        )

    def record_rpc(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        self.rpc_requests.labels(method, code.name).inc()
        self.rpc_duration.labels(method).observe(seconds)


@dataclass
class Occupancy:
    """One model's generations in the engine: `admitted` (queued or running) and `running`;
    the KV bytes the running ones reserve and the model's KV budget."""

    admitted: int = 0
    running: int = 0
    kv_bytes: int = 0
    kv_budget: int = 0

    @property
    def queued(self) -> int:
        return self.admitted - self.running

    @property
    def kv_usage(self) -> float:
        """`kv_bytes` / `kv_budget`, at most 1 (with nothing else running, a generation larger
        than the budget joins the batch alone)."""
        return min(1.0, self.kv_bytes / self.kv_budget) if self.kv_budget else 0.0


class MetricsObserver(EngineObserver):
    """Records the engine's hooks into `metrics`; the gauges follow queued → started → finished."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics
        # Every hook, and `engine_stopped`, runs on the event loop: no lock needed.
        self._occupancy: dict[str, Occupancy] = {}

    def request_queued(self, model_id: str) -> None:
        self._adjust(model_id, admitted=1)

    def request_started(self, model_id: str, queue_seconds: float) -> None:
        self.metrics.queue_wait.labels(model_id).observe(queue_seconds)
        self._adjust(model_id, running=1)

    def first_token(self, model_id: str, seconds: float) -> None:
        self.metrics.time_to_first_token.labels(model_id).observe(seconds)
        self.metrics.generated_tokens.labels(model_id).inc()

    def tokens(self, model_id: str, count: int, seconds_since_previous: float) -> None:
        if count == 1:
            self.metrics.inter_token_latency.labels(model_id).observe(seconds_since_previous)
        self.metrics.generated_tokens.labels(model_id).inc(count)

    def request_finished(
        self,
        model_id: str,
        finish_reason: str,
        prompt_tokens: int,
        cached_tokens: int,
        completion_tokens: int,
        seconds: float,
        started: bool,
    ) -> None:
        metrics = self.metrics
        metrics.requests_finished.labels(model_id, finish_reason).inc()
        metrics.prompt_tokens.labels(model_id).inc(prompt_tokens)
        metrics.cached_prompt_tokens.labels(model_id).inc(cached_tokens)
        metrics.request_duration.labels(model_id).observe(seconds)
        self._adjust(model_id, admitted=-1, running=-int(started))

    def step(self, model_id: str, batch_size: int, seconds: float) -> None:
        self.metrics.engine_step.labels(model_id).observe(seconds)
        if batch_size:  # a prefill-only step decodes nothing
            self.metrics.batch_size.labels(model_id).observe(batch_size)

    def prefix_cache_lookup(self, hit: bool) -> None:
        self.metrics.prefix_cache_lookups.labels("hit" if hit else "miss").inc()

    def prefix_cache_size(self, nbytes: int) -> None:
        self.metrics.prefix_cache_bytes.set(nbytes)

    def models_loaded(self, count: int) -> None:
        self.metrics.models_loaded.set(count)

    def kv_cache(self, model_id: str, reserved_bytes: int, budget_bytes: int) -> None:
        occupancy = self._occupancy.setdefault(model_id, Occupancy())
        occupancy.kv_bytes, occupancy.kv_budget = reserved_bytes, budget_bytes
        if budget_bytes:
            self._set_gauges(model_id, occupancy)
            return
        # Unloaded: a router reads the first series of a name, so none may stay for the model.
        del self._occupancy[model_id]
        for gauge in self.metrics.model_gauges():
            gauge.remove(model_id)

    def draft_tokens(self, model_id: str, proposed: int, accepted: int) -> None:
        self.metrics.draft_tokens.labels(model_id, "proposed").inc(proposed)
        self.metrics.draft_tokens.labels(model_id, "accepted").inc(accepted)

    def engine_stopped(self) -> None:
        """The engine died: nothing runs or waits any more, and no model serves."""
        for model_id, occupancy in self._occupancy.items():
            occupancy.admitted = occupancy.running = occupancy.kv_bytes = 0
            self._set_gauges(model_id, occupancy)
        self.metrics.models_loaded.set(0)

    def _adjust(self, model_id: str, admitted: int = 0, running: int = 0) -> None:
        occupancy = self._occupancy.setdefault(model_id, Occupancy())
        occupancy.admitted += admitted
        occupancy.running += running
        self._set_gauges(model_id, occupancy)

    def _set_gauges(self, model_id: str, occupancy: Occupancy) -> None:
        metrics = self.metrics
        metrics.queue_depth.labels(model_id).set(occupancy.queued)
        metrics.active_sequences.labels(model_id).set(occupancy.running)
        metrics.router_waiting.labels(model_id).set(occupancy.queued)
        metrics.router_running.labels(model_id).set(occupancy.running)
        if occupancy.kv_budget:  # known once the engine reported the model's budget
            metrics.kv_reserved_bytes.labels(model_id).set(occupancy.kv_bytes)
            metrics.kv_budget_bytes.labels(model_id).set(occupancy.kv_budget)
            metrics.router_kv_usage.labels(model_id).set(occupancy.kv_usage)
            metrics.router_kv_usage_before.labels(model_id).set(occupancy.kv_usage)
