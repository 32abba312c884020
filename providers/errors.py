"""Typed provider failures, so the consumer can choose retry or dead letter.

`retryable` is the one bit the reliability layer needs: a timeout or an
overloaded backend may answer next time, a request the backend rejects will be
rejected again. `error_type` is what lands in `x-error-type`.
"""

from __future__ import annotations


class ProviderError(Exception):
    retryable: bool = True
    error_type: str = "provider_failed"

    def __init__(self, provider: str, message: str) -> None:
        super().__init__(f"{provider}: {message}")
        self.provider = provider
        # Without the provider's name: what a message about this provider quotes.
        self.detail = message


class ProviderTimeout(ProviderError):
    error_type = "provider_timeout"


class ProviderUnavailable(ProviderError):
    """Connection refused, DNS failure, 5xx, a stream cut short, circuit open."""

    error_type = "provider_unavailable"


class ProviderRateLimited(ProviderError):
    error_type = "provider_rate_limited"

    def __init__(self, provider: str, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(provider, message)
        self.retry_after_s = retry_after_s


class ProviderBadRequest(ProviderError):
    """The backend refused the request (4xx other than 429, unknown model...)."""

    retryable = False
    error_type = "provider_bad_request"


class ProviderBadOutput(ProviderError):
    """The backend answered with something that is not its protocol (garbage, wrong shape).

    Retryable: a garbled body is usually a proxy or a backend in trouble, and
    the retry budget bounds the cost when it is not.
    """

    error_type = "provider_bad_output"
