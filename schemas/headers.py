"""AMQP header names of the contract, and the error types that go in `x-error-type`."""

from __future__ import annotations

from enum import StrEnum

TRACEPARENT = "traceparent"

ERROR = "x-error"
ERROR_TYPE = "x-error-type"
RETRY_COUNT = "x-retry-count"
FIRST_FAILED_AT = "x-first-failed-at"
LAST_FAILED_AT = "x-last-failed-at"
ORIGINAL_QUEUE = "x-original-queue"
# Ours (the contract allows additions): when a worker first received the event,
# carried across retries so staleness counts from the first delivery, not the last.
FIRST_RECEIVED_AT = "x-first-received-at"

# Ours: set by `waddle-ai dlq replay`. A replayed event's age counts from the
# replay, since an operator decided it should still be answered.
REPLAYED_AT = "x-replayed-at"

RETRY_HEADERS = (
    ERROR, ERROR_TYPE, RETRY_COUNT, FIRST_FAILED_AT, LAST_FAILED_AT, ORIGINAL_QUEUE,
    FIRST_RECEIVED_AT, REPLAYED_AT,
)


class ErrorType(StrEnum):
    INVALID_JSON = "invalid_json"
    INVALID_SCHEMA = "invalid_schema"
    PROVIDER_FAILED = "provider_failed"
    EMPTY_OUTPUT = "empty_output"
    PUBLISH_FAILED = "publish_failed"
    # Ours: the broker returned the reply (mandatory): nothing consumes ai.responses
    # for its routing key. Retried (the router may be restarting), then dead-lettered.
    UNROUTABLE = "unroutable"
    INTERNAL_ERROR = "internal_error"
    STALE = "stale"
    # The provider's own failures (`providers.errors`), each its class's `error_type`.
    PROVIDER_TIMEOUT = "provider_timeout"
    PROVIDER_UNAVAILABLE = "provider_unavailable"
    PROVIDER_RATE_LIMITED = "provider_rate_limited"
    PROVIDER_BAD_REQUEST = "provider_bad_request"
    PROVIDER_BAD_OUTPUT = "provider_bad_output"
    # Ours: the provider refused the worker's own credentials (401/403).
    UPSTREAM_AUTH_FAILED = "upstream_auth_failed"
    # Ours, on deferred copies (no retry spent): every circuit of the chain is
    # open; another copy of the event holds its lease; this attempt's lease ran out.
    CIRCUIT_OPEN = "circuit_open"
    IN_FLIGHT_ELSEWHERE = "in_flight_elsewhere"
    LEASE_LOST = "lease_lost"
