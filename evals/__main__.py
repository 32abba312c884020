"""`python -m evals run|list`: play the scenarios through the worker and write the scorecard.

Exit codes: 0 the suite ran (whatever the model scored: this is a measuring
instrument, not a gate), 1 it could not run (no broker, the worker would not
start), 2 bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from evals.checks import Checker
from evals.language import Detector
from evals.report import scorecard_lines, write
from evals.runner import PROVIDERS, RunOptions, ScenarioResult, run_suite
from evals.scenarios import SCENARIOS, Kind, Scenario, burst_scenarios, select
from evals.worker_code import WorkerCodeError, export_ref

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "evals" / "RESULTS.md"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m evals", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="play the scenarios and write the scorecard")
    run.add_argument("--provider", choices=PROVIDERS,
                     help="AI_PROVIDER for the worker (default: the environment's, else local)")
    run.add_argument("--model", help="a GGUF file for local (LOCAL_MODEL_PATH), else the "
                                     "model name (OLLAMA_MODEL / WADDLEAI_MODEL)")
    run.add_argument("--max-tokens", type=int, help="AI_MAX_TOKENS for the worker")
    run.add_argument("--scenario", action="append", dest="scenarios", metavar="ID",
                     help="only this scenario (repeatable)")
    run.add_argument("--kind", action="append", dest="kinds", metavar="KIND",
                     choices=[k.value for k in Kind], help="only scenarios of this kind")
    run.add_argument("--concurrency", type=int, default=1,
                     help="scenarios played at once (default 1: latency is one reply's)")
    run.add_argument("--no-burst", action="store_true",
                     help="skip the burst of the reported events published at once")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="a worker setting for this run, e.g. --set AI_TEMPERATURE=0")
    run.add_argument("--timeout", type=float, default=300.0,
                     help="seconds to wait for one event's outcome")
    run.add_argument("--worker-ref", metavar="REF",
                     help="score the worker of another commit (e.g. main), exported with "
                          "git archive; the suite stays this checkout's")
    run.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the report to write")
    run.add_argument("--log-dir", type=Path, help="where the worker's log goes "
                                                  "(default: a temporary directory)")
    commands.add_parser("list", help="print the scenarios")
    return parser


def _settings(pairs: Sequence[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set wants KEY=VALUE, got {pair!r}")
        out[key.strip().upper()] = value
    return out


async def _run(args: argparse.Namespace, argv: Sequence[str], scenarios: list[Scenario]) -> int:
    with tempfile.TemporaryDirectory(prefix="waddle-evals-") as tmp:
        log_dir = args.log_dir or Path(tmp)
        worker_code, label = None, None
        if args.worker_ref:
            worker_code = Path(tmp) / "worker-code"
            label = export_ref(REPO, args.worker_ref, worker_code)
        done = 0

        def progress(result: ScenarioResult) -> None:
            nonlocal done
            done += 1
            latency = result.exchange.latency_s
            failed = ",".join(c.name for c in result.failures) or "-"
            print(f"[{done}/{len(scenarios)}] {result.scenario.id}: {result.outcome}"
                  + (f" in {latency:.1f} s" if latency is not None else "")
                  + f"; failed: {failed}", file=sys.stderr, flush=True)

        options = RunOptions(
            scenarios=scenarios, log_dir=log_dir, provider=args.provider, model=args.model,
            max_tokens=args.max_tokens, concurrency=args.concurrency, timeout_s=args.timeout,
            burst=[] if args.no_burst else burst_scenarios(), extra=_settings(args.set),
            progress=progress, worker_code=worker_code)
        print(f"playing {len(scenarios)} scenarios"
              + ("" if args.no_burst else f", then a burst of {len(options.burst)}"),
              file=sys.stderr)
        run = await run_suite(options, Checker(Detector()))
        run.worker_code = label
    print("\n".join(scorecard_lines(run)))
    command = "python -m evals " + " ".join(shlex.quote(a) for a in argv)
    write(run, args.out, command=command, repo=REPO)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "list":
        for s in SCENARIOS:
            mark = " (burst)" if s.burst else ""
            print(f"{s.id:<22} {s.kind.value:<11} {s.platform.value:<8} {s.language}  "
                  f"{s.message_type.value}{mark}  {s.text[:60]!r}")
        print(f"{len(SCENARIOS)} scenarios", file=sys.stderr)
        return 0
    try:
        scenarios = select(args.scenarios, args.kinds)
    except KeyError as exc:
        print(f"error: {exc.args[0]}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_run(args, argv, scenarios))
    except (OSError, RuntimeError, AssertionError, ConnectionError, WorkerCodeError) as exc:
        print(f"error: the suite could not run: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
