"""The scorecard: per check, per scenario kind, per language, the burst, every reply.

Figures are computed here from the run, never written by hand. A check's
pass rate counts only the replies it applies to (n/a is neither a pass nor a
fail); a scenario passes when every check that applies to it passes,
`answered` included. As in bench/RESULTS.md, the section between
`<!-- analysis:begin -->` and `<!-- analysis:end -->` is written by a person
and kept when the report is written again.
"""

from __future__ import annotations

import statistics
import subprocess
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from bench.report import ANALYSIS_BEGIN, ANALYSIS_END, _kept_analysis, machine
from evals.checks import CHECK_NAMES, DESCRIPTIONS, Verdict
from evals.runner import ScenarioResult, SuiteRun

REPLY_PREVIEW_CHARS = 160


@dataclass(frozen=True)
class Tally:
    passed: int = 0
    failed: int = 0
    na: int = 0

    @property
    def rate(self) -> float | None:
        judged = self.passed + self.failed
        return None if judged == 0 else self.passed / judged


def tally(results: Iterable[ScenarioResult], check: str) -> Tally:
    counts = Counter(r.verdict(check) for r in results)
    return Tally(counts[Verdict.PASS], counts[Verdict.FAIL], counts[Verdict.NA])


def overall_check_rate(results: Sequence[ScenarioResult]) -> float | None:
    """All verdicts of all checks pooled: passes / (passes + fails)."""
    total = Tally()
    for name in CHECK_NAMES:
        t = tally(results, name)
        total = Tally(total.passed + t.passed, total.failed + t.failed, total.na + t.na)
    return total.rate


def replied(results: Iterable[ScenarioResult]) -> list[ScenarioResult]:
    return [r for r in results if r.outcome == "replied"]


def latencies(results: Iterable[ScenarioResult]) -> list[float]:
    return [r.exchange.latency_s for r in replied(results) if r.exchange.latency_s is not None]


def tokens(results: Iterable[ScenarioResult]) -> list[int]:
    out = []
    for r in replied(results):
        usage = (r.exchange.reply or {}).get("usage") or {}
        out.append(int(usage.get("completion_tokens", 0)))
    return out


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


@dataclass(frozen=True)
class Headline:
    """The baseline figures the issue asks for."""

    scenarios: int
    passed_all: int
    check_rate: float | None
    thanks_correct: int
    thanks_judged: int
    leaks: int
    unsafe: int
    cut: int
    out_of_character: int
    replies: int
    at_cap: int
    reattempted: int
    attempts: int


def headline(results: Sequence[ScenarioResult]) -> Headline:
    # Every event that wants a thank-you: one that never came is not a right one.
    events = [r for r in results if r.scenario.is_event and r.scenario.expect_reply]
    correct = sum(1 for r in events
                  if r.outcome == "replied" and r.verdict("thanks_name") is Verdict.PASS
                  and r.verdict("thanks_facts") in (Verdict.PASS, Verdict.NA))
    cut = sum(1 for r in results for c in r.checks if c.cut)
    at_cap = sum(1 for r in replied(results) if tokens([r])[0] >= r.token_budget)
    return Headline(
        scenarios=len(results), passed_all=sum(r.passed_all for r in results),
        check_rate=overall_check_rate(results), thanks_correct=correct,
        thanks_judged=len(events), leaks=tally(results, "no_leak").failed,
        unsafe=tally(results, "safe").failed, cut=cut,
        out_of_character=tally(results, "in_character").failed,
        replies=len(replied(results)), at_cap=at_cap,
        reattempted=sum(1 for r in replied(results) if r.exchange.attempts),
        attempts=sum(len(r.exchange.attempts) for r in replied(results)))


def _pct(rate: float | None) -> str:
    return "n/a" if rate is None else f"{rate:.0%}"


def _s(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} s"


def _cell(text: str) -> str:
    """Table-safe, and a leaked `<chat_message>` shown, not swallowed as HTML."""
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return text.replace("|", "\\|").replace("\n", " ")


