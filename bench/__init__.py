"""Benchmarks: plain scripts that print tables, run with `python -m bench.<name>`."""
