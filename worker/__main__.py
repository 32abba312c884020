"""`python -m worker` is the `waddle-ai` command."""

from worker.cli import main

raise SystemExit(main())