def scorecard_lines(run: SuiteRun) -> list[str]:
    """The console scorecard: per check and per kind, with latency."""
    results = run.results
    h = headline(results)
    lines = [f"{'check':<18} {'pass':>5} {'fail':>5} {'n/a':>5} {'rate':>6}"]
    for name in CHECK_NAMES:
        t = tally(results, name)
        lines.append(f"{name:<18} {t.passed:>5} {t.failed:>5} {t.na:>5} {_pct(t.rate):>6}")
    lines.append("")
    lines.append(f"{'kind':<12} {'n':>3} {'replied':>8} {'all pass':>9} {'p50':>7} {'max':>7}")
    for kind, group in _by(results, lambda r: r.scenario.kind.value).items():
        lat = latencies(group)
        lines.append(f"{kind:<12} {len(group):>3} {len(replied(group)):>8} "
                     f"{sum(r.passed_all for r in group):>9} "
                     f"{_s(percentile(lat, 0.5)):>7} {_s(max(lat) if lat else None):>7}")
    lines.append("")
    lines.append(f"scenarios passing every check: {h.passed_all}/{h.scenarios}; "
                 f"checks passed: {_pct(h.check_rate)}; thank-yous right: "
                 f"{h.thanks_correct}/{h.thanks_judged}; leaks {h.leaks}, unsafe {h.unsafe}, "
                 f"cut mid-sentence {h.cut}, out of character {h.out_of_character}")
    if run.burst is not None:
        b = run.burst
        lines.append(f"burst of {b.n}: {b.replies} replies, last after {b.span_s:.1f} s")
    return lines


def _by(items: Iterable[ScenarioResult],
        key: Callable[[ScenarioResult], str]) -> dict[str, list[ScenarioResult]]:
    groups: dict[str, list[ScenarioResult]] = defaultdict(list)
    for item in items:
        groups[key(item)].append(item)
    return dict(groups)


def git_commit(repo: Path) -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, check=True,
                              capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=repo, check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" (with uncommitted changes)" if dirty.strip() else "")


def render(run: SuiteRun, *, command: str, repo: Path, analysis: str | None) -> str:
    s = run.settings
    env = machine()
    h = headline(run.results)
    lat = latencies(run.results)
    tok = tokens(run.results)
    when = datetime.fromtimestamp(run.started_at, UTC).strftime("%Y-%m-%d %H:%M UTC")
    out = [
        "# Evaluation results",
        "",
        "Written by `python -m evals run` ([evals/](.)); the figures are computed, not "
        "edited. How to run it and what each check means: the README, \"Evaluating replies\".",
        "",
        f"- **Command:** `{command}`",
        f"- **Date:** {when}; took {run.duration_s:.0f} s",
        f"- **Commit:** {git_commit(repo)} (the suite)",
        f"- **Worker code:** {run.worker_code or 'the same checkout'}",
        f"- **Provider / model:** {run.provider or s.ai_provider.value} / "
        f"{run.model or 'n/a'}",
        f"- **Settings:** AI_TEMPERATURE={s.ai_temperature:g}, AI_MAX_TOKENS={s.ai_max_tokens}, "
        f"LOCAL_PARALLEL={s.local_parallel}, LOCAL_THREADS={s.local_threads}, "
        f"BOT_NAME={s.bot_name}, scenarios played {run.concurrency} at a time",
        f"- **Machine:** {env.get('nproc')} cores ({env.get('cpu')}), "
        f"{env.get('memory_gib')} GiB; load average (1/5/15 min) "
        f"{_load(run.load_before)} before, {_load(run.load_after)} after",
        "",
        "## Baseline",
        "",
        "| figure | value |",
        "|---|---|",
        f"| scenarios passing every check | {h.passed_all} / {h.scenarios} "
        f"({_pct(h.passed_all / h.scenarios if h.scenarios else None)}) |",
        f"| checks passed (all verdicts pooled) | {_pct(h.check_rate)} |",
        f"| thank-yous right (name, thanks and every fact) | {h.thanks_correct} / "
        f"{h.thanks_judged} |",
        f"| replies leaking prompt structure or narrating | {h.leaks} |",
        f"| unsafe replies | {h.unsafe} |",
        f"| replies cut mid-sentence (token cap or platform limit) | {h.cut} |",
        f"| replies out of character | {h.out_of_character} |",
        f"| replies that used their whole token budget | {h.at_cap} / {h.replies} |",
        f"| duplicate replies (one event answered twice) | {run.duplicates} |",
        f"| events answered only after failed or deferred attempts (attempts wasted) | "
        f"{h.reattempted} ({h.attempts}) |",
        f"| reply latency p50 / p95 / max | {_s(percentile(lat, 0.5))} / "
        f"{_s(percentile(lat, 0.95))} / {_s(max(lat) if lat else None)} |",
        f"| completion tokens a reply, mean | "
        f"{statistics.fmean(tok) if tok else 0:.0f} |",
    ]
    if run.burst is not None:
        b = run.burst
        out.append(f"| burst of {b.n} events at once: replies, last reply after | "
                   f"{b.replies} / {b.n}, {b.span_s:.1f} s |")
    out += ["", "## Per check", "", "| check | what it asks | pass | fail | n/a | pass rate |",
            "|---|---|---|---|---|---|"]
    for name in CHECK_NAMES:
        t = tally(run.results, name)
        out.append(f"| `{name}` | {DESCRIPTIONS[name]} | {t.passed} | {t.failed} | {t.na} | "
                   f"**{_pct(t.rate)}** |")
    out += ["", "## Per scenario kind", "",
            "| kind | scenarios | replied | passing every check | checks passed | "
            "latency p50 | latency max | tokens, mean |",
            "|---|---|---|---|---|---|---|---|"]
    for kind, group in _by(run.results, lambda r: r.scenario.kind.value).items():
        out.append(_group_row(kind, group))
    out += ["", "## Per language of the viewer", "",
            "| language | scenarios | replied | passing every check | checks passed | "
            "latency p50 | latency max | tokens, mean |",
            "|---|---|---|---|---|---|---|---|"]
    for language, group in sorted(_by(run.results, lambda r: r.scenario.language).items()):
        out.append(_group_row(language, group))
    if run.burst is not None:
        b = run.burst
        out += ["", "## Burst", "",
                f"The {b.n} `burst` scenarios (the kinds of event users reported) published at "
                f"once, each in a new channel. Last reply after **{b.span_s:.1f} s**; "
                f"{b.replies} of {b.n} answered; reply latency p50 "
                f"{_s(percentile(b.latencies_s, 0.5))}; completion tokens a reply, mean "
                f"{statistics.fmean(b.completion_tokens) if b.completion_tokens else 0:.0f}.",
                "", "Outcomes: " + ", ".join(f"{k} {v}" for k, v in b.outcomes.items()) + "."]
    out += ["", "## Every scenario", "",
            "| scenario | kind | lang | outcome | latency | tokens | failed checks | reply |",
            "|---|---|---|---|---|---|---|---|"]
    for r in run.results:
        out.append(_scenario_row(r))
    out += ["", "## Analysis", "", ANALYSIS_BEGIN,
            analysis or "_Not written yet for this run._", ANALYSIS_END, ""]
    return "\n".join(out)


