"""The evaluation suite: realistic chat scenarios, run through the real worker, scored.

`python -m evals run` (or `make evals`) starts `waddle-ai run` on a queue prefix
of its own, publishes every scenario's event as the router would, reads what
reaches `ai.responses` (and, for events that get no reply, why not, from the
worker's log), scores each reply with automatic checks and writes a scorecard
to `evals/RESULTS.md`. It measures; it changes nothing in the worker.
"""
