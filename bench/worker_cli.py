"""`python -m bench.worker_cli [--patch NAME]... run`: `waddle-ai` with what-if patches applied.

Used by the harness only when a run asks for `--patch`; otherwise it starts
`python -m worker run` itself.
"""

from __future__ import annotations

import sys

from bench.patches import apply


def main() -> int:
    patches = [arg.split("=", 1)[1] for arg in sys.argv[1:] if arg.startswith("--patch=")]
    rest = [arg for arg in sys.argv[1:] if not arg.startswith("--patch=")]
    apply(patches)
    from worker.cli import main as worker_main

    return worker_main(rest)


if __name__ == "__main__":
    sys.exit(main())