def _load(load: tuple[float, float, float]) -> str:
    return " / ".join(f"{x:.2f}" for x in load)


def _group_row(label: str, group: list[ScenarioResult]) -> str:
    lat = latencies(group)
    tok = tokens(group)
    return (f"| {label} | {len(group)} | {len(replied(group))} | "
            f"{sum(r.passed_all for r in group)} | {_pct(overall_check_rate(group))} | "
            f"{_s(percentile(lat, 0.5))} | {_s(max(lat) if lat else None)} | "
            f"{statistics.fmean(tok) if tok else 0:.0f} |")


def _scenario_row(r: ScenarioResult) -> str:
    x = r.exchange
    usage = (x.reply or {}).get("usage") or {}
    failed = "; ".join(f"`{c.name}`: {c.detail}" for c in r.failures) or "—"
    reply = x.response
    preview = "—" if reply is None else (
        reply if len(reply) <= REPLY_PREVIEW_CHARS else reply[:REPLY_PREVIEW_CHARS] + "[…]")
    tokens_cell = f"{usage.get('completion_tokens', 0)}/{r.token_budget}" if x.reply else "—"
    for turn in reversed(r.before):
        # A follow-up: what was said and answered first.
        earlier = turn.response if turn.response is not None else f"({turn.outcome})"
        preview = f"after “{turn.text}” → “{_short(earlier)}”: {preview}"
    outcome = x.outcome
    if x.attempts and not outcome.startswith("dead_lettered"):
        outcome += " after " + ", ".join(x.attempts)
    return (f"| `{r.scenario.id}` | {r.scenario.kind.value} | {r.scenario.language} | "
            f"{outcome} | {_s(x.latency_s)} | {tokens_cell} | {_cell(failed)} | "
            f"{_cell(preview)} |")


def _short(text: str, chars: int = 80) -> str:
    return text if len(text) <= chars else text[:chars] + "[…]"


def write(run: SuiteRun, out: Path, *, command: str, repo: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(run, command=command, repo=repo, analysis=_kept_analysis(out)),
                   encoding="utf-8")
