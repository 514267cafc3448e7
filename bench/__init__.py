"""``coursezoo bench``: the benchmark harness (see ``bench/harness.py`` and docs/performance.md)."""
