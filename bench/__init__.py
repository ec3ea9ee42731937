"""Benchmarks of sand-boxer against baselines measured in the same run.

`python -m bench all` runs every benchmark and writes bench/RESULTS.md;
`python -m bench <name>` runs one (see `python -m bench --help`).
"""
