"""Benchmarks of the worker against the floor (bare aio-pika) and FastStream.

`python -m bench run` measures; bench/README.md says what and how, and
bench/RESULTS.md holds the last full run.
"""
