"""Typed provider failures, so the consumer can choose retry or dead letter.

`retryable` is the one bit the reliability layer needs: a timeout or an
overloaded backend may answer next time, a request the backend rejects will be
rejected again. `error_type` is what lands in `x-error-type`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from schemas.errors import WaddleError
from schemas.headers import ErrorType


class ProviderError(WaddleError):
    retryable: bool = True
    error_type: ErrorType = ErrorType.PROVIDER_FAILED
    # True: one such failure opens the provider's circuit at once, rather
    # than after CIRCUIT_FAILURE_THRESHOLD in a row (see ProviderAuthFailed).
    opens_circuit: bool = False

    def __init__(self, provider: str, message: str) -> None:
        super().__init__(f"{provider}: {message}")
        self.provider = provider
        # Without the provider's name: what a message about this provider quotes.
        self.detail = message


class ProviderTimeout(ProviderError):
    error_type = ErrorType.PROVIDER_TIMEOUT


class ProviderUnavailable(ProviderError):
    """Connection refused, DNS failure, 5xx, a stream cut short, circuit open."""

    error_type = ErrorType.PROVIDER_UNAVAILABLE


class ProviderRateLimited(ProviderError):
    error_type = ErrorType.PROVIDER_RATE_LIMITED

    def __init__(self, provider: str, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(provider, message)
        self.retry_after_s = retry_after_s


class ProviderAuthFailed(ProviderError):
    """401/403: the backend refuses the worker's own credentials (a wrong or revoked key).

    The operator's mistake, not the caller's, and the same for every request:
    so not a bad request (nothing is dead-lettered for it) but a provider out
    of service until someone fixes its key. Retryable, so fallbacks answer
    and events wait in the delay queues; and it opens the circuit at the first
    occurrence, since a second request would only be refused again.
    """

    error_type = ErrorType.UPSTREAM_AUTH_FAILED
    opens_circuit = True

    def __init__(self, provider: str, status: int, detail: str) -> None:
        super().__init__(provider, f"HTTP {status}: the provider refused our credentials: {detail}")
        self.status = status


class ProviderBadRequest(ProviderError):
    """The backend refused the request (4xx other than 429, unknown model...)."""

    retryable = False
    error_type = ErrorType.PROVIDER_BAD_REQUEST


class ProviderBadOutput(ProviderError):
    """The backend answered with something that is not its protocol (garbage, wrong shape).

    Retryable: a garbled body is usually a proxy or a backend in trouble, and
    the retry budget bounds the cost when it is not.
    """

    error_type = ErrorType.PROVIDER_BAD_OUTPUT


def log_provider_failure(
    log: logging.Logger, message: str, error: ProviderError, secrets: Iterable[str] = (),
    **extra: object,
) -> None:
    """One line per failed provider call: WARNING for a backend in trouble, ERROR
    (naming the provider and the status, never the key) for credentials it refused,
    which no retry fixes and only the operator can.
    """
    text = str(error)
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    fields: dict[str, object] = {
        "action": "provider_call", "provider": error.provider,
        "error_type": error.error_type, "error": text, **extra}
    if isinstance(error, ProviderAuthFailed):
        fields["status"] = error.status
        log.error("%s: the provider %r refused the worker's credentials (HTTP %d); "
                  "check its API key", message, error.provider, error.status, extra=fields)
        return
    log.warning(message, extra=fields)
