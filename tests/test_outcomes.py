"""The outcome step: every settled event's fate, in words, without its text."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from consumers import outcomes
from consumers.outcomes import (
    DEAD_LETTERED,
    NO_REPLY,
    REPLIED,
    RETRYING,
    Fate,
    OutcomeRecorder,
    cooldown_detail,
    decode_outcome,
    describe_outcome,
    encode_outcome,
    reason_text,
    stale_detail,
)
from context.memory_store import MemoryStateStore
from domain.triggers import SkipReason
from schemas.outcomes import OutcomeRecord


def test_cooldown_detail_says_when_and_which_setting() -> None:
    text = cooldown_detail("channel_cooldown", 2000, 1600)
    assert text.startswith("channel cooldown: a reply to this channel started 0.4 s ago, "
                           "CHANNEL_COOLDOWN_S=2")
    assert "1.6 s left" in text
    assert "mention" in text  # how to get past it
    user = cooldown_detail("user_cooldown", 10_000, None)
    assert "USER_COOLDOWN_S=10" in user


def test_stale_detail_names_the_setting() -> None:
    assert "MAX_EVENT_AGE_S=120" in stale_detail(300.4, 120)


@pytest.mark.parametrize("reason", list(SkipReason.__args__))  # type: ignore[attr-defined]
def test_every_trigger_skip_reason_has_its_own_sentence(reason: str) -> None:
    assert reason_text(reason) != reason.replace("_", " ")


def test_an_outcome_round_trips_and_reads_as_one_line() -> None:
    body = encode_outcome("e1", Fate(NO_REPLY, "no_trigger", reason_text("no_trigger")),
                          community_id="c1")
    record = decode_outcome(body)
    assert record["final"] is True
    assert record["community_id"] == "c1"
    line = describe_outcome(record)
    assert line.startswith("event e1: no reply (no_trigger): no trigger:")
    retry = decode_outcome(encode_outcome(
        "e2", Fate(RETRYING, "provider_timeout", "…", {"retry": 1}), community_id=None))
    assert retry["final"] is False
    assert retry["retry"] == 1
    assert Fate(DEAD_LETTERED, "x", "y").label == "dead_lettered"
    assert Fate(REPLIED, "greeting", "y").label == "replied"


async def test_the_recorder_writes_in_the_background_and_drains() -> None:
    store = MemoryStateStore()
    recorder = OutcomeRecorder(store, ttl_s=60, max_pending=2)
    for n in range(10):  # past max_pending, writes happen in place: none is dropped
        await recorder.record(f"e{n}", Fate(NO_REPLY, "stale", "old"), community_id="c")
    await recorder.drain()
    for n in range(10):
        found = await store.get_outcome(f"e{n}")
        assert found is not None
        assert orjson.loads(found)["reason"] == "stale"


class BrokenStore(MemoryStateStore):
    async def put_outcome(self, event_id: str, outcome: bytes, ttl_s: int) -> None:
        raise ConnectionError("redis went away")


async def test_a_failed_write_is_logged_not_raised() -> None:
    recorder = OutcomeRecorder(BrokenStore(), ttl_s=60, max_pending=1)
    await recorder.record("e1", Fate(NO_REPLY, "stale", "old"), community_id=None)
    await recorder.record("e2", Fate(NO_REPLY, "stale", "old"), community_id=None)  # in place
    await recorder.drain()
    await asyncio.sleep(0)


@pytest.mark.parametrize("status", sorted(outcomes._HANDLING_LABELS))
def test_every_recorded_status_fits_the_documented_record(status: str) -> None:
    """`GET /outcomes/{id}` is documented by `schemas.outcomes.OutcomeRecord`: a status
    the recorder writes that the document does not know would break its readers."""
    raw = encode_outcome("e1", Fate(status, "why", "in words", {"trigger": "greeting"}),
                         community_id="c1")
    record = OutcomeRecord.model_validate_json(raw)
    assert record.status == status
    assert record.model_extra == {"trigger": "greeting"}
