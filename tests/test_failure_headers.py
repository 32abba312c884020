"""The headers of retry copies and dead letters, and what the consumer reads back.

Pure and fast (no services): part of the mutation run (`make mutants`).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from consumers.interaction import _first_received_at, _text
from publishers.failures import MAX_ERROR_CHARS, Failure, failure_headers, retry_count
from schemas import headers

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.mark.parametrize(("value", "count"), [
    (None, 0), (0, 0), (3, 3), ("4", 4), (-2, 0), ("many", 0), (b"x", 0), ([1], 0)])
def test_retry_count_reads_what_is_there_and_defaults_to_0(value: object, count: int) -> None:
    found = {} if value is None else {headers.RETRY_COUNT: value}
    assert retry_count(found) == count
    assert retry_count(None) == 0


def test_a_first_failure_stamps_everything_and_keeps_the_routers_headers() -> None:
    made = failure_headers({headers.TRACEPARENT: TRACEPARENT, "x-custom": "kept"},
                           Failure("provider_timeout", "slow"), original_queue="ai.interaction",
                           count_retry=True)
    assert made[headers.TRACEPARENT] == TRACEPARENT  # a retry stays on its trace
    assert made["x-custom"] == "kept"
    assert made[headers.ERROR] == "slow"
    assert made[headers.ERROR_TYPE] == "provider_timeout"
    assert made[headers.RETRY_COUNT] == 1
    assert made[headers.ORIGINAL_QUEUE] == "ai.interaction"
    assert made[headers.FIRST_FAILED_AT] == made[headers.LAST_FAILED_AT]
    stamp = datetime.fromisoformat(made[headers.LAST_FAILED_AT].replace("Z", "+00:00"))
    assert made[headers.LAST_FAILED_AT].endswith("Z")
    assert abs(datetime.now(UTC) - stamp) < timedelta(seconds=5)


def test_a_later_failure_counts_on_and_keeps_the_first_failure_time() -> None:
    earlier = {headers.RETRY_COUNT: 2, headers.FIRST_FAILED_AT: "2026-01-01T00:00:00.000Z",
               headers.FIRST_RECEIVED_AT: "2026-01-01T00:00:00+00:00"}
    made = failure_headers(earlier, Failure("e", "x"), original_queue="q", count_retry=True)
    assert made[headers.RETRY_COUNT] == 3
    assert made[headers.FIRST_FAILED_AT] == "2026-01-01T00:00:00.000Z"
    assert made[headers.LAST_FAILED_AT] != made[headers.FIRST_FAILED_AT]
    assert made[headers.FIRST_RECEIVED_AT] == "2026-01-01T00:00:00+00:00"
    # A deferral (not a retry) does not spend the event's retries.
    deferred = failure_headers(earlier, Failure("e", "x"), original_queue="q", count_retry=False)
    assert deferred[headers.RETRY_COUNT] == 2


def test_the_brokers_death_headers_are_dropped_and_long_errors_cut() -> None:
    broker_added = {"x-death": [{"count": 1}], "x-death-extra": 1, "x-delivery-count": 4,
                    "x-first-death-exchange": "", "x-first-death-queue": "q",
                    "x-first-death-reason": "expired", "x-last-death-exchange": "",
                    "x-last-death-queue": "q", "x-last-death-reason": "expired"}
    made = failure_headers(broker_added, Failure("e", "y" * (MAX_ERROR_CHARS + 50)),
                           original_queue="q", count_retry=True)
    assert not any(key in made for key in broker_added)
    assert made[headers.ERROR] == "y" * MAX_ERROR_CHARS
    assert failure_headers(None, Failure("e", "x"), original_queue="q",
                           count_retry=True)[headers.RETRY_COUNT] == 1


def test_the_first_delivery_time_is_read_back_from_its_header() -> None:
    then = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    assert _first_received_at({headers.FIRST_RECEIVED_AT: then.isoformat()}) == then
    assert _first_received_at({headers.FIRST_RECEIVED_AT: then.isoformat().encode()}) == then
    # A naive time is UTC.
    assert _first_received_at({headers.FIRST_RECEIVED_AT: "2026-01-01T12:00:00"}) == then


@pytest.mark.parametrize("carried", [None, "", "yesterday", 12])
def test_a_missing_or_bad_first_delivery_time_is_now(carried: object) -> None:
    found = {} if carried is None else {headers.FIRST_RECEIVED_AT: carried}
    assert abs(datetime.now(UTC) - _first_received_at(found)) < timedelta(seconds=5)


def test_header_text_is_decoded_and_anything_else_is_none() -> None:
    assert _text(b"caf\xc3\xa9") == "café"
    assert _text(b"\xff") == "\ufffd"
    assert _text("plain") == "plain"
    assert _text(5) is None
    assert _text(None) is None


def test_a_first_delivery_time_in_another_zone_keeps_its_instant() -> None:
    carried = {headers.FIRST_RECEIVED_AT: "2026-01-01T14:00:00+02:00"}
    assert _first_received_at(carried) == datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
