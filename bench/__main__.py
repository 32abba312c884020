"""`python -m bench run [--quick]`: the benchmark; see bench/README.md.

The other commands are the harness's own children (`serve`, `fake`) and the
profiler (`profile`), which `run` also calls unless told not to.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run the benchmark and write RESULTS.md")
    run.add_argument("--quick", action="store_true",
                     help="smoke run: N=50, one run, tiny slow/replica/latency scenarios, "
                          "no embedded model, no profile (well under a minute)")
    run.add_argument("-n", "--events", type=int, default=None,
                     help="backlog per throughput run (default 6000; --quick 50)")
    run.add_argument("--runs", type=int, default=None, help="runs per system (default 3)")
    run.add_argument("--slow-events", type=int, default=None,
                     help="events per replica with the 1 s provider (default 3000)")
    run.add_argument("--rate", type=float, default=None,
                     help="events/s of the latency scenario (default: half the worker's median "
                          "msgs/s in this run; 200 without a throughput scenario; --quick 50)")
    run.add_argument("--only", default=None,
                     help="comma list of scenarios: throughput,slow,latency,replicas,local,"
                          "profile (default: all; --quick: all but local and profile)")
    run.add_argument("--systems", default=None,
                     help="comma list of the throughput systems (default floor,faststream,worker)")
    run.add_argument("--out", type=Path, default=None,
                     help="where to write the report (default: bench/RESULTS.md for a complete "
                          "run as shipped; bench/out/RESULTS-quick.md for --quick; "
                          "bench/out/RESULTS-<time>.md for a partial or what-if run)")
    run.add_argument("--json", type=Path, default=None,
                     help="also write the raw figures as JSON here")
    run.add_argument("--patch", action="append", metavar="NAME",
                     help="what-if: run the worker with a patch of bench/patches.py "
                          "(repeatable); the report says so")
    run.add_argument("--set", action="append", metavar="KEY=VALUE",
                     help="what-if: a worker setting, for every worker of the run "
                          "(e.g. redis_url= for memory state); the report says so")

    profile = commands.add_parser("profile", help="profile the worker on the throughput run")
    profile.add_argument("-n", "--events", type=int, default=20000)
    profile.add_argument("--duration", type=int, default=8, help="seconds py-spy samples")
    profile.add_argument("--patch", action="append", metavar="NAME",
                         help="what-if patch for the worker (see `run --patch`)")
    profile.add_argument("--set", action="append", metavar="KEY=VALUE",
                         help="worker setting (see `run --set`)")

    serve = commands.add_parser("serve", help="(internal) run one system under test")
    serve.add_argument("config", help="ServeConfig as JSON")

    fake = commands.add_parser("fake", help="(internal) the fake provider, driven over stdin")
    fake.add_argument("--latency", type=float, default=0.0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        from bench.systems import main as serve_main

        return serve_main(args.config)
    from bench.systems import install_fast_loop

    install_fast_loop()
    if args.command == "fake":
        from bench.fake import serve as fake_serve

        asyncio.run(fake_serve(args.latency))
        return 0
    if args.command == "profile":
        from bench.profile import profile_command

        return asyncio.run(profile_command(args.events, args.duration, args.patch, args.set))
    from bench.harness import run_command

    return asyncio.run(run_command(args))


if __name__ == "__main__":
    sys.exit(main())
