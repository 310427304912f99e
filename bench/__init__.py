"""Benchmarks (run as modules, e.g. ``python -m bench.exits --out FILE.json``)."""
