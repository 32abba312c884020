"""Which delay queue a retried or deferred event goes to."""

from __future__ import annotations

from consumers.interaction import choose_delay, defer_delay, nearest_delay

DELAYS = [1000, 2000, 4000, 8000, 16000]


def test_retries_walk_the_steps_and_stay_on_the_last() -> None:
    assert [choose_delay(DELAYS, attempt, None) for attempt in range(7)] == [
        1000, 2000, 4000, 8000, 16000, 16000, 16000]


def test_a_retry_after_moves_a_retry_to_a_step_at_least_that_long() -> None:
    assert choose_delay(DELAYS, 0, 3.0) == 4000
    assert choose_delay(DELAYS, 3, 3.0) == 8000  # never shorter than the attempt's own step
    assert choose_delay(DELAYS, 0, 60.0) == 16000


def test_a_deferral_waits_for_the_longest_step_that_ends_before_the_lease() -> None:
    assert defer_delay(DELAYS, 44_000) == 16000
    assert defer_delay(DELAYS, 12_000) == 8000
    assert defer_delay(DELAYS, 4_000) == 4000
    # Less than the shortest step left (or the lease unknown): the shortest step,
    # so the copy is back soon after the lease expires.
    assert defer_delay(DELAYS, 300) == 1000
    assert defer_delay(DELAYS, 0) == 1000
    assert defer_delay(DELAYS, None) == 1000


def test_a_deferral_behind_a_default_lease_comes_back_a_few_times_not_45() -> None:
    left, trips = 45_000, 0
    while left > 0:
        left -= defer_delay(DELAYS, left)
        trips += 1
    assert trips <= 6


def test_an_event_refused_by_open_circuits_comes_back_nearest_the_next_probe() -> None:
    """Sooner it is only refused again; later it stays silent after the provider is back."""
    assert nearest_delay(DELAYS, 2_300) == 2000  # the default probe, jittered
    assert nearest_delay(DELAYS, 1_700) == 2000
    assert nearest_delay(DELAYS, 1_500) == 2000  # a tie goes to the longer step
    assert nearest_delay(DELAYS, 400) == 1000
    assert nearest_delay(DELAYS, 0) == 1000
    assert nearest_delay(DELAYS, 45_000) == 16000  # probes off: the open time's end
    assert nearest_delay(DELAYS, None) == 1000
    assert nearest_delay([200, 400], 1_900) == 400


def test_a_retry_after_of_exactly_a_step_takes_that_step() -> None:
    assert choose_delay(DELAYS, 0, 1.0) == 1000
    assert choose_delay(DELAYS, 0, 2.0) == 2000
