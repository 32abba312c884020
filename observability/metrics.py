"""Prometheus metrics, held in one object with its own registry.

No module-level collectors: the app builds one `Metrics` and passes it down,
so each test (and each in-process worker) counts on its own.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

PROVIDER_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 13.0, 20.0, 30.0, 60.0)
# How long circuits stay open: seconds for a blip, minutes for an outage.
OUTAGE_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
HANDLING_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        # What prometheus_client's default registry would show (memory, CPU, open
        # files, Python version, GC), on ours: operators read a leak or an fd
        # exhaustion from the same scrape as the chat metrics.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.events_received = Counter(
            "waddle_ai_events_received", "Interaction events received, by message type.",
            ["message_type"], registry=r)
        self.replies = Counter(
            "waddle_ai_replies", "Replies published (confirmed by the broker).",
            ["trigger", "provider"], registry=r)
        self.no_reply = Counter(
            "waddle_ai_no_reply", "Events acked without a reply, by reason.",
            ["reason"], registry=r)
        self.provider_latency = Histogram(
            "waddle_ai_provider_latency_seconds", "Time for a provider to answer.",
            ["provider"], buckets=PROVIDER_BUCKETS, registry=r)
        self.provider_errors = Counter(
            "waddle_ai_provider_errors", "Provider calls that failed, by error type.",
            ["provider", "error_type"], registry=r)
        self.handling = Histogram(
            "waddle_ai_event_handling_seconds",
            "From delivery to settlement (ack after reply, retry or dead letter).",
            ["outcome"], buckets=HANDLING_BUCKETS, registry=r)
        self.in_flight = Gauge(
            "waddle_ai_in_flight", "Events being handled now.", registry=r)
        self.capacity = Gauge(
            "waddle_ai_capacity", "MAX_CONCURRENT_REQUESTS of this replica.", registry=r)
        self.retries = Counter(
            "waddle_ai_retries", "Events sent to a delay queue, by delay step (ms).",
            ["delay_ms", "error_type"], registry=r)
        self.dead_letters = Counter(
            "waddle_ai_dead_letters", "Events dead-lettered, by error type.",
            ["error_type"], registry=r)
        self.settle_failures = Counter(
            "waddle_ai_settle_failures",
            "Events that could not be settled (retry or DLQ publish failed); "
            "they return to the queue.", registry=r)
        self.state_errors = Counter(
            "waddle_ai_state_errors", "Conversation-state operations that failed.",
            ["operation"], registry=r)
        self.circuit_state = Gauge(
            "waddle_ai_circuit_state",
            "Circuit breaker per provider: 0 closed, 1 half-open, 2 open.",
            ["provider"], registry=r)
        self.circuit_probes = Counter(
            "waddle_ai_circuit_probes",
            "Health probes of providers whose circuit is open, by result (ok, failed).",
            ["provider", "result"], registry=r)
        self.circuit_refusals = Counter(
            "waddle_ai_circuit_refusals",
            "Requests not sent because the provider's circuit was open (the event waits "
            "or a fallback answers; not a failure, no retry spent).",
            ["provider"], registry=r)
        self.circuit_open_seconds = Histogram(
            "waddle_ai_circuit_open_seconds",
            "Time to recovery: how long a provider's circuit stayed open, observed "
            "when it closes.",
            ["provider"], buckets=OUTAGE_BUCKETS, registry=r)
        self.fallbacks = Counter(
            "waddle_ai_fallbacks", "Answers given by a fallback because the primary failed.",
            ["primary", "fallback"], registry=r)
        self.broker_reconnects = Counter(
            "waddle_ai_broker_reconnects", "Broker connections re-established.",
            ["connection"], registry=r)
        self.state_degraded = Gauge(
            "waddle_ai_state_degraded",
            "1 while Redis is unreachable and state falls back to process memory.",
            registry=r)
        self.dedupe_hits = Counter(
            "waddle_ai_dedupe_hits",
            "Deliveries of events already answered (acked without a second reply).",
            registry=r)
        self.replies_republished = Counter(
            "waddle_ai_replies_republished",
            "Stashed replies published again because the attempt that sent them died "
            "before recording them (same message_id; the router drops repeats).",
            registry=r)
        self.unroutable_replies = Counter(
            "waddle_ai_unroutable_replies",
            "Replies the broker returned as unroutable: no queue bound to ai.responses "
            "for their routing key (is the router running?).", registry=r)
        self.consumer_up = Gauge(
            "waddle_ai_consumer_up", "1 while the consumer is attached to the queue.",
            registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
