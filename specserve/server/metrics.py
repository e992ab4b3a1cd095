"""Prometheus metrics of the server (``GET /metrics``, text exposition format).

One registry per app, so tests (and several apps in one process) do not share counters.
Speculation is measured where it happens: drafted and accepted tokens per method and per
draft position, and the latency of every engine step by kind and batch size.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from specserve.engine.job import StepRecord
from specserve.engine.result import GenerationResult
from specserve.engine.scheduler import Engine

STEP_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # Registered in this order, which is the order /metrics lists them in.
        self._add_request_metrics()
        self._add_speculation_metrics()
        self._add_latency_metrics()
        self._add_engine_metrics()

    def _add_request_metrics(self) -> None:
        """Requests and tokens per deployment."""
        r = self.registry
        self.requests = Counter(
            "specserve_requests",
            "Requests by deployment, endpoint and outcome (ok, error, cancelled).",
            ["deployment", "endpoint", "outcome"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "specserve_prompt_tokens", "Prompt tokens processed.", ["deployment"], registry=r
        )
        self.cached_prompt_tokens = Counter(
            "specserve_prompt_tokens_cached",
            "Prompt tokens whose KV came from the prefix cache (not prefilled again).",
            ["deployment"],
            registry=r,
        )
        self.generation_tokens = Counter(
            "specserve_generation_tokens", "Tokens generated.", ["deployment"], registry=r
        )

    def _add_speculation_metrics(self) -> None:
        """Drafted and accepted tokens, per method and per draft position; target steps."""
        r = self.registry
        self.drafted = Counter(
            "specserve_draft_tokens",
            "Draft tokens proposed for verification, by method.",
            ["deployment", "method"],
            registry=r,
        )
        self.accepted = Counter(
            "specserve_accepted_draft_tokens",
            "Draft tokens accepted by the verifier, by method.",
            ["deployment", "method"],
            registry=r,
        )
        self.position_drafted = Counter(
            "specserve_draft_position_proposed",
            "Verification steps that carried a draft at this position (1-based).",
            ["deployment", "method", "position"],
            registry=r,
        )
        self.position_accepted = Counter(
            "specserve_draft_position_accepted",
            "Verification steps whose draft at this position (1-based) was accepted.",
            ["deployment", "method", "position"],
            registry=r,
        )
        self.verify_steps = Counter(
            "specserve_target_steps",
            "Target decode forwards (plain or verification) per deployment.",
            ["deployment"],
            registry=r,
        )
        self.prediction_tokens = Counter(
            "specserve_prediction_tokens",
            "Predicted Outputs tokens that appeared (accepted) or not (rejected) in completions.",
            ["deployment", "outcome"],
            registry=r,
        )

    def _add_latency_metrics(self) -> None:
        """What a client waits: time to the first token and to the last."""
        r = self.registry
        self.ttft = Histogram(
            "specserve_time_to_first_token_seconds",
            "Time from submission to the first token (queueing and prefill included).",
            ["deployment"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.request_seconds = Histogram(
            "specserve_request_seconds",
            "Time from submission to the last token.",
            ["deployment"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

    def _add_engine_metrics(self) -> None:
        """Per model: step latency and batch size, running and waiting sequences."""
        r = self.registry
        self.step_seconds = Histogram(
            "specserve_step_seconds",
            "Latency of one engine forward, by kind (prefill, decode).",
            ["model", "kind"],
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.step_batch = Histogram(
            "specserve_step_batch_size",
            "Sequences in one decode forward.",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.running = Gauge(
            "specserve_running_sequences", "Sequences holding a KV slot.", ["model"], registry=r
        )
        self.waiting = Gauge(
            "specserve_waiting_requests", "Requests queued for a slot.", ["model"], registry=r
        )
        self.prefix_cache_bytes = Gauge(
            "specserve_prefix_cache_bytes",
            "Memory held by kept prompts' KV (the prefix cache), of --prefix-cache-mb.",
            ["model"],
            registry=r,
        )

    def watch_engine(self, name: str, engine: Engine) -> None:
        """Export an engine's step latencies and queue sizes under ``model=name``."""

        def on_step(record: StepRecord) -> None:
            self.step_seconds.labels(name, record.kind).observe(record.seconds)
            if record.kind == "decode":
                self.step_batch.labels(name).observe(record.batch_size)

        engine.stats.step_listeners.append(on_step)
        self.running.labels(name).set_function(lambda: engine.stats.running)
        self.waiting.labels(name).set_function(lambda: engine.stats.waiting)
        cache = engine.prefix_cache
        if cache is not None:
            self.prefix_cache_bytes.labels(name).set_function(lambda: cache.stats.stored_bytes)

    def record_request(
        self, deployment: str, endpoint: str, outcome: str, result: GenerationResult | None
    ) -> None:
        self.requests.labels(deployment, endpoint, outcome).inc()
        if result is None:
            return
        self.prompt_tokens.labels(deployment).inc(result.prompt_tokens)
        self.cached_prompt_tokens.labels(deployment).inc(result.cached_prompt_tokens)
        self.generation_tokens.labels(deployment).inc(len(result.token_ids))
        self.verify_steps.labels(deployment).inc(result.stats.target_steps)
        self.ttft.labels(deployment).observe(result.time_to_first_token)
        self.request_seconds.labels(deployment).observe(
            result.time_to_first_token + result.decode_seconds
        )
        for method, m in result.stats.by_method.items():
            self.drafted.labels(deployment, method).inc(m.proposed)
            self.accepted.labels(deployment, method).inc(m.accepted)
            for i, (p, a) in enumerate(
                zip(m.proposed_per_position, m.accepted_per_position, strict=True), start=1
            ):
                self.position_drafted.labels(deployment, method, str(i)).inc(p)
                self.position_accepted.labels(deployment, method, str(i)).inc(a)
        counts = result.prediction
        if counts is not None:
            tokens = self.prediction_tokens
            tokens.labels(deployment, "accepted").inc(counts.accepted_prediction_tokens)
            tokens.labels(deployment, "rejected").inc(counts.rejected_prediction_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
