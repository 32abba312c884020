"""The pipeline's shape: guards in a documented order, and one rule for what a lease gives back.

The behaviour of each guard and of the lease is proved end to end
(test_e2e.py, test_rate_limits.py, test_faults.py); this pins the two
pieces a developer extends or reads first (docs/architecture.md).
"""

from __future__ import annotations

from consumers.pipeline import (
    Deferred,
    Failed,
    InteractionPipeline,
    Skipped,
    _gives_back_cooldowns,
)
from publishers.failures import Failure
from schemas.headers import ErrorType


def test_the_guards_run_in_the_documented_order() -> None:
    names = [guard.__name__ for guard in InteractionPipeline._guard_order()]
    assert names == ["_community_enabled", "_fresh", "_triggered", "_not_blocked"]


def test_only_an_outcome_that_will_never_say_anything_gives_back_its_cooldowns() -> None:
    failure = Failure(ErrorType.PROVIDER_FAILED, "x")
    assert _gives_back_cooldowns(Skipped("rate_limited_user"))
    assert _gives_back_cooldowns(Failed(failure, retryable=False))
    assert not _gives_back_cooldowns(Failed(failure, retryable=True))  # it comes back
    assert not _gives_back_cooldowns(Deferred(ErrorType.LEASE_LOST))
    assert not _gives_back_cooldowns(None)  # an exception: released, cooldowns kept
